//! A program's request statistics for `/metrics`: answers by status class,
//! a histogram of request durations and one of the time requests waited for
//! a ready instance, upstream connect errors and resends. Kept beside the
//! counters of `traffic.rs` (one [`ProgramStats`] per program, shared by its
//! proxy threads) and read out as plain data ([`TrafficStats`]), which the
//! proxy process sends to zdt with the counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds of the histograms' buckets, in microseconds (Prometheus'
/// default buckets, from 1 ms to 10 s, with 250 µs and 500 µs below them for
/// a proxy on loopback).
pub const BOUNDS_US: [u64; 14] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 10_000_000,
];

/// A histogram with [`BOUNDS_US`] buckets (and one above the last).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Counts one observation.
    pub fn observe(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn read(&self) -> HistogramCounts {
        HistogramCounts {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts, as plain data: per bucket (not cumulative), the
/// last one above every bound.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramCounts {
    /// Observations per bucket of [`BOUNDS_US`], then above the last bound.
    pub buckets: Vec<u64>,
    /// The sum of the observations, in microseconds.
    pub sum_us: u64,
}

/// The statistics of one program.
#[derive(Debug, Default)]
pub struct ProgramStats {
    /// Answers by status class: 1xx (index 0) to 5xx (index 4).
    classes: [AtomicU64; 5],
    duration: Histogram,
    queue: Histogram,
    connect_errors: AtomicU64,
    resends: AtomicU64,
}

impl ProgramStats {
    /// An answer's head with `code` went to the client: the application's
    /// or zdt's own. A code outside 100-599 is not counted.
    pub fn answered(&self, code: u16) {
        if let Some(c) = usize::from(code / 100)
            .checked_sub(1)
            .and_then(|i| self.classes.get(i))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A request routed to an instance was answered `took` after it was
    /// routed (a tunnel is not timed).
    pub fn timed(&self, took: Duration) {
        self.duration.observe(took);
    }

    /// A request waited `took` for a ready instance (whether one came).
    pub fn queued(&self, took: Duration) {
        self.queue.observe(took);
    }

    /// A connection to an upstream could not be made.
    pub fn connect_error(&self) {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A request is sent again: to another instance after a failed connect,
    /// or on a new connection after the keep-alive close race.
    pub fn resend(&self) {
        self.resends.fetch_add(1, Ordering::Relaxed);
    }

    /// Everything, as plain data.
    pub fn read(&self) -> TrafficStats {
        TrafficStats {
            classes: std::array::from_fn(|i| self.classes[i].load(Ordering::Relaxed)),
            duration: self.duration.read(),
            queue: self.queue.read(),
            connect_errors: self.connect_errors.load(Ordering::Relaxed),
            resends: self.resends.load(Ordering::Relaxed),
        }
    }
}

/// A program's statistics at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficStats {
    /// Answers by status class, 1xx to 5xx, zdt's own included.
    pub classes: [u64; 5],
    /// Time from routing a request to the end of its answer.
    pub duration: HistogramCounts,
    /// Time requests waited for a ready instance.
    pub queue: HistogramCounts,
    /// Connections to upstreams that failed.
    pub connect_errors: u64,
    /// Requests sent a second time (never one that may have reached the app).
    pub resends: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_fall_in_their_class_and_bucket() {
        let s = ProgramStats::default();
        for (code, took) in [
            (200, Duration::from_micros(250)),
            (204, Duration::from_micros(251)),
            (502, Duration::from_secs(60)),
            (99, Duration::ZERO),
        ] {
            s.answered(code);
            s.timed(took);
        }
        s.answered(101);
        s.answered(600);
        s.queued(Duration::from_millis(3));
        let t = s.read();
        assert_eq!(t.classes, [1, 2, 0, 0, 1]);
        assert_eq!(t.duration.buckets[0], 2, "250 µs and 0 µs are ≤ 250 µs");
        assert_eq!(t.duration.buckets[1], 1);
        assert_eq!(t.duration.buckets[BOUNDS_US.len()], 1, "60 s is above 10 s");
        assert_eq!(t.duration.sum_us, 250 + 251 + 60_000_000);
        assert_eq!(t.queue.buckets[4], 1, "3 ms is in the 5 ms bucket");
    }
}
