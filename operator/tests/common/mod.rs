//! Shared by the operator's test suites.

pub mod cluster_model;
