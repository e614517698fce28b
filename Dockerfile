# sluice in a container: the release binary plus pg_dump (used by `sluice schema`).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY examples examples
COPY tests tests
RUN cargo build --release --locked --bin sluice

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-client \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
RUN useradd --system --create-home --home-dir /var/lib/sluice sluice
USER sluice
WORKDIR /var/lib/sluice
ENTRYPOINT ["sluice"]
CMD ["--help"]
