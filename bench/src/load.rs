//! Closed-loop load: `concurrency` workers, each issuing one operation at a
//! time against a [`Target`] for a fixed duration, with the latency of every
//! successful operation in an HDR histogram.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Largest latency the histograms hold, in microseconds (longer ones saturate).
const MAX_LATENCY_US: u64 = 60_000_000;
/// Pause of a worker after a failed operation, so an unavailable system is
/// not hammered in a tight loop.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// A system under load: one operation is one write to one conversation.
pub trait Target: Clone + Send + Sync + 'static {
    /// Writes once to `conversation` on behalf of worker number `worker`.
    fn op(
        &self,
        worker: usize,
        conversation: usize,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// What one concurrency level measured.
#[derive(Debug, Clone)]
pub struct LevelResult {
    pub concurrency: usize,
    /// Successful operations.
    pub ok: u64,
    /// Failed operations.
    pub errors: u64,
    /// From the start of the level until its last worker finished.
    pub elapsed: Duration,
    /// Latencies of successful operations, in microseconds.
    pub latency_us: Histogram<u64>,
    /// The first failure, to explain a non-zero error count.
    pub first_error: Option<String>,
}

impl LevelResult {
    /// Successful operations per second.
    pub fn ops_per_s(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.ok as f64 / seconds
        } else {
            0.0
        }
    }

    /// Latency at quantile `q` (0..=1), in milliseconds; 0 without samples.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Runs `concurrency` workers against `target` for `duration`, each picking a
/// uniformly random conversation in `0..conversations` for every operation.
pub async fn run_level<T: Target>(
    target: &T,
    concurrency: usize,
    duration: Duration,
    conversations: usize,
) -> anyhow::Result<LevelResult> {
    anyhow::ensure!(concurrency > 0, "concurrency must be at least 1");
    anyhow::ensure!(conversations > 0, "there must be at least one conversation");
    let started = Instant::now();
    let end = started + duration;
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        workers.spawn(run_worker(target.clone(), worker, conversations, end));
    }
    let mut result = LevelResult {
        concurrency,
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency_us: new_histogram()?,
        first_error: None,
    };
    while let Some(joined) = workers.join_next().await {
        let stats = joined.context("a load worker panicked")??;
        result.ok += stats.ok;
        result.errors += stats.errors;
        result
            .latency_us
            .add(&stats.latency_us)
            .context("cannot merge latency histograms")?;
        if result.first_error.is_none() {
            result.first_error = stats.first_error;
        }
    }
    result.elapsed = started.elapsed();
    Ok(result)
}

/// One worker's tally.
struct WorkerStats {
    ok: u64,
    errors: u64,
    latency_us: Histogram<u64>,
    first_error: Option<String>,
}

async fn run_worker<T: Target>(
    target: T,
    worker: usize,
    conversations: usize,
    end: Instant,
) -> anyhow::Result<WorkerStats> {
    let mut rng = StdRng::from_rng(&mut rand::rng());
    let mut stats = WorkerStats {
        ok: 0,
        errors: 0,
        latency_us: new_histogram()?,
        first_error: None,
    };
    while Instant::now() < end {
        let conversation = rng.random_range(0..conversations);
        let started = Instant::now();
        match target.op(worker, conversation).await {
            Ok(()) => {
                let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                stats.latency_us.saturating_record(micros.max(1));
                stats.ok += 1;
            }
            Err(err) => {
                stats.errors += 1;
                stats.first_error.get_or_insert_with(|| format!("{err:#}"));
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    Ok(stats)
}

/// An empty latency histogram: 1 µs to 60 s at 3 significant digits.
pub fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("cannot create a latency histogram")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Succeeds after a millisecond, except on conversation 1.
    #[derive(Clone, Default)]
    struct Fake {
        calls: Arc<AtomicU64>,
    }

    impl Target for Fake {
        async fn op(&self, _worker: usize, conversation: usize) -> anyhow::Result<()> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(1)).await;
            anyhow::ensure!(conversation != 1, "conversation 1 fails");
            Ok(())
        }
    }

    #[tokio::test]
    async fn counts_successes_errors_and_latency() -> anyhow::Result<()> {
        let fake = Fake::default();
        let result = run_level(&fake, 4, Duration::from_millis(300), 2).await?;
        assert_eq!(result.concurrency, 4);
        assert!(result.ok > 0 && result.errors > 0);
        assert_eq!(
            result.ok + result.errors,
            fake.calls.load(Ordering::Relaxed)
        );
        assert_eq!(result.latency_us.len(), result.ok);
        assert!(result.quantile_ms(0.5) >= 1.0);
        assert!(result.ops_per_s() > 0.0);
        assert_eq!(result.first_error.as_deref(), Some("conversation 1 fails"));
        Ok(())
    }
}
