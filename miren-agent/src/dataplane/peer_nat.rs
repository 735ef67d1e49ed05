//! [`PeerNat`]: node-port flows to an instance on another node. The data plane DNATs such a
//! flow to the instance's address, which the kernel routes to the instance's node (see
//! `peer_routes`); on the way out the flow is masqueraded to this node's address (like
//! kube-proxy's Cluster policy), so the instance's replies come back here, where conntrack
//! translates them back and the client gets them from the node address and node port it
//! used. Flows to local instances keep the client's address. IPv6 flows (to an instance's
//! IPv6 address in another node's /80) are masqueraded the same way, to this node's IPv6
//! address.
//!
//! One nftables table of its own, `inet miren_peer_nat`, beside either data plane: the sets
//! `peer_subnets` (the other nodes' IPv4 sandbox subnets) and `peer_subnets6` (their IPv6
//! /80s), and one postrouting NAT rule per family, which depends on the data plane:
//! - nftables: flows it DNATed (`ct status dnat`) leaving toward a peer subnet;
//! - XDP: packets that came in on an XDP interface and leave toward a peer subnet (XDP
//!   rewrites the destination before the kernel sees the packet, so conntrack knows only the
//!   instance's address). XDP lets the replies pass untouched (a packet from a backend's own
//!   address and port is never a client); the TC program reverse-NATs them once conntrack has
//!   translated them back to the client.
//!
//! Starting either data plane replaces the table (so the other plane's rules go), keeping
//! the subnets it held (also those of the IPv4-only `ip miren_peer_nat` of earlier agents,
//! which goes in the same transaction): cross-node flows keep working while the agent
//! restarts. The table stays when the agent stops, as the data planes' state does.

use std::{collections::BTreeSet, fmt::Write as _, net::Ipv6Addr, sync::Mutex};

use super::DataplaneError;
use crate::{
    config::{DualStack, Subnet, Subnet6},
    nft_cli,
};

/// Family and name of the table.
const TABLE: &str = "inet miren_peer_nat";
/// The IPv4-only table of earlier agents, replaced by [`TABLE`].
const OLD_TABLE: &str = "ip miren_peer_nat";
/// The set of the other nodes' IPv4 sandbox subnets.
const SET: &str = "peer_subnets";
/// The set of the other nodes' IPv6 /80s.
const SET6: &str = "peer_subnets6";

/// The other nodes' sandbox subnets: IPv4, and their IPv6 /80s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSubnets {
    /// IPv4 sandbox subnets.
    pub v4: BTreeSet<Subnet>,
    /// IPv6 /80s.
    pub v6: BTreeSet<Subnet6>,
}

impl PeerSubnets {
    /// The nodes' IPv4 `subnets` with, given `dual_stack`, each one's /80 (none for a subnet
    /// outside `--sandbox-subnet`).
    pub fn new(subnets: impl IntoIterator<Item = Subnet>, dual_stack: Option<&DualStack>) -> Self {
        let v4: BTreeSet<Subnet> = subnets.into_iter().collect();
        let v6 = dual_stack
            .into_iter()
            .flat_map(|dual| {
                v4.iter()
                    .filter(|subnet| dual.v4.contains(subnet.network))
                    .map(|subnet| dual.node_subnet6(*subnet))
            })
            .collect();
        Self { v4, v6 }
    }
}

/// Which packets leaving toward another node's instances are masqueraded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Masquerade {
    /// Node-port flows the kernel DNATed (the nftables data plane).
    Dnated,
    /// Packets that came in on these interfaces (the XDP data plane's).
    ArrivedOn(Vec<String>),
}

impl Masquerade {
    /// The rules of the postrouting chain, IPv4 then IPv6.
    fn rules(&self) -> Result<[String; 2], String> {
        let matched = match self {
            Self::Dnated => "ct status dnat".to_owned(),
            Self::ArrivedOn(ifaces) => {
                let names = ifaces
                    .iter()
                    .map(|iface| {
                        nft_cli::check_ifname(iface)?;
                        Ok(format!("\"{iface}\""))
                    })
                    .collect::<Result<Vec<String>, String>>()?;
                format!("iifname {{ {} }}", names.join(", "))
            }
        };
        Ok([
            format!("{matched} ip daddr @{SET} masquerade"),
            format!("{matched} ip6 daddr @{SET6} masquerade"),
        ])
    }
}

/// The cross-node masquerade: its table and the subnets it holds.
#[derive(Debug)]
pub struct PeerNat {
    subnets: Mutex<PeerSubnets>,
}

impl PeerNat {
    /// Replaces the table (and an earlier agent's IPv4-only one) with one masquerading
    /// `masquerade`'s packets, keeping the peer subnets the earlier tables held, in one
    /// transaction.
    ///
    /// # Errors
    /// [`DataplaneError::Command`] when an interface name is invalid or `nft` refuses (nothing
    /// changed); [`DataplaneError::Io`] when `nft` cannot run.
    pub fn open(masquerade: &Masquerade) -> Result<Self, DataplaneError> {
        let op = "creating the cross-node masquerade (nftables table inet miren_peer_nat)";
        let command = |detail| DataplaneError::Command {
            op: op.to_owned(),
            detail,
        };
        let [rule, rule6] = masquerade.rules().map_err(command)?;
        let mut kept = PeerSubnets::default();
        for table in [OLD_TABLE, TABLE] {
            let (family, name) = table.split_once(' ').expect("family and name");
            let listing = nft_cli::list_json(&["table", family, name])
                .map_err(io_error(op))?
                .map_err(command)?;
            if let Some(listing) = listing {
                kept.v4
                    .extend(nft_cli::set_prefixes(&listing).map_err(command)?);
                kept.v6.extend(set_prefixes6(&listing).map_err(command)?);
            }
        }
        let mut script = format!(
            "table {OLD_TABLE}\n\
             delete table {OLD_TABLE}\n\
             table {TABLE}\n\
             delete table {TABLE}\n\
             table {TABLE} {{\n\
             \tset {SET} {{ type ipv4_addr; flags interval; }}\n\
             \tset {SET6} {{ type ipv6_addr; flags interval; }}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\t{rule}\n\
             \t\t{rule6}\n\
             \t}}\n\
             }}\n"
        );
        script.push_str(&changes(&PeerSubnets::default(), &kept));
        apply(op, &script)?;
        Ok(Self {
            subnets: Mutex::new(kept),
        })
    }

    /// Makes `subnets` the other nodes' sandbox subnets, in one transaction (none when they
    /// did not change).
    ///
    /// # Errors
    /// [`DataplaneError::Command`] when `nft` refuses (nothing changed); [`DataplaneError::Io`]
    /// when `nft` cannot run.
    pub fn set_peer_subnets(&self, subnets: &PeerSubnets) -> Result<(), DataplaneError> {
        let mut current = self.subnets.lock().unwrap_or_else(|p| p.into_inner());
        let script = changes(&current, subnets);
        if !script.is_empty() {
            apply("setting the other nodes' subnets to masquerade to", &script)?;
            current.clone_from(subnets);
        }
        Ok(())
    }
}

/// The IPv6 prefix elements (`ADDR/N`) of the sets of an `nft -j list` listing.
fn set_prefixes6(listing: &str) -> Result<BTreeSet<Subnet6>, String> {
    Ok(nft_cli::prefix_elements(listing)?
        .into_iter()
        .filter_map(|(addr, prefix)| {
            let network: Ipv6Addr = addr.parse().ok()?;
            Some(Subnet6 { network, prefix })
        })
        .collect())
}

/// The element deletions, then additions, that turn `current` into `wanted` (both sets).
fn changes(current: &PeerSubnets, wanted: &PeerSubnets) -> String {
    let mut script = String::new();
    set_changes(&mut script, SET, &current.v4, &wanted.v4);
    set_changes(&mut script, SET6, &current.v6, &wanted.v6);
    script
}

/// The element deletions, then additions, of set `set` that turn `current` into `wanted`.
fn set_changes<T: Ord + ToString>(
    script: &mut String,
    set: &str,
    current: &BTreeSet<T>,
    wanted: &BTreeSet<T>,
) {
    for (verb, subnets) in [
        ("delete", current.difference(wanted)),
        ("add", wanted.difference(current)),
    ] {
        let subnets: Vec<String> = subnets.map(ToString::to_string).collect();
        if !subnets.is_empty() {
            let _ = writeln!(
                script,
                "{verb} element {TABLE} {set} {{ {} }}",
                subnets.join(", ")
            );
        }
    }
}

/// Runs `script` as one `nft -f -` transaction.
fn apply(op: &str, script: &str) -> Result<(), DataplaneError> {
    nft_cli::run(&["-f", "-"], Some(script))
        .map_err(io_error(op))?
        .map_err(|detail| DataplaneError::Command {
            op: op.to_owned(),
            detail,
        })?;
    Ok(())
}

/// `nft` could not run while doing `op`.
fn io_error(op: &str) -> impl FnOnce(nft_cli::NftIoError) -> DataplaneError {
    move |e| DataplaneError::Io {
        op: format!("{op}: {}", e.what),
        source: e.source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnets(list: &[&str]) -> BTreeSet<Subnet> {
        list.iter().map(|s| Subnet::parse(s).unwrap()).collect()
    }

    fn dual() -> DualStack {
        DualStack {
            v4: Subnet::parse("10.88.0.0/16").unwrap(),
            node_prefix: 24,
            v6: Subnet6::parse(crate::settings::DEFAULT_SANDBOX_SUBNET6).unwrap(),
        }
    }

    #[test]
    fn each_data_plane_masquerades_its_own_packets_of_both_families() {
        assert_eq!(
            Masquerade::Dnated.rules().unwrap(),
            [
                "ct status dnat ip daddr @peer_subnets masquerade",
                "ct status dnat ip6 daddr @peer_subnets6 masquerade"
            ]
        );
        assert_eq!(
            Masquerade::ArrivedOn(vec!["eth0".into(), "eth1".into()])
                .rules()
                .unwrap(),
            [
                "iifname { \"eth0\", \"eth1\" } ip daddr @peer_subnets masquerade",
                "iifname { \"eth0\", \"eth1\" } ip6 daddr @peer_subnets6 masquerade"
            ]
        );
        let err = Masquerade::ArrivedOn(vec!["x\" accept".into()])
            .rules()
            .unwrap_err();
        assert!(err.contains("is not an interface name"), "{err}");
    }

    #[test]
    fn peer_subnets_get_their_slash_80s_with_dual_stack() {
        let nodes = subnets(&["10.88.1.0/24", "10.88.2.0/24", "10.99.0.0/24"]);
        let v4_only = PeerSubnets::new(nodes.clone(), None);
        assert_eq!(v4_only.v4, nodes);
        assert!(v4_only.v6.is_empty());
        let dual = PeerSubnets::new(nodes.clone(), Some(&dual()));
        assert_eq!(dual.v4, nodes);
        let v6: Vec<String> = dual.v6.iter().map(ToString::to_string).collect();
        // 10.99.0.0/24 is outside --sandbox-subnet: no /80.
        assert_eq!(v6, ["fd6d:6972:656e:0:1::/80", "fd6d:6972:656e:0:2::/80"]);
    }

    #[test]
    fn changes_delete_before_they_add_and_nothing_when_equal() {
        let current = PeerSubnets::new(subnets(&["10.88.1.0/24", "10.88.2.0/24"]), Some(&dual()));
        let wanted = PeerSubnets::new(subnets(&["10.88.2.0/24", "10.88.3.0/24"]), Some(&dual()));
        assert_eq!(
            changes(&current, &wanted),
            "delete element inet miren_peer_nat peer_subnets { 10.88.1.0/24 }\n\
             add element inet miren_peer_nat peer_subnets { 10.88.3.0/24 }\n\
             delete element inet miren_peer_nat peer_subnets6 { fd6d:6972:656e:0:1::/80 }\n\
             add element inet miren_peer_nat peer_subnets6 { fd6d:6972:656e:0:3::/80 }\n"
        );
        assert_eq!(changes(&wanted, &wanted), "");
    }

    #[test]
    fn ipv6_prefixes_are_read_back_from_a_listing() {
        let listing = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "miren_peer_nat", "handle": 3}},
            {"set": {"family": "inet", "name": "peer_subnets", "table": "miren_peer_nat",
              "type": "ipv4_addr", "flags": ["interval"],
              "elem": [{"prefix": {"addr": "10.88.1.0", "len": 24}}]}},
            {"set": {"family": "inet", "name": "peer_subnets6", "table": "miren_peer_nat",
              "type": "ipv6_addr", "flags": ["interval"],
              "elem": [{"prefix": {"addr": "fd6d:6972:656e:0:1::", "len": 80}}]}}]}"#;
        let v6: Vec<String> = set_prefixes6(listing)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(v6, ["fd6d:6972:656e:0:1::/80"]);
        assert_eq!(
            nft_cli::set_prefixes(listing).unwrap(),
            subnets(&["10.88.1.0/24"])
        );
        assert!(set_prefixes6("{").is_err());
    }
}
