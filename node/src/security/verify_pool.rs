//! Password verification off the async runtime, on a small fixed pool.
//!
//! An argon2id check takes milliseconds of CPU and 19 MiB of memory by design. On tokio's
//! blocking pool (up to 512 threads) a flood of bad logins grew memory by gigabytes that
//! was never returned. Here a fixed number of threads (about the core count) take checks
//! from a bounded queue; a check that finds the queue full is refused at once, so memory
//! stays at `workers x 19 MiB` whatever the load. Threads start on first use: a broker
//! without a password file has none.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

/// The queue was full: the caller refuses the client as busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("password verification is saturated")]
pub struct Busy;

/// A fixed pool of verification threads with a bounded queue.
#[derive(Debug)]
pub struct VerifyPool {
    workers: usize,
    queue: usize,
    sender: OnceLock<Result<SyncSender<Job>, String>>,
}

impl VerifyPool {
    /// A pool of `workers` threads (at least 1) with room for `queue` waiting checks.
    pub fn new(workers: usize, queue: usize) -> VerifyPool {
        VerifyPool { workers: workers.max(1), queue, sender: OnceLock::new() }
    }

    fn start(&self) -> Result<SyncSender<Job>, String> {
        let (tx, rx) = sync_channel::<Job>(self.queue);
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..self.workers {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("raftmq-verify-{n}"))
                .spawn(move || loop {
                    // The lock is held only while waiting for the next job.
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        // Every sender is gone: the broker was dropped.
                        Err(_) => return,
                    }
                })
                .map_err(|e| e.to_string())?;
        }
        Ok(tx)
    }

    /// Runs `check` on a pool thread and returns its result; [`Busy`] at once if the
    /// queue is full (or no thread could be started).
    pub async fn run<T: Send + 'static>(&self, check: impl FnOnce() -> T + Send + 'static) -> Result<T, Busy> {
        let sender = match self.sender.get_or_init(|| self.start()) {
            Ok(sender) => sender,
            Err(e) => {
                tracing::error!(error = %e, "cannot start password verification threads");
                return Err(Busy);
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(check());
        });
        match sender.try_send(job) {
            Ok(()) => rx.await.map_err(|_| Busy),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(Busy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_and_refuses_beyond_the_queue() {
        let pool = Arc::new(VerifyPool::new(1, 1));
        assert_eq!(pool.run(|| 41 + 1).await, Ok(42));
        // Hold the only worker, fill the one queue place, and the next check is refused.
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let busy_worker = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                pool.run(move || {
                    let _ = started_tx.send(());
                    let _ = hold.recv();
                })
                .await
            })
        };
        let _ = started.await;
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), pool.run(|| 1)).await;
        assert!(waiting.is_err(), "the second check waits in the queue");
        assert_eq!(pool.run(|| 2).await, Err(Busy), "a full queue refuses at once");
        let _ = release.send(());
        assert_eq!(busy_worker.await.ok(), Some(Ok(())));
        // The queued check runs next; then there is room again.
        let mut after = Err(Busy);
        for _ in 0..500 {
            after = pool.run(|| 3).await;
            if after.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(after, Ok(3));
    }
}
