//! Reconnection policy: exponential backoff with full jitter, and endpoint rotation.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter: the `n`th consecutive failure waits a uniformly
/// random time between `min` and `min(max, min * 2^n)`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff between `min` and `max` (`max` below `min` is raised to `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The upper bound of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        ceiling(self.min, self.max, self.failures)
    }

    /// The delay before the next attempt; counts one more failure.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        if ceiling <= self.min {
            return self.min;
        }
        rng.random_range(self.min..=ceiling)
    }

    /// Forgets past failures (after a successful connection).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// `min(max, min * 2^failures)`, without overflow.
fn ceiling(min: Duration, max: Duration, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX);
    min.checked_mul(factor).map_or(max, |d| d.min(max))
}

/// The endpoints of a cluster, tried in turn: after a failure, the next one.
#[derive(Debug, Clone)]
pub struct EndpointRing {
    endpoints: Vec<String>,
    current: usize,
}

impl EndpointRing {
    /// A ring starting at the first endpoint; `None` if the list is empty.
    pub fn new(endpoints: Vec<String>) -> Option<Self> {
        if endpoints.is_empty() {
            None
        } else {
            Some(Self {
                endpoints,
                current: 0,
            })
        }
    }

    /// The endpoint to try now.
    pub fn current(&self) -> &str {
        &self.endpoints[self.current]
    }

    /// Moves on to the endpoint after the current one (the current one failed).
    pub fn advance(&mut self) {
        self.current = (self.current + 1) % self.endpoints.len();
    }

    /// How many endpoints there are.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Always false: a ring has at least one endpoint.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    #[test]
    fn ceiling_doubles_up_to_the_maximum() {
        assert_eq!(ceiling(MIN, MAX, 0), MIN);
        assert_eq!(ceiling(MIN, MAX, 1), Duration::from_millis(200));
        assert_eq!(ceiling(MIN, MAX, 5), Duration::from_millis(3200));
        assert_eq!(ceiling(MIN, MAX, 6), MAX);
        assert_eq!(ceiling(MIN, MAX, 1000), MAX);
        assert_eq!(
            ceiling(Duration::from_secs(u64::MAX / 2), Duration::MAX, 40),
            Duration::MAX
        );
    }

    #[test]
    fn delays_stay_within_bounds_and_are_jittered() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new(MIN, MAX);
        let mut late = Vec::new();
        for attempt in 0..50 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay(&mut rng);
            assert!(
                delay >= MIN && delay <= ceiling && delay <= MAX,
                "{attempt}: {delay:?}"
            );
            if attempt >= 10 {
                late.push(delay);
            }
        }
        // Full jitter: once at the ceiling, delays spread over the whole range.
        late.sort();
        late.dedup();
        assert!(late.len() > 30, "delays are not jittered: {late:?}");
        assert!(late.iter().any(|d| *d < MAX / 2));
        assert!(late.iter().any(|d| *d > MAX / 2));
    }

    #[test]
    fn reset_starts_over() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut backoff = Backoff::new(MIN, MAX);
        for _ in 0..10 {
            backoff.next_delay(&mut rng);
        }
        assert_eq!(backoff.ceiling(), MAX);
        backoff.reset();
        assert_eq!(backoff.ceiling(), MIN);
        assert_eq!(backoff.next_delay(&mut rng), MIN);
    }

    #[test]
    fn max_below_min_is_raised() {
        let mut backoff = Backoff::new(MAX, MIN);
        assert_eq!(backoff.next_delay(&mut rand::rng()), MAX);
    }

    #[test]
    fn ring_rotates() {
        assert!(EndpointRing::new(Vec::new()).is_none());
        let mut ring =
            EndpointRing::new(vec!["a".into(), "b".into(), "c".into()]).expect("not empty");
        assert_eq!(ring.len(), 3);
        assert!(!ring.is_empty());
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(ring.current().to_owned());
            ring.advance();
        }
        assert_eq!(seen, ["a", "b", "c", "a"]);
    }
}
