//! A latency histogram in fixed buckets of atomics: recording is a short search and two
//! adds, and its memory never grows (the exporter's own histograms keep every sample until
//! the next scrape, which without a scraper is unbounded). The node renders it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds (50 us to 5 s).
pub const BOUNDS_US: [u64; 15] =
    [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 5_000_000];

/// Counts per bucket and their sum.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket counts (not cumulative); the last one is above every bound (`+Inf`).
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one sample of `us` microseconds.
    pub fn record(&self, us: u64) {
        let i = BOUNDS_US.iter().position(|bound| us <= *bound).unwrap_or(BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Records one sample.
    pub fn record_duration(&self, d: Duration) {
        self.record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// The per-bucket counts (the last is `+Inf`) and the sum in microseconds.
    pub fn read(&self) -> ([u64; BOUNDS_US.len() + 1], u64) {
        (std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)), self.sum_us.load(Ordering::Relaxed))
    }
}
