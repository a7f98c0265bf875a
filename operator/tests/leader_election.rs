//! Leader election against the fake API server (which enforces resourceVersion on
//! replace and refuses a second create): of several operator replicas exactly one holds
//! the Lease; a valid lease is respected; an expired one is taken over by exactly one
//! replica even when several try at the same moment.

mod common;

use std::sync::{Arc, Mutex};

use common::fake_apiserver::{self, SharedStore, Store};
use parley_operator::lease::{LeaderElector, LEASE_NAME};
use serde_json::json;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";

fn elector(store: &SharedStore, identity: &str) -> LeaderElector {
    LeaderElector::new(
        fake_apiserver::client(store.clone()),
        "ops",
        identity.into(),
    )
}

fn holder(store: &SharedStore) -> Option<String> {
    store
        .lock()
        .expect("lock")
        .get(LEASES, LEASE_NAME)
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
}

/// The holder stopped renewing long ago.
fn expire(store: &SharedStore) {
    let mut s = store.lock().expect("lock");
    let mut lease = s.get(LEASES, LEASE_NAME).cloned().expect("a lease exists");
    lease["spec"]["renewTime"] = json!("2000-01-01T00:00:00.000000Z");
    s.put(LEASES, LEASE_NAME, lease);
}

#[tokio::test]
async fn one_replica_leads_and_another_takes_over_only_after_expiry() {
    let store: SharedStore = Arc::new(Mutex::new(Store::default()));
    let (a, b) = (elector(&store, "op-a"), elector(&store, "op-b"));
    assert!(a.try_acquire().await.expect("api"), "a free lease is taken");
    assert!(
        !b.try_acquire().await.expect("api"),
        "a valid lease is respected"
    );
    assert!(a.try_acquire().await.expect("api"), "the holder renews");
    assert!(!b.try_acquire().await.expect("api"));
    assert_eq!(holder(&store).as_deref(), Some("op-a"));

    expire(&store);
    assert!(
        b.try_acquire().await.expect("api"),
        "an expired lease is taken over"
    );
    assert_eq!(holder(&store).as_deref(), Some("op-b"));
    assert!(
        !a.try_acquire().await.expect("api"),
        "the old holder steps down"
    );
    let s = store.lock().expect("lock");
    let lease = s.get(LEASES, LEASE_NAME).expect("lease");
    assert_eq!(lease["spec"]["leaseTransitions"], 2, "{lease}");
}

#[tokio::test]
async fn of_replicas_racing_for_a_lease_exactly_one_wins() {
    for round in 0..50 {
        let store: SharedStore = Arc::new(Mutex::new(Store::default()));
        let electors: Vec<LeaderElector> = (0..4)
            .map(|i| elector(&store, &format!("op-{i}")))
            .collect();
        if round % 2 == 1 {
            // An expired lease of a vanished replica: the takeover is the race.
            assert!(elector(&store, "gone").try_acquire().await.expect("api"));
            expire(&store);
        }
        let results = futures::future::join_all(electors.iter().map(|e| e.try_acquire())).await;
        let winners: Vec<usize> = results
            .into_iter()
            .enumerate()
            .filter(|(_, r)| *r.as_ref().expect("api"))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        assert_eq!(
            holder(&store),
            Some(format!("op-{}", winners[0])),
            "round {round}"
        );
    }
}
