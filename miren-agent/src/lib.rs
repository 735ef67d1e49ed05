//! miren-agent: the traffic agent that runs on every node of a Miren-style PaaS.
//!
//! Node ports at kernel speed (eBPF/XDP with an nftables fallback), an HTTP ingress, and the
//! sandboxes that serve both. See `ARCHITECTURE.md` for how the modules fit together.

pub mod agent;
pub mod agent_cli;
pub mod api;
pub mod bpf;
pub mod bundle;
pub mod cli;
pub mod cluster_link;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod ingress;
pub mod listeners;
pub mod metrics;
pub mod nft_cli;
pub mod peer_routes;
pub mod reconcile;
pub mod routes;
pub mod sandbox;
pub mod settings;
pub mod store;
