//! Sandboxes: service instances in their own network namespaces.

pub mod dns;
