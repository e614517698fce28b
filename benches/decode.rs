//! Decoder throughput in row changes per second over realistic streams.
//!
//! Each stream is 10,000 payloads laid out back to back in one buffer and handed to the
//! decoder as slices of it, the way XLogData payloads come out of a network read buffer.
//! Every decoded value is touched (its length summed) so the measurement includes reading
//! the row, not only parsing it.
//!
//! Two groups measure the same streams: `decode` in wall-clock time (criterion's default) and
//! `decode_cpu` in the benchmark thread's CPU time. On a shared machine where other processes
//! take the cores, wall-clock time includes the waits for a core; CPU time does not, and is
//! the figure for "row changes per second on one core".
//!
//! ```text
//! cargo bench --bench decode -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::pgoutput::{Decoder, LogicalMessage, OldTuple, Tuple};

const ROWS: usize = 10_000;

fn put_text(buf: &mut BytesMut, value: &str) {
    buf.put_u8(b't');
    buf.put_i32(value.len() as i32);
    buf.put_slice(value.as_bytes());
}

/// A 6-column orders row as PostgreSQL renders it in text.
fn put_order_row(buf: &mut BytesMut, id: usize) {
    buf.put_u16(6);
    put_text(buf, &id.to_string());
    put_text(buf, &format!("customer-{}", id % 977));
    put_text(buf, &format!("{}.{:02}", id % 10_000, id % 100));
    put_text(buf, "2026-11-21 12:34:56.789012+00");
    if id.is_multiple_of(3) {
        buf.put_u8(b'n');
    } else {
        put_text(buf, "t");
    }
    put_text(buf, "a short free-text note on the order");
}

fn stream(mut build: impl FnMut(&mut BytesMut, usize)) -> Vec<Bytes> {
    let mut buf = BytesMut::new();
    let mut bounds = Vec::with_capacity(ROWS);
    for i in 0..ROWS {
        let start = buf.len();
        build(&mut buf, i);
        bounds.push(start..buf.len());
    }
    let buf = buf.freeze();
    bounds.into_iter().map(|r| buf.slice(r)).collect()
}

fn inserts_6_columns() -> Vec<Bytes> {
    stream(|buf, i| {
        buf.put_u8(b'I');
        buf.put_u32(16_385);
        buf.put_u8(b'N');
        put_order_row(buf, i + 1);
    })
}

/// Primary-key changes: a K tuple (key set, the other five columns `n`) and the new row.
fn updates_with_old_key() -> Vec<Bytes> {
    stream(|buf, i| {
        buf.put_u8(b'U');
        buf.put_u32(16_385);
        buf.put_u8(b'K');
        buf.put_u16(6);
        put_text(buf, &(i + 1).to_string());
        for _ in 0..5 {
            buf.put_u8(b'n');
        }
        buf.put_u8(b'N');
        put_order_row(buf, i + 1_000_000);
    })
}

/// A 40-column row: ints, numerics, timestamps, short texts and a few NULLs.
fn inserts_40_columns() -> Vec<Bytes> {
    stream(|buf, i| {
        buf.put_u8(b'I');
        buf.put_u32(16_400);
        buf.put_u8(b'N');
        buf.put_u16(40);
        for column in 0..40 {
            match column % 5 {
                0 => put_text(buf, &(i * 40 + column).to_string()),
                1 => put_text(buf, "12345.67"),
                2 => put_text(buf, "2026-11-21 12:34:56+00"),
                3 if i.is_multiple_of(4) => buf.put_u8(b'n'),
                _ => put_text(buf, "some text value"),
            }
        }
    })
}

fn touch(tuple: &Tuple) -> usize {
    tuple
        .iter()
        .map(|v| v.as_bytes().map_or(1, <[u8]>::len))
        .sum()
}

fn decode_stream(payloads: &[Bytes]) -> usize {
    let mut decoder = Decoder::new(1);
    let mut total = 0;
    for payload in payloads {
        total += match decoder.decode(payload.clone()).expect("valid payload") {
            LogicalMessage::Insert(insert) => touch(&insert.new),
            LogicalMessage::Update(update) => {
                let old = match &update.old {
                    Some(OldTuple::Key(t) | OldTuple::Full(t)) => touch(t),
                    None => 0,
                };
                old + touch(&update.new)
            }
            _ => 0,
        };
    }
    total
}

fn bench<M: Measurement>(c: &mut Criterion<M>, group: &str) {
    let mut group = c.benchmark_group(group);
    group.throughput(Throughput::Elements(ROWS as u64));
    for (name, payloads) in [
        ("insert_6_columns", inserts_6_columns()),
        ("update_old_key_6_columns", updates_with_old_key()),
        ("insert_40_columns", inserts_40_columns()),
    ] {
        group.bench_function(name, |b| b.iter(|| decode_stream(black_box(&payloads))));
    }
    group.finish();
}

fn wall_clock(c: &mut Criterion) {
    bench(c, "decode");
}

fn cpu_time(c: &mut Criterion<ThreadCpuTime>) {
    bench(c, "decode_cpu");
}

/// CPU time of the calling thread in nanoseconds (criterion runs iterations on one thread).
struct ThreadCpuTime;

fn thread_cpu_nanos() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the pointer we pass, which is valid.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        thread_cpu_nanos()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_nanos().saturating_sub(start)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

struct CpuFormatter;

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, typical_ns: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if typical_ns < 1e3 {
            (1.0, "ns cpu")
        } else if typical_ns < 1e6 {
            (1e-3, "µs cpu")
        } else {
            (1e-6, "ms cpu")
        };
        values.iter_mut().for_each(|v| *v *= factor);
        unit
    }

    fn scale_throughputs(
        &self,
        _typical_ns: f64,
        throughput: &Throughput,
        values: &mut [f64],
    ) -> &'static str {
        let per_iteration = match throughput {
            Throughput::Elements(n) | Throughput::Bytes(n) | Throughput::BytesDecimal(n) => {
                *n as f64
            }
        };
        values
            .iter_mut()
            .for_each(|ns| *ns = per_iteration * 1e9 / *ns / 1e6);
        "M/s per cpu-second"
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

criterion_group!(wall, wall_clock);
criterion_group! {
    name = cpu;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = cpu_time
}
criterion_main!(wall, cpu);
