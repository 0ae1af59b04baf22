//! Rate-limited log lines. A client can make the broker log on purpose (bad logins,
//! protocol errors, refused retained messages); without a limit that is a way to fill the
//! disk or drown the lines that matter. Each kind of line gets a [`LogLimiter`]: at most one
//! line per interval, and the next line says how many were suppressed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets one log line through per interval and counts the rest.
#[derive(Debug)]
pub struct LogLimiter {
    start: Instant,
    interval_ms: u64,
    /// Milliseconds since `start` of the last line let through, plus one (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> LogLimiter {
        LogLimiter {
            start: Instant::now(),
            interval_ms: interval.as_millis() as u64,
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if a line may be written now, `n` being the lines suppressed since the
    /// last one; `None` if this one is suppressed.
    pub fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.interval_ms {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// The limited kinds of log line of one broker.
#[derive(Debug)]
pub struct LogLimits {
    /// Failed logins.
    pub auth_failure: LogLimiter,
    /// Connections closed for a protocol error.
    pub protocol_error: LogLimiter,
    /// Retained messages refused by the retained limits.
    pub retained_refused: LogLimiter,
    /// PUBLISH and SUBSCRIBE refused by the ACL.
    pub acl_denied: LogLimiter,
    /// CONNECTs refused as busy or over a limit.
    pub overload: LogLimiter,
}

impl Default for LogLimits {
    fn default() -> Self {
        let every = || LogLimiter::new(Duration::from_secs(5));
        LogLimits { auth_failure: every(), protocol_error: every(), retained_refused: every(), acl_denied: every(), overload: every() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_then_the_suppressed_count() {
        let l = LogLimiter::new(Duration::from_millis(50));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(l.allow(), Some(2));
    }
}
