//! Shared by the operator's test suites.

pub mod cluster_model;
pub mod fake_apiserver;
pub mod fake_cluster;
