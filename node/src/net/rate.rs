//! A token bucket, for the per-client PUBLISH rate and the per-listener connection rate.

use std::time::{Duration, Instant};

/// `per_sec` tokens a second, at most one second's worth saved up.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A full bucket refilled at `per_sec` tokens a second.
    pub fn new(per_sec: u32) -> RateLimiter {
        RateLimiter { per_sec: f64::from(per_sec.max(1)), tokens: f64::from(per_sec.max(1)), last: Instant::now() }
    }

    /// Takes a token; returns how long to wait first if the bucket is empty.
    pub fn take(&mut self) -> Option<Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_sec).min(self.per_sec);
        self.last = now;
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.per_sec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_worth_then_waits() {
        let mut r = RateLimiter::new(10);
        assert!((0..10).all(|_| r.take().is_none()));
        let wait = r.take();
        assert!(wait.is_some_and(|w| w > Duration::ZERO && w <= Duration::from_millis(100)), "{wait:?}");
    }
}
