//! Not a scenario: the timing driver of `bench/copy-sluice.sh`, until `sluice run` can do
//! the copy by itself. Ignored; it runs `initial_copy` against the databases named by
//! `SLUICE_BENCH_SOURCE` and `SLUICE_BENCH_TARGET` (URLs) and prints the outcome.
//!
//! ```sh
//! SLUICE_BENCH_SOURCE=postgres://postgres@127.0.0.1:55432/big \
//! SLUICE_BENCH_TARGET=postgres://postgres@127.0.0.1:55433/copy_sluice \
//!   cargo test --release --test main copy_bench -- --ignored --nocapture
//! ```
//! Optional: `SLUICE_BENCH_JOBS` (2), `SLUICE_BENCH_SPLIT` ("256MB"), `SLUICE_BENCH_SLOT`
//! ("sluice_bench"; created as a permanent slot: the script drops it afterwards).

use std::time::Instant;

use sluice::checkpoint::Store;
use sluice::config::{Config, Overrides};
use sluice::control::SharedStatus;
use sluice::snapshot::{initial_copy, CopyContext};
use sluice::source::selected_tables;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark driver: needs SLUICE_BENCH_SOURCE and SLUICE_BENCH_TARGET"]
async fn copy_bench() {
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let source = std::env::var("SLUICE_BENCH_SOURCE").expect("SLUICE_BENCH_SOURCE");
    let target = std::env::var("SLUICE_BENCH_TARGET").expect("SLUICE_BENCH_TARGET");
    let state = tempfile::tempdir().unwrap();
    let text = format!(
        "[source]\nurl = \"{source}\"\nslot = \"{}\"\n[target]\nurl = \"{target}\"\n[copy]\njobs = {}\nsplit_tables_larger_than = \"{}\"\n[state]\ndir = \"{}\"\n",
        env("SLUICE_BENCH_SLOT", "sluice_bench"),
        env("SLUICE_BENCH_JOBS", "2"),
        env("SLUICE_BENCH_SPLIT", "256MB"),
        state.path().display()
    );
    let config = Config::parse(&text, "bench", &Overrides::default()).expect("bench config");
    let client = sluice::tls::connect(&config.source.conn, "the source")
        .await
        .expect("connect to the source");
    let tables = selected_tables(&client, &config.tables).await.unwrap();
    let store = Store::open(state.path()).unwrap();
    let ctx = CopyContext {
        status: SharedStatus::new(&config.source.slot),
        config,
        tables,
        store,
        // Bars when run by hand on a terminal, log lines under the benchmark script.
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let started = Instant::now();
    let outcome = initial_copy(&ctx).await.expect("initial copy");
    let secs = started.elapsed().as_secs_f64();
    println!(
        "sluice copy: {} tables, {} rows, {} bytes in {secs:.2}s ({:.1} MB/s of COPY data), consistent point {}",
        outcome.tables_copied,
        outcome.rows,
        outcome.bytes,
        outcome.bytes as f64 / 1e6 / secs,
        outcome.consistent_point
    );
}
