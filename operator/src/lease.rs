//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator
//! replicas exactly one acts. The holder renews every few seconds; another replica takes
//! over only after the lease has gone unrenewed for its whole duration. Writes go with
//! the Lease's resourceVersion, so two replicas can never both win the same takeover.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;

/// Name of the Lease the operator replicas compete for.
pub const LEASE_NAME: &str = "parley-operator-leader";
/// How long a lease lasts without renewal.
pub const LEASE_SECONDS: i32 = 15;
/// How often the holder renews (and others retry).
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// One replica's view of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    identity: String,
}

/// What a lease says, reduced to the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Ours: renew it.
    Renew,
    /// Free or expired: take it.
    Take,
    /// Someone else's and still valid.
    Wait { holder: String },
}

/// Decides from the lease's holder and last renewal (pure, so it is tested directly).
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: jiff::Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Take;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => Decision::Take,
        Some(h) if h == identity => Decision::Renew,
        Some(h) => {
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
            let expired = spec
                .renew_time
                .as_ref()
                .is_none_or(|t| now.as_second() - t.0.as_second() > duration);
            if expired {
                Decision::Take
            } else {
                Decision::Wait { holder: h.into() }
            }
        }
    }
}

impl LeaderElector {
    pub fn new(client: Client, namespace: &str, identity: String) -> LeaderElector {
        LeaderElector {
            api: Api::namespaced(client, namespace),
            identity,
        }
    }

    /// Tries once to hold the lease; `Ok(true)` when this replica is the leader now.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = jiff::Timestamp::now();
        let existing = self.api.get_opt(LEASE_NAME).await?;
        let decision = decide(
            existing.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
        );
        let transitions = existing
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0);
        let acquire_time = match (&decision, existing.as_ref().and_then(|l| l.spec.as_ref())) {
            (Decision::Renew, Some(s)) => s.acquire_time.clone(),
            _ => Some(MicroTime(now)),
        };
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            acquire_time,
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if decision == Decision::Take {
                transitions + 1
            } else {
                transitions
            }),
            ..Default::default()
        };
        match (decision, existing) {
            (Decision::Wait { .. }, _) => Ok(false),
            (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE_NAME.into()),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    // Another replica created it first.
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            (_, Some(mut lease)) => {
                // Replace carries the resourceVersion read above: a concurrent writer
                // makes this fail with 409 instead of both believing they lead.
                lease.spec = Some(spec);
                match self
                    .api
                    .replace(LEASE_NAME, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                jiff::Timestamp::from_second(renewed).expect("valid time"),
            )),
            ..Default::default()
        }
    }

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).expect("valid time")
    }

    #[test]
    fn a_valid_lease_of_another_replica_is_respected() {
        assert_eq!(
            decide(Some(&lease("b", 1000)), "a", at(1010)),
            Decision::Wait { holder: "b".into() }
        );
    }

    #[test]
    fn an_expired_or_missing_lease_is_taken_and_our_own_renewed() {
        assert_eq!(
            decide(Some(&lease("b", 1000)), "a", at(1016)),
            Decision::Take
        );
        assert_eq!(decide(None, "a", at(0)), Decision::Take);
        assert_eq!(
            decide(Some(&lease("", 1000)), "a", at(1001)),
            Decision::Take
        );
        assert_eq!(
            decide(Some(&lease("a", 1000)), "a", at(5000)),
            Decision::Renew
        );
    }
}
