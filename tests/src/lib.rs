//! Test support for miren-agent: network-namespace topologies for tests that need the kernel,
//! and hand-built packets. Everything a test creates lives inside namespaces it created itself
//! and is removed on drop, also when the test panics.

/// Apps deployed with the CLI for tests whose agent runs instances: deploying, waiting, HTTP
/// requests, instance namespaces.
pub mod apps;
/// Cluster topologies: node namespaces on one bridge and a real etcd cluster across them.
pub mod cluster;
/// Real agents in cluster mode, one per node namespace, on a real etcd cluster.
pub mod cluster_agents;
/// A 3-node cluster with data planes and an echo app, for tests that send traffic through it.
pub mod cluster_checks;
pub mod etcd_local;
pub mod ingress;
pub mod packet;
/// A real ACME server (Pebble and its DNS) for tests.
pub mod pebble;
pub mod process;
/// Debian's promtool and Prometheus, the latter run inside a test's namespace.
pub mod prometheus;
pub mod tls;
pub mod topology;
pub mod world;
