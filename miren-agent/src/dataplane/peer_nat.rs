//! [`PeerNat`]: node-port flows to an instance on another node. The data plane DNATs such a
//! flow to the instance's address, which the kernel routes to the instance's node (see
//! `peer_routes`); on the way out the flow is masqueraded to this node's address (like
//! kube-proxy's Cluster policy), so the instance's replies come back here, where conntrack
//! translates them back and the client gets them from the node address and node port it
//! used. Flows to local instances keep the client's address.
//!
//! One nftables table of its own, `ip miren_peer_nat`, beside either data plane: the set
//! `peer_subnets` (the other nodes' sandbox subnets) and one postrouting NAT rule, which
//! depends on the data plane:
//! - nftables: flows it DNATed (`ct status dnat`) leaving toward a peer subnet;
//! - XDP: packets that came in on an XDP interface and leave toward a peer subnet (XDP
//!   rewrites the destination before the kernel sees the packet, so conntrack knows only the
//!   instance's address). XDP lets the replies pass untouched (a packet from a backend's own
//!   address and port is never a client); the TC program reverse-NATs them once conntrack has
//!   translated them back to the client.
//!
//! Starting either data plane replaces the table (so the other plane's rule goes), keeping
//! the subnets it held: cross-node flows keep working while the agent restarts. The table
//! stays when the agent stops, as the data planes' state does.

use std::{collections::BTreeSet, fmt::Write as _, sync::Mutex};

use super::DataplaneError;
use crate::{config::Subnet, nft_cli};

/// Family and name of the table.
const TABLE: &str = "ip miren_peer_nat";
/// The set of the other nodes' sandbox subnets.
const SET: &str = "peer_subnets";

/// Which packets leaving toward another node's instances are masqueraded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Masquerade {
    /// Node-port flows the kernel DNATed (the nftables data plane).
    Dnated,
    /// Packets that came in on these interfaces (the XDP data plane's).
    ArrivedOn(Vec<String>),
}

impl Masquerade {
    /// The rule of the postrouting chain.
    fn rule(&self) -> Result<String, String> {
        Ok(match self {
            Self::Dnated => format!("ct status dnat ip daddr @{SET} masquerade"),
            Self::ArrivedOn(ifaces) => {
                let names = ifaces
                    .iter()
                    .map(|iface| {
                        nft_cli::check_ifname(iface)?;
                        Ok(format!("\"{iface}\""))
                    })
                    .collect::<Result<Vec<String>, String>>()?;
                format!(
                    "iifname {{ {} }} ip daddr @{SET} masquerade",
                    names.join(", ")
                )
            }
        })
    }
}

/// The cross-node masquerade: its table and the subnets it holds.
#[derive(Debug)]
pub struct PeerNat {
    subnets: Mutex<BTreeSet<Subnet>>,
}

impl PeerNat {
    /// Replaces the table with one masquerading `masquerade`'s packets, keeping the peer
    /// subnets the earlier table held, in one transaction.
    ///
    /// # Errors
    /// [`DataplaneError::Command`] when an interface name is invalid or `nft` refuses (nothing
    /// changed); [`DataplaneError::Io`] when `nft` cannot run.
    pub fn open(masquerade: &Masquerade) -> Result<Self, DataplaneError> {
        let op = "creating the cross-node masquerade (nftables table ip miren_peer_nat)";
        let command = |detail| DataplaneError::Command {
            op: op.to_owned(),
            detail,
        };
        let rule = masquerade.rule().map_err(command)?;
        let listing = nft_cli::list_json(&["set", "ip", "miren_peer_nat", SET])
            .map_err(io_error(op))?
            .map_err(command)?;
        let kept = match listing {
            Some(listing) => nft_cli::set_prefixes(&listing).map_err(command)?,
            None => BTreeSet::new(),
        };
        let mut script = format!(
            "table {TABLE}\n\
             delete table {TABLE}\n\
             table {TABLE} {{\n\
             \tset {SET} {{ type ipv4_addr; flags interval; }}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\t{rule}\n\
             \t}}\n\
             }}\n"
        );
        script.push_str(&changes(&BTreeSet::new(), &kept));
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
    pub fn set_peer_subnets(&self, subnets: &BTreeSet<Subnet>) -> Result<(), DataplaneError> {
        let mut current = self.subnets.lock().unwrap_or_else(|p| p.into_inner());
        let script = changes(&current, subnets);
        if !script.is_empty() {
            apply("setting the other nodes' subnets to masquerade to", &script)?;
            current.clone_from(subnets);
        }
        Ok(())
    }
}

/// The element deletions, then additions, that turn `current` into `wanted`.
fn changes(current: &BTreeSet<Subnet>, wanted: &BTreeSet<Subnet>) -> String {
    let mut script = String::new();
    for (verb, subnets) in [
        ("delete", current.difference(wanted)),
        ("add", wanted.difference(current)),
    ] {
        let subnets: Vec<String> = subnets.map(ToString::to_string).collect();
        if !subnets.is_empty() {
            let _ = writeln!(
                script,
                "{verb} element {TABLE} {SET} {{ {} }}",
                subnets.join(", ")
            );
        }
    }
    script
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

    #[test]
    fn each_data_plane_masquerades_its_own_packets() {
        assert_eq!(
            Masquerade::Dnated.rule().unwrap(),
            "ct status dnat ip daddr @peer_subnets masquerade"
        );
        assert_eq!(
            Masquerade::ArrivedOn(vec!["eth0".into(), "eth1".into()])
                .rule()
                .unwrap(),
            "iifname { \"eth0\", \"eth1\" } ip daddr @peer_subnets masquerade"
        );
        let err = Masquerade::ArrivedOn(vec!["x\" accept".into()])
            .rule()
            .unwrap_err();
        assert!(err.contains("is not an interface name"), "{err}");
    }

    #[test]
    fn changes_delete_before_they_add_and_nothing_when_equal() {
        let current = subnets(&["10.88.1.0/24", "10.88.2.0/24"]);
        let wanted = subnets(&["10.88.2.0/24", "10.88.3.0/24"]);
        assert_eq!(
            changes(&current, &wanted),
            "delete element ip miren_peer_nat peer_subnets { 10.88.1.0/24 }\n\
             add element ip miren_peer_nat peer_subnets { 10.88.3.0/24 }\n"
        );
        assert_eq!(changes(&wanted, &wanted), "");
    }
}
