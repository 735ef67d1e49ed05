//! Routes to the other nodes' sandbox subnets, host-gateway style: the nodes share an L2
//! segment, so a node's instances are reached through that node's own address. For every
//! other node with an IPv4 address the agent keeps `SUBNET via NODE_IP proto 109` in the main
//! routing table of its network namespace; routes of protocol [`ROUTE_PROTOCOL`] that are no
//! longer wanted (a node removed with `miren node rm`) are deleted. The routes stay when the
//! agent stops (instances outlive it, and so do flows to them); a restarted agent reconciles
//! them. [`follow`] reconciles after every change of the nodes and every [`RESYNC_INTERVAL`]
//! (repairing routes removed behind the agent's back).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    process::Command,
    sync::Arc,
    time::Duration,
};

use serde_json::Value;
use tokio::sync::watch;

use crate::{
    config::Subnet,
    control::{ControlPlane, Peer},
};

/// The routing protocol number marking the routes of this module (`proto 109`, "m"); no
/// daemon in `/etc/iproute2/rt_protos` uses it.
pub const ROUTE_PROTOCOL: u8 = 109;
/// How often the routes are checked without a change of the nodes.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);

/// Errors of reading or changing the routes.
#[derive(Debug, thiserror::Error)]
pub enum PeerRouteError {
    /// An `ip` command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// `ip` could not run.
    #[error("running ip (package iproute2): {0}")]
    Io(#[source] std::io::Error),
    /// `ip -j route show` printed something else than the expected JSON.
    #[error("unreadable `ip -j route show` output: {0}")]
    Listing(String),
    /// No address of a node could be used as the gateway to its subnet.
    #[error(
        "cannot route node \"{node}\"'s instances ({subnet}): {tried}; the nodes must share an L2 segment (host-gateway routing): start each agent with a --node-ip on the network the nodes share"
    )]
    Unroutable {
        /// The node.
        node: String,
        /// Its sandbox subnet.
        subnet: Subnet,
        /// What each of its addresses answered, or that it has no IPv4 address.
        tried: String,
    },
}

/// A route wanted to another node's subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    /// The node's name (for messages).
    node: String,
    /// Its IPv4 addresses, in the order they are tried as the gateway.
    gateways: Vec<Ipv4Addr>,
}

/// A change to the routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    /// Route `subnet` via the first of `wanted.gateways` that works.
    Replace { subnet: Subnet, wanted: Wanted },
    /// Delete the route to `subnet`.
    Delete { subnet: Subnet },
}

/// The routes wanted to `peers`' subnets.
fn wanted(peers: &[Peer]) -> BTreeMap<Subnet, Wanted> {
    peers
        .iter()
        .map(|peer| {
            let gateways = peer
                .addresses
                .iter()
                .filter_map(|addr| match addr {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .collect();
            let wanted = Wanted {
                node: peer.name.clone(),
                gateways,
            };
            (peer.subnet, wanted)
        })
        .collect()
}

/// The routes of an `ip -j -4 route show proto 109` listing: subnet → gateway. Entries that are
/// not subnets this module writes are left out (and left alone).
fn parse_routes(listing: &str) -> Result<BTreeMap<Subnet, Option<Ipv4Addr>>, PeerRouteError> {
    let listing = if listing.trim().is_empty() {
        "[]"
    } else {
        listing
    };
    let value: Value =
        serde_json::from_str(listing).map_err(|e| PeerRouteError::Listing(e.to_string()))?;
    let routes = value
        .as_array()
        .ok_or_else(|| PeerRouteError::Listing(format!("not a list: {value}")))?;
    Ok(routes
        .iter()
        .filter_map(|route| {
            let subnet = Subnet::parse(route["dst"].as_str()?).ok()?;
            let gateway = route["gateway"].as_str().and_then(|g| g.parse().ok());
            Some((subnet, gateway))
        })
        .collect())
}

/// The changes that turn `current` into `wanted`: a route whose gateway is one of the node's
/// addresses is kept.
fn plan(
    current: &BTreeMap<Subnet, Option<Ipv4Addr>>,
    wanted: &BTreeMap<Subnet, Wanted>,
) -> Vec<Change> {
    let deletes = current
        .keys()
        .filter(|subnet| !wanted.contains_key(subnet))
        .map(|subnet| Change::Delete { subnet: *subnet });
    let replaces = wanted
        .iter()
        .filter(|(subnet, w)| {
            !current
                .get(subnet)
                .is_some_and(|gateway| gateway.is_some_and(|g| w.gateways.contains(&g)))
        })
        .map(|(subnet, w)| Change::Replace {
            subnet: *subnet,
            wanted: w.clone(),
        });
    deletes.chain(replaces).collect()
}

/// Runs `ip ARGS…`: its stdout.
fn ip(args: &[&str]) -> Result<String, PeerRouteError> {
    let out = Command::new("ip")
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(PeerRouteError::Io)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(PeerRouteError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Makes the routes of protocol [`ROUTE_PROTOCOL`] match `peers` (blocking: runs `ip`).
/// Returns the subnets that could not be routed, each with why; the others are applied.
///
/// # Errors
/// [`PeerRouteError`] when the routes cannot be listed.
pub fn reconcile(peers: &[Peer]) -> Result<Vec<(Subnet, PeerRouteError)>, PeerRouteError> {
    let proto = ROUTE_PROTOCOL.to_string();
    let current = parse_routes(&ip(&["-j", "-4", "route", "show", "proto", &proto])?)?;
    let mut failed = Vec::new();
    for change in plan(&current, &wanted(peers)) {
        match change {
            Change::Delete { subnet } => {
                let dst = subnet.to_string();
                match ip(&["route", "del", &dst, "proto", &proto]) {
                    Ok(_) => {
                        tracing::info!(%subnet, "deleted the route to a removed node's instances")
                    }
                    Err(err) => failed.push((subnet, err)),
                }
            }
            Change::Replace { subnet, wanted } => {
                if let Err(err) = route(subnet, &wanted, &proto) {
                    failed.push((subnet, err));
                }
            }
        }
    }
    Ok(failed)
}

/// Routes `subnet` via the first of `wanted`'s gateways the kernel accepts.
fn route(subnet: Subnet, wanted: &Wanted, proto: &str) -> Result<(), PeerRouteError> {
    let dst = subnet.to_string();
    let mut tried = Vec::new();
    for gateway in &wanted.gateways {
        let via = gateway.to_string();
        match ip(&["route", "replace", &dst, "via", &via, "proto", proto]) {
            Ok(_) => {
                tracing::info!(%subnet, %gateway, node = %wanted.node, "routed another node's instances");
                return Ok(());
            }
            Err(err) => tried.push(format!("via {gateway}: {err}")),
        }
    }
    if tried.is_empty() {
        tried.push("the node has no IPv4 address".to_owned());
    }
    Err(PeerRouteError::Unroutable {
        node: wanted.node.clone(),
        subnet,
        tried: tried.join("; "),
    })
}

/// Keeps the routes to the other nodes' subnets in line with `control`'s nodes until `stop`:
/// after every change of the nodes and every [`RESYNC_INTERVAL`]. Each failure is logged
/// once, until it changes or is resolved.
pub async fn follow(control: Arc<ControlPlane>, mut stop: watch::Receiver<bool>) {
    let mut changes = control.subscribe();
    let mut logged: BTreeMap<Subnet, String> = BTreeMap::new();
    let mut applied: Option<Vec<Peer>> = None;
    let mut resync = true;
    loop {
        let peers = control.peers();
        if resync || applied.as_ref() != Some(&peers) || !logged.is_empty() {
            let listed = peers.clone();
            match tokio::task::spawn_blocking(move || reconcile(&listed)).await {
                Ok(Ok(failed)) => {
                    let failed: BTreeMap<Subnet, String> = failed
                        .into_iter()
                        .map(|(subnet, err)| (subnet, err.to_string()))
                        .collect();
                    for (subnet, error) in &failed {
                        if logged.get(subnet) != Some(error) {
                            tracing::error!(%subnet, %error, "no route to another node's instances");
                        }
                    }
                    logged = failed;
                    applied = Some(peers);
                }
                Ok(Err(error)) => {
                    tracing::error!(%error, "cannot read the routes to other nodes' instances")
                }
                Err(error) => tracing::error!(%error, "the route update task failed"),
            }
        }
        resync = false;
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(RESYNC_INTERVAL) => resync = true,
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(text: &str) -> Subnet {
        Subnet::parse(text).unwrap()
    }

    fn peer(name: &str, addresses: &[&str], net: &str) -> Peer {
        Peer {
            name: name.to_owned(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            subnet: subnet(net),
            cluster_addr: None,
            alive: true,
        }
    }

    #[test]
    fn every_peer_is_routed_via_its_ipv4_addresses() {
        let wanted = wanted(&[
            peer(
                "node1",
                &["fd00::1", "10.95.0.2", "10.96.0.2"],
                "10.88.1.0/24",
            ),
            peer("node2", &["fd00::2"], "10.88.2.0/24"),
        ]);
        assert_eq!(
            wanted[&subnet("10.88.1.0/24")].gateways,
            [
                "10.95.0.2".parse::<Ipv4Addr>().unwrap(),
                "10.96.0.2".parse().unwrap()
            ]
        );
        assert!(wanted[&subnet("10.88.2.0/24")].gateways.is_empty());
    }

    #[test]
    fn routes_are_read_from_ip_json() {
        let listing = r#"[{"dst":"10.88.1.0/24","gateway":"10.95.0.2","dev":"eth0","protocol":"109","flags":[]},
            {"dst":"10.88.2.0/24","dev":"eth0","protocol":"109","flags":[]},
            {"dst":"10.88.3.7","gateway":"10.95.0.4","dev":"eth0","flags":[]},
            {"dst":"default","gateway":"10.95.0.254","dev":"eth0","flags":[]}]"#;
        let routes = parse_routes(listing).unwrap();
        assert_eq!(
            routes,
            BTreeMap::from([
                (subnet("10.88.1.0/24"), Some("10.95.0.2".parse().unwrap())),
                (subnet("10.88.2.0/24"), None),
            ])
        );
        // `ip -j` prints nothing at all for an empty table on some versions.
        assert!(parse_routes("").unwrap().is_empty());
        assert!(parse_routes("{").is_err());
    }

    #[test]
    fn the_plan_deletes_unwanted_routes_and_replaces_wrong_or_missing_ones() {
        let current = BTreeMap::from([
            // Right gateway: kept.
            (subnet("10.88.1.0/24"), Some("10.95.0.2".parse().unwrap())),
            // The node's address changed.
            (subnet("10.88.2.0/24"), Some("10.95.0.9".parse().unwrap())),
            // The node was removed.
            (subnet("10.88.4.0/24"), Some("10.95.0.5".parse().unwrap())),
        ]);
        let wanted = wanted(&[
            peer("node1", &["10.95.0.2"], "10.88.1.0/24"),
            peer("node2", &["10.95.0.3"], "10.88.2.0/24"),
            peer("node3", &["10.95.0.4"], "10.88.3.0/24"),
        ]);
        let changes = plan(&current, &wanted);
        assert_eq!(
            changes,
            [
                Change::Delete {
                    subnet: subnet("10.88.4.0/24")
                },
                Change::Replace {
                    subnet: subnet("10.88.2.0/24"),
                    wanted: wanted[&subnet("10.88.2.0/24")].clone()
                },
                Change::Replace {
                    subnet: subnet("10.88.3.0/24"),
                    wanted: wanted[&subnet("10.88.3.0/24")].clone()
                },
            ]
        );
        let routed = BTreeMap::from([
            (subnet("10.88.1.0/24"), Some("10.95.0.2".parse().unwrap())),
            (subnet("10.88.2.0/24"), Some("10.95.0.3".parse().unwrap())),
            (subnet("10.88.3.0/24"), Some("10.95.0.4".parse().unwrap())),
        ]);
        assert!(plan(&routed, &wanted).is_empty());
    }
}
