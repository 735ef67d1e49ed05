//! Routes to the other nodes' sandbox subnets, host-gateway style: the nodes share an L2
//! segment, so a node's instances are reached through that node's own address. For every
//! other node the agent keeps `SUBNET via NODE_IP proto 109` in the main routing table of its
//! network namespace, and with dual stack (this node has an IPv6 `--node-ip`) also the node's
//! IPv6 /80 ([`DualStack::node_subnet6`] of its subnet, as every agent derives it) via the
//! node's IPv6 address; routes of protocol [`ROUTE_PROTOCOL`] of either family that are no
//! longer wanted (a node removed with `miren node rm`) are deleted. The routes stay when the
//! agent stops (instances outlive it, and so do flows to them); a restarted agent reconciles
//! them. [`follow`] reconciles after every change of the nodes and every [`RESYNC_INTERVAL`]
//! (repairing routes removed behind the agent's back).

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv6Addr},
    process::Command,
    sync::Arc,
    time::Duration,
};

use serde_json::Value;
use tokio::sync::watch;

use crate::{
    config::{DualStack, Subnet, Subnet6},
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
        "cannot route node \"{node}\"'s instances ({subnet}): {tried}; the nodes must share an L2 segment (host-gateway routing): start each agent with a --node-ip of each family on the network the nodes share"
    )]
    Unroutable {
        /// The node.
        node: String,
        /// Its sandbox subnet or IPv6 /80.
        subnet: Destination,
        /// What each of its addresses answered, or that it has no address of the family.
        tried: String,
    },
}

/// Where a route of this module leads: a node's IPv4 sandbox subnet or its IPv6 /80.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Destination {
    /// An IPv4 sandbox subnet.
    V4(Subnet),
    /// An IPv6 sandbox /80.
    V6(Subnet6),
}

impl Destination {
    /// Reads `A.B.C.D/N` or `IPV6/N` (as `ip -j route` prints a route's `dst`).
    fn parse(text: &str) -> Option<Self> {
        if !text.contains(':') {
            return Subnet::parse(text).ok().map(Self::V4);
        }
        let (addr, prefix) = text.split_once('/')?;
        let addr: Ipv6Addr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok().filter(|p| (1..=128).contains(p))?;
        let network = Ipv6Addr::from(u128::from(addr) & (u128::MAX << (128 - prefix)));
        Some(Self::V6(Subnet6 { network, prefix }))
    }

    /// Whether `gateway` is of this destination's family.
    fn family_of(self, gateway: IpAddr) -> bool {
        matches!(
            (self, gateway),
            (Self::V4(_), IpAddr::V4(_)) | (Self::V6(_), IpAddr::V6(_))
        )
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(subnet) => subnet.fmt(f),
            Self::V6(subnet) => subnet.fmt(f),
        }
    }
}

/// A route wanted to another node's subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    /// The node's name (for messages).
    node: String,
    /// Its addresses of the destination's family, in the order they are tried as the gateway.
    gateways: Vec<IpAddr>,
}

/// A change to the routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    /// Route `subnet` via the first of `wanted.gateways` that works.
    Replace { subnet: Destination, wanted: Wanted },
    /// Delete the route to `subnet`.
    Delete { subnet: Destination },
}

/// The routes wanted to `peers`' subnets, and with `dual_stack` to their IPv6 /80s.
fn wanted(peers: &[Peer], dual_stack: Option<&DualStack>) -> BTreeMap<Destination, Wanted> {
    peers
        .iter()
        .flat_map(|peer| {
            let v6 = dual_stack
                .filter(|dual| dual.v4.contains(peer.subnet.network))
                .map(|dual| Destination::V6(dual.node_subnet6(peer.subnet)));
            std::iter::once(Destination::V4(peer.subnet))
                .chain(v6)
                .map(move |subnet| {
                    let gateways = peer
                        .addresses
                        .iter()
                        .copied()
                        .filter(|addr| subnet.family_of(*addr))
                        .collect();
                    let wanted = Wanted {
                        node: peer.name.clone(),
                        gateways,
                    };
                    (subnet, wanted)
                })
        })
        .collect()
}

/// The routes of an `ip -j route show proto 109` listing (either family): destination →
/// gateway. Entries that are not subnets this module writes are left out (and left alone).
fn parse_routes(listing: &str) -> Result<BTreeMap<Destination, Option<IpAddr>>, PeerRouteError> {
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
            let subnet = Destination::parse(route["dst"].as_str()?)?;
            let gateway = route["gateway"].as_str().and_then(|g| g.parse().ok());
            Some((subnet, gateway))
        })
        .collect())
}

/// The changes that turn `current` into `wanted`: a route whose gateway is one of the node's
/// addresses is kept.
fn plan(
    current: &BTreeMap<Destination, Option<IpAddr>>,
    wanted: &BTreeMap<Destination, Wanted>,
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

/// Makes the routes of protocol [`ROUTE_PROTOCOL`] match `peers` (blocking: runs `ip`), with
/// `dual_stack` their IPv6 /80s too (IPv6 routes are listed, and unwanted ones deleted, where
/// IPv6 is on). Returns the destinations that could not be routed, each with why; the others
/// are applied.
///
/// # Errors
/// [`PeerRouteError`] when the routes cannot be listed.
pub fn reconcile(
    peers: &[Peer],
    dual_stack: Option<&DualStack>,
) -> Result<Vec<(Destination, PeerRouteError)>, PeerRouteError> {
    let proto = ROUTE_PROTOCOL.to_string();
    let mut current = parse_routes(&ip(&["-j", "-4", "route", "show", "proto", &proto])?)?;
    if crate::sandbox::net::ipv6_enabled() {
        current.extend(parse_routes(&ip(&[
            "-j", "-6", "route", "show", "proto", &proto,
        ])?)?);
    }
    let mut failed = Vec::new();
    for change in plan(&current, &wanted(peers, dual_stack)) {
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
fn route(subnet: Destination, wanted: &Wanted, proto: &str) -> Result<(), PeerRouteError> {
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
        let family = match subnet {
            Destination::V4(_) => "IPv4",
            Destination::V6(_) => "IPv6",
        };
        tried.push(format!("the node has no {family} address"));
    }
    Err(PeerRouteError::Unroutable {
        node: wanted.node.clone(),
        subnet,
        tried: tried.join("; "),
    })
}

/// Keeps the routes to the other nodes' subnets (with `dual_stack`, and their /80s) in line
/// with `control`'s nodes until `stop`: after every change of the nodes and every
/// [`RESYNC_INTERVAL`]. Each failure is logged once, until it changes or is resolved.
pub async fn follow(
    control: Arc<ControlPlane>,
    dual_stack: Option<DualStack>,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = control.subscribe();
    let mut logged: BTreeMap<Destination, String> = BTreeMap::new();
    let mut applied: Option<Vec<Peer>> = None;
    let mut resync = true;
    loop {
        let peers = control.peers();
        if resync || applied.as_ref() != Some(&peers) || !logged.is_empty() {
            let listed = peers.clone();
            match tokio::task::spawn_blocking(move || reconcile(&listed, dual_stack.as_ref())).await
            {
                Ok(Ok(failed)) => {
                    let failed: BTreeMap<Destination, String> = failed
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

    fn v4(text: &str) -> Destination {
        Destination::V4(subnet(text))
    }

    fn v6(text: &str) -> Destination {
        Destination::parse(text).unwrap()
    }

    fn addr(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn peer(name: &str, addresses: &[&str], net: &str) -> Peer {
        Peer {
            name: name.to_owned(),
            addresses: addresses.iter().map(|a| addr(a)).collect(),
            subnet: subnet(net),
            cluster_addr: None,
            alive: true,
        }
    }

    fn dual() -> DualStack {
        DualStack {
            v4: subnet("10.88.0.0/16"),
            node_prefix: 24,
            v6: Subnet6::parse(crate::settings::DEFAULT_SANDBOX_SUBNET6).unwrap(),
        }
    }

    #[test]
    fn every_peer_is_routed_via_its_addresses_of_each_family() {
        let peers = [
            peer(
                "node1",
                &["fd00::1", "10.95.0.2", "10.96.0.2"],
                "10.88.1.0/24",
            ),
            peer("node2", &["fd00::2"], "10.88.2.0/24"),
        ];
        let wanted4 = wanted(&peers, None);
        assert_eq!(
            wanted4.keys().copied().collect::<Vec<_>>(),
            [v4("10.88.1.0/24"), v4("10.88.2.0/24")]
        );
        assert_eq!(
            wanted4[&v4("10.88.1.0/24")].gateways,
            [addr("10.95.0.2"), addr("10.96.0.2")]
        );
        assert!(wanted4[&v4("10.88.2.0/24")].gateways.is_empty());

        // Dual stack: each node's /80 too, via its IPv6 addresses.
        let dual = dual();
        let wanted = wanted(&peers, Some(&dual));
        assert_eq!(wanted.len(), 4);
        let node1 = v6("fd6d:6972:656e:0:1::/80");
        assert_eq!(wanted[&node1].gateways, [addr("fd00::1")]);
        assert_eq!(wanted[&node1].node, "node1");
        assert_eq!(
            wanted[&v6("fd6d:6972:656e:0:2::/80")].gateways,
            [addr("fd00::2")]
        );
        // A subnet outside --sandbox-subnet (other settings) has no /80.
        let stray = [peer("node3", &["fd00::3"], "10.99.3.0/24")];
        assert_eq!(wanted_keys(&stray, &dual), [v4("10.99.3.0/24")]);
    }

    fn wanted_keys(peers: &[Peer], dual: &DualStack) -> Vec<Destination> {
        wanted(peers, Some(dual)).into_keys().collect()
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
                (v4("10.88.1.0/24"), Some(addr("10.95.0.2"))),
                (v4("10.88.2.0/24"), None),
            ])
        );
        let listing6 = r#"[{"dst":"fd6d:6972:656e:0:1::/80","gateway":"fd00:95::2","dev":"eth0","protocol":"109","metric":1024,"flags":[],"pref":"medium"},
            {"dst":"fd00:95::/64","dev":"eth0","protocol":"kernel","metric":256,"flags":[],"pref":"medium"}]"#;
        assert_eq!(
            parse_routes(listing6).unwrap(),
            BTreeMap::from([
                (v6("fd6d:6972:656e:0:1::/80"), Some(addr("fd00:95::2"))),
                (v6("fd00:95::/64"), None),
            ])
        );
        assert_eq!(
            v6("fd6d:6972:656e:0:1::/80").to_string(),
            "fd6d:6972:656e:0:1::/80"
        );
        assert_eq!(Destination::parse("fd00::/129"), None);
        // `ip -j` prints nothing at all for an empty table on some versions.
        assert!(parse_routes("").unwrap().is_empty());
        assert!(parse_routes("{").is_err());
    }

    #[test]
    fn the_plan_deletes_unwanted_routes_and_replaces_wrong_or_missing_ones() {
        let current = BTreeMap::from([
            // Right gateway: kept.
            (v4("10.88.1.0/24"), Some(addr("10.95.0.2"))),
            (v6("fd6d:6972:656e:0:1::/80"), Some(addr("fd00::2"))),
            // The node's address changed.
            (v4("10.88.2.0/24"), Some(addr("10.95.0.9"))),
            (v6("fd6d:6972:656e:0:2::/80"), Some(addr("fd00::9"))),
            // The node was removed.
            (v4("10.88.4.0/24"), Some(addr("10.95.0.5"))),
            (v6("fd6d:6972:656e:0:4::/80"), Some(addr("fd00::5"))),
        ]);
        let dual = dual();
        let wanted = wanted(
            &[
                peer("node1", &["10.95.0.2", "fd00::2"], "10.88.1.0/24"),
                peer("node2", &["10.95.0.3", "fd00::3"], "10.88.2.0/24"),
                peer("node3", &["10.95.0.4", "fd00::4"], "10.88.3.0/24"),
            ],
            Some(&dual),
        );
        let changes = plan(&current, &wanted);
        let replace = |d: Destination| Change::Replace {
            subnet: d,
            wanted: wanted[&d].clone(),
        };
        assert_eq!(
            changes,
            [
                Change::Delete {
                    subnet: v4("10.88.4.0/24")
                },
                Change::Delete {
                    subnet: v6("fd6d:6972:656e:0:4::/80")
                },
                replace(v4("10.88.2.0/24")),
                replace(v4("10.88.3.0/24")),
                replace(v6("fd6d:6972:656e:0:2::/80")),
                replace(v6("fd6d:6972:656e:0:3::/80")),
            ]
        );
        let routed: BTreeMap<Destination, Option<IpAddr>> = wanted
            .iter()
            .map(|(d, w)| (*d, w.gateways.first().copied()))
            .collect();
        assert!(plan(&routed, &wanted).is_empty());
    }
}
