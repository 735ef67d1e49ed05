//! Network isolation of sandboxes: two nftables tables of the agent, both named
//! `miren_sandbox` (never `inet miren`, the nft node-port data plane's table, which the XDP data
//! plane deletes when it starts), so the rules are the same whichever data plane runs.
//!
//! - `bridge miren_sandbox` filters frames on the sandbox bridge's instance ports (host veths
//!   named [`net::VETH_PREFIX`]`*`):
//!   - `prerouting` (frames from an instance): IPv4 only with the instance's own source address
//!     (`iifname . ip saddr @veth_addr`), ARP only with the instance's own sender address;
//!     everything else (a spoofed source, IPv6, other ethertypes, a port that is not a member)
//!     is dropped.
//!   - `forward` (bridged from one instance to another): accepted only when both belong to the
//!     same app: the ingress port's app id goes into the packet mark
//!     (`meta mark set iifname map @veth_app`) and the pair `oifname . meta mark` must be in
//!     `@veth_app_set`. Elements grow with the instances, not with their pairs. The rule does
//!     not look at the ethertype, so it covers IPv4, ARP and IPv6 alike.
//!   - `postrouting` (frames to an instance, bridged or from the host): IPv4 only to the
//!     instance's own address (or a broadcast/multicast address), ARP only asking for it, so
//!     an instance that takes over another one's MAC address in the bridge's forwarding table
//!     still never receives its traffic.
//! - `inet miren_sandbox` filters what instances send to and through the host:
//!   - `input` (from the bridge to the host): replies of connections the host opened, DNS on
//!     the bridge address (the agent's resolver) and the public TCP listeners (the ingress's
//!     HTTP and HTTPS ports); everything else (metrics, ssh, …) is dropped.
//!   - `forward` (from the bridge back to the bridge: routed through the host, or bridged with
//!     `br_netfilter`'s `bridge-nf-call-iptables`, on by default in every namespace here):
//!     node-port traffic the nft data plane DNATed (`ct status dnat`) and traffic within one
//!     app (`meta mark set ip saddr map @addr_app`, then `ip daddr . meta mark @addr_app_set`);
//!     everything else is dropped.
//!   - the other nodes' instances (sources in `@peer_subnets`, routed in from another node):
//!     to local instances only from the same app (`addr_app` also maps their addresses, for
//!     the apps that have instances here) or on a node-port flow the nft data plane DNATed;
//!     to the node only the public TCP listeners and replies. The other nodes' own addresses
//!     (their ingress, node-port flows they masqueraded) are not restricted.
//!
//! With IPv6 ([`IsolationSettings::dual_stack`] set) the same policy holds for IPv6, with sets
//! of their own that mirror the IPv4 ones (an instance's IPv6 address is derived from its IPv4
//! one, [`crate::config::DualStack::addr6`]; without IPv6 neither these sets nor these rules
//! exist and instances' IPv6 is dropped as above):
//! - bridge `prerouting`: IPv6 only from the instance's own address
//!   (`iifname . ip6 saddr @veth_addr6`). Neighbor discovery (router and neighbor
//!   solicitations, neighbor advertisements) goes to `neighbor_discovery` first: hop limit 255,
//!   from the instance's own address or a link-local one (`fe80::/10`), and an advertisement
//!   only for the instance's own address (its target, read as raw payload `@th,64,128` since
//!   nft 1.0.6 has no `icmpv6 taddr`, must be in `veth_nd_target`). Router advertisements,
//!   redirects and MLD (queries and reports: no instance becomes the bridge's multicast
//!   querier; without one the bridge floods multicast) are dropped.
//! - bridge `postrouting`: IPv6 only to the instance's own address, a link-local address (its
//!   own; the bridge forward rule keeps other apps' frames away), all-nodes `ff02::1` or a
//!   solicited-node group `ff02::1:ff00:0/104`; a neighbor solicitation only asking for the
//!   instance's own address.
//! - inet `input`: from instances also neighbor discovery to the host (hop limit 255); DNS
//!   stays on the IPv4 bridge address (AAAA questions travel over IPv4), the listener ports
//!   and replies are family-independent rules. `forward`: within one app via `addr_app6` and
//!   `addr_app_set6`, bridged neighbor discovery (hop limit 255, so never routed; the bridge
//!   table already checked its ports' app), node-port flows (`ct status dnat`). The other
//!   nodes' /80s are in `peer_subnets6` ([`crate::config::DualStack::node_subnet6`] of each
//!   peer subnet), their instances of the apps that have instances here in `addr_app6`.
//!
//! Traffic from the host to instances (the ingress, node ports, readiness checks) is not
//! restricted beyond the destination check. Every change is one `nft -f -` transaction covering
//! both tables, so nothing is ever half-applied. [`Isolation::open`] replaces both tables
//! (rules from this code) but keeps the members and peer subnets an earlier agent left in
//! them, so instances that outlive the agent stay reachable and isolated while it restarts
//! (the IPv6 elements are rebuilt from the IPv4 ones read back).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Mutex,
};

use serde_json::Value;

use super::{SandboxError, ipam::Subnet, net};
use crate::{
    config::{DualStack, Subnet6},
    control::ControlPlane,
};

/// Name of both tables (families `bridge` and `inet`).
const TABLE: &str = "miren_sandbox";
/// Most elements per `add element` line.
const ELEMENTS_PER_LINE: usize = 512;
/// The set of the other nodes' sandbox subnets (table `inet miren_sandbox`).
const PEER_SUBNETS: &str = "peer_subnets";
/// The set of the other nodes' IPv6 /80s (with IPv6 only).
const PEER_SUBNETS6: &str = "peer_subnets6";
/// The ICMPv6 neighbor discovery an instance sends (and the host answers).
const NEIGHBOR_DISCOVERY: &str =
    "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert }";
/// The target address of a neighbor solicitation or advertisement (nft 1.0.6 has no
/// `icmpv6 taddr`): 16 bytes after the 8-byte ICMPv6 header.
const ND_TARGET: &str = "@th,64,128";
/// Conditions that make an ARP match read Ethernet/IPv4 addresses at the right offsets.
const ARP_IPV4: &str = "arp htype 1 arp ptype ip arp hlen 6 arp plen 4";

/// What the isolation rules need to know about the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolationSettings {
    /// The sandbox bridge (`--sandbox-bridge`).
    pub bridge: String,
    /// The sandbox subnet (`--sandbox-subnet`); its gateway is the bridge's address, where the
    /// DNS resolver listens.
    pub subnet: Subnet,
    /// How the instances' IPv6 addresses (and the other nodes' IPv6 subnets) mirror their
    /// IPv4 ones; `None` where the node has IPv6 off (then instances send no IPv6).
    pub dual_stack: Option<DualStack>,
    /// TCP ports of the node's public listeners that instances may reach (the ingress's HTTP
    /// and HTTPS ports).
    pub listener_ports: Vec<u16>,
}

/// An instance as the isolation rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The host side of its veth pair (on the bridge, named `mvs…`).
    pub veth: String,
    /// Its address.
    pub addr: Ipv4Addr,
    /// Its app: instances of one app reach each other, no other ones.
    pub app: String,
}

/// The other nodes' instances, as the isolation rules see them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInstances {
    /// The other nodes' sandbox subnets: traffic from them is checked like an instance's.
    pub subnets: BTreeSet<Subnet>,
    /// Instance addresses by app, on any node (only those inside `subnets` are used).
    pub apps: BTreeMap<String, BTreeSet<Ipv4Addr>>,
}

impl PeerInstances {
    /// The other nodes' subnets and every app's ready instances, as `control` sees them.
    pub fn of_cluster(control: &ControlPlane) -> Self {
        let subnets = control.peers().iter().map(|peer| peer.subnet).collect();
        let apps = control
            .app_addresses()
            .into_iter()
            .map(|(app, addrs)| {
                let v4 = addrs
                    .into_iter()
                    .filter_map(|addr| match addr {
                        IpAddr::V4(v4) => Some(v4),
                        IpAddr::V6(_) => None,
                    })
                    .collect();
                (app, v4)
            })
            .collect();
        Self { subnets, apps }
    }
}

/// A member as held in the tables: its address and app id (the packet mark used for it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    addr: Ipv4Addr,
    id: u32,
    /// `None` for a member read back from an earlier agent's tables (the tables hold only
    /// ids), until [`Isolation::retain`] names its app.
    app: Option<String>,
}

/// What the tables hold.
#[derive(Debug, Default)]
struct Tables {
    /// The IPv6 addressing; `None`: the tables have no IPv6 sets.
    dual: Option<DualStack>,
    /// Members by veth.
    members: BTreeMap<String, Entry>,
    /// The other nodes' instances, as last set (the subnets are `peer_subnets`).
    peers: PeerInstances,
    /// The other nodes' instances in `addr_app`: address → the id of their app here.
    remote: BTreeMap<Ipv4Addr, u32>,
}

impl Tables {
    /// The script that turns these tables into `next`'s, deletions first; `retain` flushed
    /// every member set (the remote entries with them) before.
    fn peer_changes(&self, next: &Self, flushed: bool) -> String {
        let mut script = String::new();
        let empty = BTreeMap::new();
        let remote = if flushed { &empty } else { &self.remote };
        let gone_subnets = self.peers.subnets.difference(&next.peers.subnets);
        let gone_remote = remote
            .iter()
            .filter(|(a, id)| next.remote.get(a) != Some(id));
        elements_line(&mut script, "delete", PEER_SUBNETS, gone_subnets);
        elements_line(
            &mut script,
            "delete",
            "addr_app",
            gone_remote.map(remote_elem),
        );
        if let Some(dual) = &next.dual {
            let gone_subnets = self.peers.subnets.difference(&next.peers.subnets);
            let gone_remote = remote
                .iter()
                .filter(|(a, id)| next.remote.get(a) != Some(id));
            let gone_subnets6 = gone_subnets.filter_map(|s| subnet6(dual, s));
            elements_line(&mut script, "delete", PEER_SUBNETS6, gone_subnets6);
            let gone_remote6 = gone_remote.filter_map(|e| remote_elem6(dual, e));
            elements_line(&mut script, "delete", "addr_app6", gone_remote6);
        }
        let new_subnets = next.peers.subnets.difference(&self.peers.subnets);
        let new_remote = next
            .remote
            .iter()
            .filter(|(a, id)| remote.get(a) != Some(id));
        elements_line(&mut script, "add", PEER_SUBNETS, new_subnets.clone());
        elements_line(
            &mut script,
            "add",
            "addr_app",
            new_remote.clone().map(remote_elem),
        );
        if let Some(dual) = &next.dual {
            let new_subnets6 = new_subnets.filter_map(|s| subnet6(dual, s));
            elements_line(&mut script, "add", PEER_SUBNETS6, new_subnets6);
            let new_remote6 = new_remote.filter_map(|e| remote_elem6(dual, e));
            elements_line(&mut script, "add", "addr_app6", new_remote6);
        }
        script
    }

    /// These tables with `members` and `peers`, and the remote entries they imply.
    fn with(&self, members: BTreeMap<String, Entry>, peers: PeerInstances) -> Self {
        let remote = remote_entries(&members, &peers);
        Self {
            dual: self.dual,
            members,
            peers,
            remote,
        }
    }
}

/// The sandbox firewall: both `miren_sandbox` tables and what they hold.
#[derive(Debug)]
pub struct Isolation {
    tables: Mutex<Tables>,
}

impl Isolation {
    /// Creates both tables with the rules for `settings`, replacing any earlier version of them
    /// in the same transaction and keeping the members (with their app ids) and peer subnets
    /// they held, so an earlier agent's instances stay reachable until [`Isolation::retain`]
    /// sets the exact set, and the other nodes' instances stay restricted until
    /// [`Isolation::set_peers`] names them again.
    ///
    /// # Errors
    /// [`SandboxError::Firewall`] when a name is not an interface name or `nft` fails (then
    /// nothing changed); [`SandboxError::Io`] when `nft` cannot run.
    pub fn open(settings: &IsolationSettings) -> Result<Self, SandboxError> {
        let op = "creating the sandbox firewall (nftables tables miren_sandbox)";
        check_ifname(op, &settings.bridge)?;
        let kept = list(op, &["table", "bridge", TABLE], parse_members)?;
        let subnets = list(
            op,
            &["set", "inet", TABLE, PEER_SUBNETS],
            crate::nft_cli::set_prefixes,
        )?;
        let empty = Tables {
            dual: settings.dual_stack,
            ..Tables::default()
        };
        let tables = empty.with(
            kept,
            PeerInstances {
                subnets,
                apps: BTreeMap::new(),
            },
        );
        let mut script = tables_script(settings);
        script.push_str(&add_elements(tables.dual.as_ref(), tables.members.iter()));
        script.push_str(&empty.peer_changes(&tables, false));
        apply(op, &script)?;
        if !tables.members.is_empty() {
            tracing::info!(
                members = tables.members.len(),
                "kept the sandbox firewall members of an earlier agent"
            );
        }
        Ok(Self {
            tables: Mutex::new(tables),
        })
    }

    /// Lets `member` talk to its app's other instances (on this node and, once
    /// [`Isolation::set_peers`] named them, on the others) and nothing else (call before its
    /// process starts; until then its veth passes nothing). Admitting a member again replaces
    /// its address and app.
    ///
    /// # Errors
    /// [`SandboxError::Firewall`] for a bad veth name or when `nft` fails (nothing changed);
    /// [`SandboxError::Io`] when `nft` cannot run.
    pub fn admit(&self, member: &Member) -> Result<(), SandboxError> {
        let op = format!(
            "admitting {} ({}) to the sandbox firewall",
            member.veth, member.addr
        );
        check_ifname(&op, &member.veth)?;
        let mut tables = lock(&self.tables);
        let entry = Entry {
            addr: member.addr,
            id: app_id(&tables.members, &member.veth, &member.app),
            app: Some(member.app.clone()),
        };
        let dual = tables.dual;
        let mut script = String::new();
        if let Some(old) = tables.members.get(&member.veth) {
            script.push_str(&delete_elements(dual.as_ref(), &member.veth, old));
        }
        script.push_str(&add_elements(
            dual.as_ref(),
            [(&member.veth, &entry)].into_iter(),
        ));
        let mut members = tables.members.clone();
        members.insert(member.veth.clone(), entry);
        let next = tables.with(members, tables.peers.clone());
        script.push_str(&tables.peer_changes(&next, false));
        apply(&op, &script)?;
        *tables = next;
        Ok(())
    }

    /// Forgets the member on `veth` (call once its process is gone; a veth that is not a
    /// member passes nothing). Unknown veths are ignored.
    ///
    /// # Errors
    /// [`SandboxError::Firewall`] when `nft` fails (nothing changed); [`SandboxError::Io`] when
    /// `nft` cannot run.
    pub fn remove(&self, veth: &str) -> Result<(), SandboxError> {
        let mut tables = lock(&self.tables);
        let Some(old) = tables.members.get(veth) else {
            return Ok(());
        };
        let mut script = delete_elements(tables.dual.as_ref(), veth, old);
        let mut members = tables.members.clone();
        members.remove(veth);
        let next = tables.with(members, tables.peers.clone());
        script.push_str(&tables.peer_changes(&next, false));
        apply(
            &format!("removing {veth} from the sandbox firewall"),
            &script,
        )?;
        *tables = next;
        Ok(())
    }

    /// Makes `members` the exact set of members, with fresh app ids, in one transaction (at
    /// start, with the instances the runner adopted).
    ///
    /// # Errors
    /// [`SandboxError::Firewall`] for a bad veth name or when `nft` fails (nothing changed);
    /// [`SandboxError::Io`] when `nft` cannot run.
    pub fn retain(&self, members: &[Member]) -> Result<(), SandboxError> {
        let op = "setting the members of the sandbox firewall";
        for member in members {
            check_ifname(op, &member.veth)?;
        }
        let mut tables = lock(&self.tables);
        let next = tables.with(assign_ids(members), tables.peers.clone());
        let mut script = String::new();
        for set in element_sets(next.dual.as_ref()) {
            let _ = writeln!(
                script,
                "flush {} {} {TABLE} {}",
                set.kind, set.family, set.name
            );
        }
        script.push_str(&add_elements(next.dual.as_ref(), next.members.iter()));
        script.push_str(&tables.peer_changes(&next, true));
        apply(op, &script)?;
        *tables = next;
        Ok(())
    }

    /// Sets the other nodes' sandbox subnets and instances: instances of an app with members
    /// here may reach them, other traffic from those subnets only the public listeners. One
    /// transaction, none when nothing changed.
    ///
    /// # Errors
    /// [`SandboxError::Firewall`] when `nft` fails (nothing changed); [`SandboxError::Io`] when
    /// `nft` cannot run.
    pub fn set_peers(&self, peers: &PeerInstances) -> Result<(), SandboxError> {
        let mut tables = lock(&self.tables);
        if tables.peers == *peers {
            return Ok(());
        }
        let next = tables.with(tables.members.clone(), peers.clone());
        let script = tables.peer_changes(&next, false);
        if !script.is_empty() {
            apply(
                "setting the other nodes' instances in the sandbox firewall",
                &script,
            )?;
        }
        *tables = next;
        Ok(())
    }

    /// Deletes both tables (when the agent removes the bridge and every instance).
    ///
    /// # Errors
    /// [`SandboxError::Firewall`] when `nft` fails; [`SandboxError::Io`] when it cannot run.
    pub fn teardown(&self) -> Result<(), SandboxError> {
        let mut tables = lock(&self.tables);
        apply("deleting the sandbox firewall", &teardown_script())?;
        *tables = Tables {
            dual: tables.dual,
            ..Tables::default()
        };
        Ok(())
    }
}

/// A set or map holding members, and how one member's element reads in it.
struct ElementSet {
    family: &'static str,
    /// `set` or `map`.
    kind: &'static str,
    name: &'static str,
    /// Whether it exists only with IPv6 ([`IsolationSettings::dual_stack`]).
    v6: bool,
    /// The member's element; `None` when it has none here (no IPv6 address).
    element: fn(&str, &Entry, Option<&DualStack>) -> Option<String>,
}

/// The IPv6 address of the member `entry`, with IPv6.
fn addr6(entry: &Entry, dual: Option<&DualStack>) -> Option<Ipv6Addr> {
    dual?.addr6(entry.addr)
}

/// Every set and map holding members.
const ELEMENT_SETS: [ElementSet; 9] = [
    ElementSet {
        family: "bridge",
        kind: "set",
        name: "veth_addr",
        v6: false,
        element: |veth, e, _| Some(format!("\"{veth}\" . {}", e.addr)),
    },
    ElementSet {
        family: "bridge",
        kind: "set",
        name: "veth_addr6",
        v6: true,
        element: |veth, e, dual| Some(format!("\"{veth}\" . {}", addr6(e, dual)?)),
    },
    ElementSet {
        family: "bridge",
        kind: "set",
        name: "veth_nd_target",
        v6: true,
        element: |veth, e, dual| {
            let addr = u128::from(addr6(e, dual)?);
            Some(format!("\"{veth}\" . 0x{addr:032x}"))
        },
    },
    ElementSet {
        family: "bridge",
        kind: "map",
        name: "veth_app",
        v6: false,
        element: |veth, e, _| Some(format!("\"{veth}\" : {}", e.id)),
    },
    ElementSet {
        family: "bridge",
        kind: "set",
        name: "veth_app_set",
        v6: false,
        element: |veth, e, _| Some(format!("\"{veth}\" . {}", e.id)),
    },
    ElementSet {
        family: "inet",
        kind: "map",
        name: "addr_app",
        v6: false,
        element: |_, e, _| Some(format!("{} : {}", e.addr, e.id)),
    },
    ElementSet {
        family: "inet",
        kind: "set",
        name: "addr_app_set",
        v6: false,
        element: |_, e, _| Some(format!("{} . {}", e.addr, e.id)),
    },
    ElementSet {
        family: "inet",
        kind: "map",
        name: "addr_app6",
        v6: true,
        element: |_, e, dual| Some(format!("{} : {}", addr6(e, dual)?, e.id)),
    },
    ElementSet {
        family: "inet",
        kind: "set",
        name: "addr_app_set6",
        v6: true,
        element: |_, e, dual| Some(format!("{} . {}", addr6(e, dual)?, e.id)),
    },
];

/// The sets and maps holding members that exist with `dual` (the IPv6 ones only with it).
fn element_sets(dual: Option<&DualStack>) -> impl Iterator<Item = &'static ElementSet> {
    ELEMENT_SETS
        .iter()
        .filter(move |set| !set.v6 || dual.is_some())
}

/// The IPv6 pieces of the tables (see the module doc), each empty or whole lines; all empty
/// without IPv6, which leaves the IPv4-only tables.
#[derive(Default)]
struct V6Rules {
    bridge_sets: String,
    from_instance: String,
    neighbor_discovery: String,
    to_instance: String,
    inet_sets: String,
    input: String,
    from_instances: String,
    forward: String,
    hairpin: String,
    same_app: String,
}

impl V6Rules {
    fn new(bridge: &str) -> Self {
        Self {
            bridge_sets: format!(
                "\tset veth_addr6 {{ type ifname . ipv6_addr; }}\n\
                 \tset veth_nd_target {{ typeof iifname . {ND_TARGET}; }}\n"
            ),
            from_instance: format!(
                "\t\t{NEIGHBOR_DISCOVERY} jump neighbor_discovery\n\
                 \t\ticmpv6 type {{ nd-router-advert, nd-redirect, mld-listener-query, \
                 mld-listener-report, mld-listener-done, mld2-listener-report }} drop\n\
                 \t\tiifname . ip6 saddr @veth_addr6 accept\n"
            ),
            neighbor_discovery: format!(
                "\tchain neighbor_discovery {{\n\
                 \t\tip6 hoplimit != 255 drop\n\
                 \t\ticmpv6 type nd-neighbor-advert iifname . {ND_TARGET} != @veth_nd_target drop\n\
                 \t\tip6 saddr fe80::/10 accept\n\
                 \t\tiifname . ip6 saddr @veth_addr6 accept\n\
                 \t\tdrop\n\
                 \t}}\n"
            ),
            to_instance: format!(
                "\t\ticmpv6 type nd-neighbor-solicit oifname . {ND_TARGET} @veth_nd_target accept\n\
                 \t\ticmpv6 type nd-neighbor-solicit drop\n\
                 \t\toifname . ip6 daddr @veth_addr6 accept\n\
                 \t\tip6 daddr {{ fe80::/10, ff02::1, ff02::1:ff00:0/104 }} accept\n"
            ),
            inet_sets: format!(
                "\tmap addr_app6 {{ type ipv6_addr : mark; }}\n\
                 \tset addr_app_set6 {{ type ipv6_addr . mark; }}\n\
                 \tset {PEER_SUBNETS6} {{ type ipv6_addr; flags interval; }}\n"
            ),
            input: format!("\t\tip6 saddr @{PEER_SUBNETS6} jump from_peer_instances\n"),
            from_instances: format!("\t\t{NEIGHBOR_DISCOVERY} ip6 hoplimit 255 accept\n"),
            forward: format!(
                "\t\toifname \"{bridge}\" ip6 saddr @{PEER_SUBNETS6} jump from_peers\n"
            ),
            hairpin: format!("\t\t{NEIGHBOR_DISCOVERY} ip6 hoplimit 255 accept\n"),
            same_app: "\t\tmeta mark set ip6 saddr map @addr_app6 \
                       ip6 daddr . meta mark @addr_app_set6 accept\n"
                .to_owned(),
        }
    }
}

/// The transaction that replaces (or creates) both tables with their rules and empty sets.
fn tables_script(settings: &IsolationSettings) -> String {
    let bridge = &settings.bridge;
    let instances = format!("\"{}*\"", net::VETH_PREFIX);
    let gateway = settings.subnet.gateway();
    let broadcast =
        Ipv4Addr::from(u32::from(settings.subnet.network) | (u32::MAX >> settings.subnet.prefix));
    let mut ports: Vec<u16> = settings.listener_ports.clone();
    ports.sort_unstable();
    ports.dedup();
    let listeners = if ports.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        format!("\t\ttcp dport {{ {} }} accept\n", list.join(", "))
    };
    let v6 = settings
        .dual_stack
        .map_or_else(V6Rules::default, |_| V6Rules::new(bridge));
    let V6Rules {
        bridge_sets,
        from_instance,
        neighbor_discovery,
        to_instance,
        inet_sets,
        input,
        from_instances,
        forward,
        hairpin,
        same_app,
    } = &v6;
    format!(
        "table bridge {TABLE}\n\
         delete table bridge {TABLE}\n\
         table bridge {TABLE} {{\n\
         \tset veth_addr {{ type ifname . ipv4_addr; }}\n\
         \tmap veth_app {{ type ifname : mark; }}\n\
         \tset veth_app_set {{ type ifname . mark; }}\n\
         {bridge_sets}\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority -200; policy accept;\n\
         \t\tiifname {instances} jump from_instance\n\
         \t}}\n\
         \tchain from_instance {{\n\
         \t\tiifname . ip saddr @veth_addr accept\n\
         \t\t{ARP_IPV4} iifname . arp saddr ip @veth_addr accept\n\
         {from_instance}\
         \t\tdrop\n\
         \t}}\n\
         {neighbor_discovery}\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority -200; policy accept;\n\
         \t\tiifname {instances} jump between_instances\n\
         \t}}\n\
         \tchain between_instances {{\n\
         \t\tmeta mark set iifname map @veth_app oifname . meta mark @veth_app_set accept\n\
         \t\tdrop\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype filter hook postrouting priority -200; policy accept;\n\
         \t\toifname {instances} jump to_instance\n\
         \t}}\n\
         \tchain to_instance {{\n\
         \t\toifname . ip daddr @veth_addr accept\n\
         \t\tip daddr {{ 255.255.255.255, {broadcast}, 224.0.0.0/4 }} accept\n\
         \t\t{ARP_IPV4} oifname . arp daddr ip @veth_addr accept\n\
         {to_instance}\
         \t\tdrop\n\
         \t}}\n\
         }}\n\
         table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \tmap addr_app {{ type ipv4_addr : mark; }}\n\
         \tset addr_app_set {{ type ipv4_addr . mark; }}\n\
         \tset {PEER_SUBNETS} {{ type ipv4_addr; flags interval; }}\n\
         {inet_sets}\
         \tchain input {{\n\
         \t\ttype filter hook input priority 0; policy accept;\n\
         \t\tiifname \"{bridge}\" jump from_instances\n\
         \t\tip saddr @{PEER_SUBNETS} jump from_peer_instances\n\
         {input}\
         \t}}\n\
         \tchain from_instances {{\n\
         \t\tct state established,related accept\n\
         \t\tip daddr {gateway} meta l4proto {{ tcp, udp }} th dport 53 accept\n\
         {from_instances}\
         {listeners}\
         \t\tdrop\n\
         \t}}\n\
         \tchain from_peer_instances {{\n\
         \t\tct state established,related accept\n\
         {listeners}\
         \t\tdrop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority 0; policy accept;\n\
         \t\tiifname \"{bridge}\" oifname \"{bridge}\" jump hairpin\n\
         \t\toifname \"{bridge}\" ip saddr @{PEER_SUBNETS} jump from_peers\n\
         {forward}\
         \t}}\n\
         \tchain hairpin {{\n\
         \t\tct status dnat accept\n\
         \t\tmeta mark set ip saddr map @addr_app ip daddr . meta mark @addr_app_set accept\n\
         {same_app}\
         {hairpin}\
         \t\tdrop\n\
         \t}}\n\
         \tchain from_peers {{\n\
         \t\tct status dnat accept\n\
         \t\tmeta mark set ip saddr map @addr_app ip daddr . meta mark @addr_app_set accept\n\
         {same_app}\
         \t\tdrop\n\
         \t}}\n\
         }}\n"
    )
}

/// `add element` lines putting `members` into every set (those of `dual`).
fn add_elements<'a>(
    dual: Option<&DualStack>,
    members: impl Iterator<Item = (&'a String, &'a Entry)> + Clone,
) -> String {
    let mut script = String::new();
    for set in element_sets(dual) {
        let elements: Vec<String> = members
            .clone()
            .filter_map(|(veth, entry)| (set.element)(veth, entry, dual))
            .collect();
        for chunk in elements.chunks(ELEMENTS_PER_LINE) {
            let _ = writeln!(
                script,
                "add element {} {TABLE} {} {{ {} }}",
                set.family,
                set.name,
                chunk.join(", ")
            );
        }
    }
    script
}

/// `VERB element inet miren_sandbox SET { … }` lines for `elements` (none when empty).
fn elements_line<T: std::fmt::Display>(
    script: &mut String,
    verb: &str,
    set: &str,
    elements: impl Iterator<Item = T>,
) {
    let elements: Vec<String> = elements.map(|e| e.to_string()).collect();
    for chunk in elements.chunks(ELEMENTS_PER_LINE) {
        let _ = writeln!(
            script,
            "{verb} element inet {TABLE} {set} {{ {} }}",
            chunk.join(", ")
        );
    }
}

/// An `addr_app` element of another node's instance.
fn remote_elem((addr, id): (&Ipv4Addr, &u32)) -> String {
    format!("{addr} : {id}")
}

/// The `addr_app6` element of another node's instance (`None` outside the sandbox subnet).
fn remote_elem6(dual: &DualStack, (addr, id): (&Ipv4Addr, &u32)) -> Option<String> {
    Some(format!("{} : {id}", dual.addr6(*addr)?))
}

/// The IPv6 /80 of the node whose IPv4 subnet is `subnet` (`None` outside the sandbox subnet,
/// which has none).
fn subnet6(dual: &DualStack, subnet: &Subnet) -> Option<Subnet6> {
    dual.v4
        .contains(subnet.network)
        .then(|| dual.node_subnet6(*subnet))
}

/// The `addr_app` entries of the other nodes' instances: those inside a peer subnet, of the
/// apps that have members here, with their app's id.
fn remote_entries(
    members: &BTreeMap<String, Entry>,
    peers: &PeerInstances,
) -> BTreeMap<Ipv4Addr, u32> {
    let ids: BTreeMap<&str, u32> = members
        .values()
        .filter_map(|e| Some((e.app.as_deref()?, e.id)))
        .collect();
    peers
        .apps
        .iter()
        .filter_map(|(app, addrs)| Some((ids.get(app.as_str())?, addrs)))
        .flat_map(|(id, addrs)| addrs.iter().map(move |addr| (*addr, *id)))
        .filter(|(addr, _)| peers.subnets.iter().any(|s| s.contains(*addr)))
        .collect()
}

/// `delete element` lines taking the member on `veth` out of every set (those of `dual`).
fn delete_elements(dual: Option<&DualStack>, veth: &str, entry: &Entry) -> String {
    let mut script = String::new();
    for set in element_sets(dual) {
        if let Some(element) = (set.element)(veth, entry, dual) {
            let _ = writeln!(
                script,
                "delete element {} {TABLE} {} {{ {element} }}",
                set.family, set.name,
            );
        }
    }
    script
}

/// The transaction deleting both tables (and nothing else), whether or not they exist.
fn teardown_script() -> String {
    format!(
        "table bridge {TABLE}\ndelete table bridge {TABLE}\n\
         table inet {TABLE}\ndelete table inet {TABLE}\n"
    )
}

/// The id of `app` for a new member on `veth`: the one its other members have, else the
/// smallest id (from 1) no other member holds.
fn app_id(members: &BTreeMap<String, Entry>, veth: &str, app: &str) -> u32 {
    let others = members.iter().filter(|(v, _)| v.as_str() != veth);
    if let Some((_, entry)) = others.clone().find(|(_, e)| e.app.as_deref() == Some(app)) {
        return entry.id;
    }
    let used: std::collections::BTreeSet<u32> = others.map(|(_, e)| e.id).collect();
    // There are fewer members than ids, so some id from 1 to `used.len() + 1` is free.
    (1..).find(|id| !used.contains(id)).unwrap_or(u32::MAX)
}

/// `members` by veth with ids 1, 2, … by app name (the last member on a veth wins).
fn assign_ids(members: &[Member]) -> BTreeMap<String, Entry> {
    let mut ids: BTreeMap<&str, u32> = BTreeMap::new();
    for member in members {
        ids.entry(&member.app).or_insert(0);
    }
    for (id, value) in (1..).zip(ids.values_mut()) {
        *value = id;
    }
    members
        .iter()
        .map(|m| {
            let entry = Entry {
                addr: m.addr,
                id: ids[m.app.as_str()],
                app: Some(m.app.clone()),
            };
            (m.veth.clone(), entry)
        })
        .collect()
}

/// The members of a `nft -j list table bridge miren_sandbox` listing: veths with both an
/// address in `veth_addr` and an id in `veth_app` (apps unknown).
fn parse_members(listing: &str) -> Result<BTreeMap<String, Entry>, String> {
    let value: Value = serde_json::from_str(listing)
        .map_err(|e| format!("unreadable `nft -j list` output: {e}"))?;
    let mut addrs: BTreeMap<String, Ipv4Addr> = BTreeMap::new();
    let mut ids: BTreeMap<String, u32> = BTreeMap::new();
    let objects = value["nftables"].as_array().cloned().unwrap_or_default();
    for object in &objects {
        let (set, is_map) = match (object.get("set"), object.get("map")) {
            (Some(set), _) => (set, false),
            (None, Some(map)) => (map, true),
            (None, None) => continue,
        };
        let elements = set["elem"].as_array().cloned().unwrap_or_default();
        match (set["name"].as_str(), is_map) {
            (Some("veth_addr"), false) => {
                for element in elements {
                    let pair = &element["concat"];
                    if let (Some(veth), Some(Ok(addr))) = (
                        pair[0].as_str(),
                        pair[1].as_str().map(str::parse::<Ipv4Addr>),
                    ) {
                        addrs.insert(veth.to_owned(), addr);
                    }
                }
            }
            (Some("veth_app"), true) => {
                for element in elements {
                    if let (Some(veth), Some(Ok(id))) =
                        (element[0].as_str(), element[1].as_u64().map(u32::try_from))
                    {
                        ids.insert(veth.to_owned(), id);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(addrs
        .into_iter()
        .filter(|(veth, _)| check_ifname("", veth).is_ok())
        .filter_map(|(veth, addr)| {
            let id = *ids.get(&veth)?;
            Some((
                veth,
                Entry {
                    addr,
                    id,
                    app: None,
                },
            ))
        })
        .collect())
}

/// `nft -j list ARGS…` read by `parse`; the default when the table or set does not exist.
fn list<T: Default>(
    op: &str,
    args: &[&str],
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, SandboxError> {
    let firewall = |detail| SandboxError::Firewall {
        op: op.to_owned(),
        detail,
    };
    let listing = crate::nft_cli::list_json(args)
        .map_err(|e| SandboxError::io(format!("{op}: {}", e.what), e.source))?
        .map_err(firewall)?;
    listing.map_or_else(
        || Ok(T::default()),
        |listing| parse(&listing).map_err(firewall),
    )
}

/// Refuses names that are not Linux interface names (see [`crate::nft_cli::check_ifname`]).
fn check_ifname(op: &str, name: &str) -> Result<(), SandboxError> {
    crate::nft_cli::check_ifname(name).map_err(|detail| SandboxError::Firewall {
        op: op.to_owned(),
        detail,
    })
}

/// Runs `script` as one `nft -f -` transaction.
fn apply(op: &str, script: &str) -> Result<(), SandboxError> {
    match nft(op, &["-f", "-"], Some(script))? {
        Ok(_) => Ok(()),
        Err(detail) => Err(SandboxError::Firewall {
            op: op.to_owned(),
            detail,
        }),
    }
}

/// Runs `nft ARGS…` with `stdin` (if any): its stdout, or its stderr when it fails.
fn nft(
    op: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Result<String, String>, SandboxError> {
    crate::nft_cli::run(args, stdin)
        .map_err(|e| SandboxError::io(format!("{op}: {}", e.what), e.source))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> IsolationSettings {
        IsolationSettings {
            bridge: "miren0".to_owned(),
            subnet: Subnet::parse("10.88.0.0/16").unwrap(),
            dual_stack: Some(crate::config::DualStack {
                v4: Subnet::parse("10.88.0.0/16").unwrap(),
                node_prefix: 16,
                v6: crate::config::Subnet6::parse(crate::settings::DEFAULT_SANDBOX_SUBNET6)
                    .unwrap(),
            }),
            listener_ports: vec![443, 80, 80],
        }
    }

    fn member(veth: &str, addr: &str, app: &str) -> Member {
        Member {
            veth: veth.to_owned(),
            addr: addr.parse().unwrap(),
            app: app.to_owned(),
        }
    }

    #[test]
    fn tables_replace_both_tables_in_one_script_with_the_node_s_addresses_and_ports() {
        let script = tables_script(&settings());
        // Each table is created (if missing), deleted and recreated: one atomic replace.
        for family in ["bridge", "inet"] {
            let create = format!(
                "table {family} miren_sandbox\ndelete table {family} miren_sandbox\ntable {family} miren_sandbox {{\n"
            );
            assert!(script.contains(&create), "{script}");
        }
        assert!(
            !script.contains("inet miren "),
            "must not touch the data plane's table"
        );
        for line in [
            "iifname \"mvs*\" jump from_instance",
            "iifname . ip saddr @veth_addr accept",
            "arp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . arp saddr ip @veth_addr accept",
            "meta mark set iifname map @veth_app oifname . meta mark @veth_app_set accept",
            "oifname . ip daddr @veth_addr accept",
            "ip daddr { 255.255.255.255, 10.88.255.255, 224.0.0.0/4 } accept",
            "iifname \"miren0\" jump from_instances",
            "ct state established,related accept",
            "ip daddr 10.88.0.1 meta l4proto { tcp, udp } th dport 53 accept",
            "tcp dport { 80, 443 } accept",
            "iifname \"miren0\" oifname \"miren0\" jump hairpin",
            "ct status dnat accept",
            "meta mark set ip saddr map @addr_app ip daddr . meta mark @addr_app_set accept",
            "ip saddr @peer_subnets jump from_peer_instances",
            "oifname \"miren0\" ip saddr @peer_subnets jump from_peers",
            // IPv6: the same policy.
            "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } jump neighbor_discovery",
            "icmpv6 type { nd-router-advert, nd-redirect, mld-listener-query, mld-listener-report, mld-listener-done, mld2-listener-report } drop",
            "iifname . ip6 saddr @veth_addr6 accept",
            "ip6 hoplimit != 255 drop",
            "icmpv6 type nd-neighbor-advert iifname . @th,64,128 != @veth_nd_target drop",
            "ip6 saddr fe80::/10 accept",
            "icmpv6 type nd-neighbor-solicit oifname . @th,64,128 @veth_nd_target accept",
            "icmpv6 type nd-neighbor-solicit drop",
            "oifname . ip6 daddr @veth_addr6 accept",
            "ip6 daddr { fe80::/10, ff02::1, ff02::1:ff00:0/104 } accept",
            "ip6 saddr @peer_subnets6 jump from_peer_instances",
            "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
            "oifname \"miren0\" ip6 saddr @peer_subnets6 jump from_peers",
            "meta mark set ip6 saddr map @addr_app6 ip6 daddr . meta mark @addr_app_set6 accept",
        ] {
            assert!(
                script.contains(&format!("\t\t{line}\n")),
                "{line}\n{script}"
            );
        }
        // Every filtering chain ends in a drop.
        for chain in [
            "from_instance",
            "neighbor_discovery",
            "between_instances",
            "to_instance",
            "from_instances",
            "from_peer_instances",
            "hairpin",
            "from_peers",
        ] {
            let body = script
                .split(&format!("chain {chain} {{\n"))
                .nth(1)
                .and_then(|rest| rest.split("\t}").next())
                .unwrap();
            assert!(body.ends_with("\t\tdrop\n"), "{chain}: {body}");
        }
        // The IPv6 sets, next to the IPv4 ones.
        for set in [
            "\tset veth_addr6 { type ifname . ipv6_addr; }\n",
            "\tset veth_nd_target { typeof iifname . @th,64,128; }\n",
            "\tmap addr_app6 { type ipv6_addr : mark; }\n",
            "\tset addr_app_set6 { type ipv6_addr . mark; }\n",
            "\tset peer_subnets6 { type ipv6_addr; flags interval; }\n",
        ] {
            assert!(script.contains(set), "{set}\n{script}");
        }
        // DNS stays on the IPv4 bridge address: no IPv6 rule opens port 53.
        assert_eq!(script.matches("dport 53").count(), 1, "{script}");
        // Neighbor discovery is checked before the general own-source rule.
        let from_instance = script.split("chain from_instance {\n").nth(1).unwrap();
        assert!(
            from_instance.find("jump neighbor_discovery").unwrap()
                < from_instance.find("@veth_addr6 accept").unwrap()
        );
    }

    #[test]
    fn without_ipv6_the_tables_are_the_ipv4_only_ones() {
        let ipv4_only = tables_script(&IsolationSettings {
            dual_stack: None,
            ..settings()
        });
        let v6_names = [
            "ip6",
            "ipv6",
            "icmpv6",
            "addr6",
            "app6",
            "set6",
            "nd_target",
        ];
        for v6 in v6_names {
            assert!(!ipv4_only.contains(v6), "{v6}\n{ipv4_only}");
        }
        // IPv6 adds lines (and one chain), changes none: without it, what remains.
        let dual = tables_script(&settings());
        let (before, rest) = dual.split_once("\tchain neighbor_discovery {\n").unwrap();
        let (_, after) = rest.split_once("\t}\n").unwrap();
        let stripped: String = format!("{before}{after}")
            .lines()
            .filter(|line| !v6_names.iter().any(|v6| line.contains(v6)))
            .map(|line| format!("{line}\n"))
            .collect();
        assert_eq!(stripped, ipv4_only);
        // The IPv4-only tables still drop IPv6: from an instance, only IPv4 and ARP pass.
        let from_instance = ipv4_only
            .split("chain from_instance {\n")
            .nth(1)
            .and_then(|rest| rest.split("\t}").next())
            .unwrap();
        assert_eq!(
            from_instance,
            "\t\tiifname . ip saddr @veth_addr accept\n\
             \t\tarp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . arp saddr ip @veth_addr accept\n\
             \t\tdrop\n"
        );
    }

    #[test]
    fn without_listener_ports_no_port_is_opened() {
        let script = tables_script(&IsolationSettings {
            listener_ports: Vec::new(),
            ..settings()
        });
        assert!(!script.contains("tcp dport"), "{script}");
    }

    #[test]
    fn members_of_one_app_share_an_id_and_elements_cover_every_set() {
        let exact = assign_ids(&[
            member("mvs1", "10.88.0.2", "beta"),
            member("mvs2", "10.88.0.3", "alpha"),
            member("mvs3", "10.88.0.4", "beta"),
        ]);
        assert_eq!(exact.values().map(|e| e.id).collect::<Vec<_>>(), [2, 1, 2]);
        assert_eq!(
            add_elements(None, exact.iter()),
            "add element bridge miren_sandbox veth_addr { \"mvs1\" . 10.88.0.2, \"mvs2\" . 10.88.0.3, \"mvs3\" . 10.88.0.4 }\n\
             add element bridge miren_sandbox veth_app { \"mvs1\" : 2, \"mvs2\" : 1, \"mvs3\" : 2 }\n\
             add element bridge miren_sandbox veth_app_set { \"mvs1\" . 2, \"mvs2\" . 1, \"mvs3\" . 2 }\n\
             add element inet miren_sandbox addr_app { 10.88.0.2 : 2, 10.88.0.3 : 1, 10.88.0.4 : 2 }\n\
             add element inet miren_sandbox addr_app_set { 10.88.0.2 . 2, 10.88.0.3 . 1, 10.88.0.4 . 2 }\n"
        );
        // With IPv6, the mirrored addresses too (the ND target as the raw 128-bit integer).
        let dual = settings().dual_stack;
        assert_eq!(
            add_elements(dual.as_ref(), exact.iter()),
            "add element bridge miren_sandbox veth_addr { \"mvs1\" . 10.88.0.2, \"mvs2\" . 10.88.0.3, \"mvs3\" . 10.88.0.4 }\n\
             add element bridge miren_sandbox veth_addr6 { \"mvs1\" . fd6d:6972:656e::2, \"mvs2\" . fd6d:6972:656e::3, \"mvs3\" . fd6d:6972:656e::4 }\n\
             add element bridge miren_sandbox veth_nd_target { \"mvs1\" . 0xfd6d6972656e00000000000000000002, \"mvs2\" . 0xfd6d6972656e00000000000000000003, \"mvs3\" . 0xfd6d6972656e00000000000000000004 }\n\
             add element bridge miren_sandbox veth_app { \"mvs1\" : 2, \"mvs2\" : 1, \"mvs3\" : 2 }\n\
             add element bridge miren_sandbox veth_app_set { \"mvs1\" . 2, \"mvs2\" . 1, \"mvs3\" . 2 }\n\
             add element inet miren_sandbox addr_app { 10.88.0.2 : 2, 10.88.0.3 : 1, 10.88.0.4 : 2 }\n\
             add element inet miren_sandbox addr_app_set { 10.88.0.2 . 2, 10.88.0.3 . 1, 10.88.0.4 . 2 }\n\
             add element inet miren_sandbox addr_app6 { fd6d:6972:656e::2 : 2, fd6d:6972:656e::3 : 1, fd6d:6972:656e::4 : 2 }\n\
             add element inet miren_sandbox addr_app_set6 { fd6d:6972:656e::2 . 2, fd6d:6972:656e::3 . 1, fd6d:6972:656e::4 . 2 }\n"
        );
        assert_eq!(add_elements(None, BTreeMap::new().iter()), "");
        assert_eq!(add_elements(dual.as_ref(), BTreeMap::new().iter()), "");
    }

    #[test]
    fn many_members_are_split_into_lines_of_at_most_512_elements() {
        let members: Vec<Member> = (0..1000)
            .map(|i| {
                member(
                    &format!("mvs{i}"),
                    &format!("10.88.{}.{}", i / 250, i % 250 + 2),
                    "a",
                )
            })
            .collect();
        let script = add_elements(None, assign_ids(&members).iter());
        assert_eq!(script.lines().count(), 10);
        let dual = settings().dual_stack;
        let script = add_elements(dual.as_ref(), assign_ids(&members).iter());
        assert_eq!(script.lines().count(), 18);
        assert!(script.lines().all(|l| l.matches(", ").count() < 512));
    }

    #[test]
    fn delete_elements_remove_the_member_from_every_set() {
        let entry = Entry {
            addr: "10.88.0.9".parse().unwrap(),
            id: 3,
            app: Some("a".to_owned()),
        };
        assert_eq!(
            delete_elements(None, "mvs9", &entry),
            "delete element bridge miren_sandbox veth_addr { \"mvs9\" . 10.88.0.9 }\n\
             delete element bridge miren_sandbox veth_app { \"mvs9\" : 3 }\n\
             delete element bridge miren_sandbox veth_app_set { \"mvs9\" . 3 }\n\
             delete element inet miren_sandbox addr_app { 10.88.0.9 : 3 }\n\
             delete element inet miren_sandbox addr_app_set { 10.88.0.9 . 3 }\n"
        );
        assert_eq!(
            delete_elements(settings().dual_stack.as_ref(), "mvs9", &entry),
            "delete element bridge miren_sandbox veth_addr { \"mvs9\" . 10.88.0.9 }\n\
             delete element bridge miren_sandbox veth_addr6 { \"mvs9\" . fd6d:6972:656e::9 }\n\
             delete element bridge miren_sandbox veth_nd_target { \"mvs9\" . 0xfd6d6972656e00000000000000000009 }\n\
             delete element bridge miren_sandbox veth_app { \"mvs9\" : 3 }\n\
             delete element bridge miren_sandbox veth_app_set { \"mvs9\" . 3 }\n\
             delete element inet miren_sandbox addr_app { 10.88.0.9 : 3 }\n\
             delete element inet miren_sandbox addr_app_set { 10.88.0.9 . 3 }\n\
             delete element inet miren_sandbox addr_app6 { fd6d:6972:656e::9 : 3 }\n\
             delete element inet miren_sandbox addr_app_set6 { fd6d:6972:656e::9 . 3 }\n"
        );
    }

    #[test]
    fn a_new_app_gets_the_smallest_free_id_and_a_known_app_keeps_its_own() {
        let mut members = assign_ids(&[
            member("mvs1", "10.88.0.2", "alpha"),
            member("mvs3", "10.88.0.4", "gamma"),
        ]);
        assert_eq!(app_id(&members, "mvs9", "alpha"), 1);
        assert_eq!(app_id(&members, "mvs9", "beta"), 3);
        members.remove("mvs1");
        assert_eq!(app_id(&members, "mvs9", "beta"), 1);
        // Ids read back from an earlier agent (app unknown) stay reserved.
        members.insert(
            "mvs5".to_owned(),
            Entry {
                addr: "10.88.0.6".parse().unwrap(),
                id: 1,
                app: None,
            },
        );
        assert_eq!(app_id(&members, "mvs9", "beta"), 3);
        // Re-admitting the only member of an app does not count its own old id as taken.
        assert_eq!(app_id(&members, "mvs3", "delta"), 2);
    }

    #[test]
    fn members_are_read_back_from_a_json_listing() {
        let listing = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "bridge", "name": "miren_sandbox", "handle": 1}},
            {"set": {"family": "bridge", "name": "veth_addr", "table": "miren_sandbox",
              "type": ["ifname", "ipv4_addr"], "handle": 7,
              "elem": [{"concat": ["mvs1", "10.77.0.2"]}, {"concat": ["mvs2", "10.77.0.3"]},
                       {"concat": ["bad\"name", "10.77.0.4"]}]}},
            {"map": {"family": "bridge", "name": "veth_app", "table": "miren_sandbox",
              "type": "ifname", "handle": 8, "map": "mark",
              "elem": [["mvs1", 1], ["bad\"name", 2]]}},
            {"set": {"family": "bridge", "name": "veth_app_set", "table": "miren_sandbox",
              "type": ["ifname", "mark"], "handle": 9,
              "elem": [{"concat": ["mvs1", 1]}]}}]}"#;
        let members = parse_members(listing).unwrap();
        // mvs2 has no id and the bad name is not an interface name: both left out.
        assert_eq!(
            members,
            BTreeMap::from([(
                "mvs1".to_owned(),
                Entry {
                    addr: "10.77.0.2".parse().unwrap(),
                    id: 1,
                    app: None
                }
            )])
        );
        assert!(parse_members("not json").is_err());
        assert!(parse_members(r#"{"nftables": []}"#).unwrap().is_empty());
    }

    #[test]
    fn names_that_are_not_interface_names_are_refused() {
        for bad in ["", "a\"b", "sixteen-chars-xx", "a b", "a/b", "x}"] {
            let err = check_ifname("op", bad).unwrap_err();
            assert!(
                err.to_string().contains("is not an interface name"),
                "{err}"
            );
        }
        for good in ["miren0", "mvs1a2bx3", "br-x.1_2"] {
            check_ifname("op", good).unwrap();
        }
    }

    fn peers(subnets: &[&str], apps: &[(&str, &[&str])]) -> PeerInstances {
        PeerInstances {
            subnets: subnets.iter().map(|s| Subnet::parse(s).unwrap()).collect(),
            apps: apps
                .iter()
                .map(|(app, addrs)| {
                    let addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
                    ((*app).to_owned(), addrs)
                })
                .collect(),
        }
    }

    #[test]
    fn other_nodes_instances_get_the_id_of_their_app_here_and_only_inside_peer_subnets() {
        let members = assign_ids(&[
            member("mvs1", "10.88.0.2", "alpha"),
            member("mvs2", "10.88.0.3", "beta"),
        ]);
        let peers = peers(
            &["10.88.1.0/24", "10.88.2.0/24"],
            &[
                // 10.88.0.2 is the local member itself; 10.99.0.9 is in no peer subnet.
                (
                    "alpha",
                    &["10.88.0.2", "10.88.1.5", "10.88.2.7", "10.99.0.9"],
                ),
                ("beta", &["10.88.1.6"]),
                // No members here: nothing of it may reach local instances.
                ("gamma", &["10.88.1.8"]),
            ],
        );
        let remote = remote_entries(&members, &peers);
        let expected: BTreeMap<Ipv4Addr, u32> =
            [("10.88.1.5", 1), ("10.88.2.7", 1), ("10.88.1.6", 2)]
                .iter()
                .map(|(a, id)| (a.parse().unwrap(), *id))
                .collect();
        assert_eq!(remote, expected);
    }

    #[test]
    fn peer_changes_delete_before_they_add_and_follow_id_changes() {
        let tables = Tables::default().with(
            assign_ids(&[member("mvs1", "10.88.0.2", "alpha")]),
            peers(&["10.88.1.0/24"], &[("alpha", &["10.88.1.5"])]),
        );
        assert_eq!(
            Tables::default().peer_changes(&tables, false),
            "add element inet miren_sandbox peer_subnets { 10.88.1.0/24 }\n\
             add element inet miren_sandbox addr_app { 10.88.1.5 : 1 }\n"
        );
        assert_eq!(tables.peer_changes(&tables, false), "");
        // A new app takes id 1 (sorted first): alpha's remote entry moves to id 2.
        let next = tables.with(
            assign_ids(&[
                member("mvs1", "10.88.0.2", "alpha"),
                member("mvs2", "10.88.0.3", "aardvark"),
            ]),
            peers(&["10.88.2.0/24"], &[("alpha", &["10.88.2.5"])]),
        );
        assert_eq!(
            tables.peer_changes(&next, false),
            "delete element inet miren_sandbox peer_subnets { 10.88.1.0/24 }\n\
             delete element inet miren_sandbox addr_app { 10.88.1.5 : 1 }\n\
             add element inet miren_sandbox peer_subnets { 10.88.2.0/24 }\n\
             add element inet miren_sandbox addr_app { 10.88.2.5 : 2 }\n"
        );
        // After a flush (retain) every remote entry is added again, none deleted.
        assert_eq!(
            tables.peer_changes(&tables, true),
            "add element inet miren_sandbox addr_app { 10.88.1.5 : 1 }\n"
        );
        // The last member of an app leaves: its remote entries go with it.
        let empty = tables.with(BTreeMap::new(), tables.peers.clone());
        assert_eq!(
            tables.peer_changes(&empty, false),
            "delete element inet miren_sandbox addr_app { 10.88.1.5 : 1 }\n"
        );
    }

    #[test]
    fn with_ipv6_peer_changes_mirror_the_other_nodes_subnets_and_instances() {
        // Nodes of /24: node 1's /80 is number 1.
        let dual = crate::config::DualStack {
            node_prefix: 24,
            ..settings().dual_stack.unwrap()
        };
        let empty = Tables {
            dual: Some(dual),
            ..Tables::default()
        };
        let tables = empty.with(
            assign_ids(&[member("mvs1", "10.88.0.2", "alpha")]),
            peers(
                &["10.88.1.0/24", "10.99.0.0/24"],
                &[("alpha", &["10.88.1.5", "10.99.0.7"])],
            ),
        );
        // 10.99.0.0/24 is outside the sandbox subnet: no IPv6 counterpart.
        assert_eq!(
            empty.peer_changes(&tables, false),
            "add element inet miren_sandbox peer_subnets { 10.88.1.0/24, 10.99.0.0/24 }\n\
             add element inet miren_sandbox addr_app { 10.88.1.5 : 1, 10.99.0.7 : 1 }\n\
             add element inet miren_sandbox peer_subnets6 { fd6d:6972:656e:0:1::/80 }\n\
             add element inet miren_sandbox addr_app6 { fd6d:6972:656e:0:1::5 : 1 }\n"
        );
        assert_eq!(tables.peer_changes(&tables, false), "");
        let next = tables.with(
            tables.members.clone(),
            peers(&["10.88.2.0/24"], &[("alpha", &["10.88.2.5"])]),
        );
        assert_eq!(
            tables.peer_changes(&next, false),
            "delete element inet miren_sandbox peer_subnets { 10.88.1.0/24, 10.99.0.0/24 }\n\
             delete element inet miren_sandbox addr_app { 10.88.1.5 : 1, 10.99.0.7 : 1 }\n\
             delete element inet miren_sandbox peer_subnets6 { fd6d:6972:656e:0:1::/80 }\n\
             delete element inet miren_sandbox addr_app6 { fd6d:6972:656e:0:1::5 : 1 }\n\
             add element inet miren_sandbox peer_subnets { 10.88.2.0/24 }\n\
             add element inet miren_sandbox addr_app { 10.88.2.5 : 1 }\n\
             add element inet miren_sandbox peer_subnets6 { fd6d:6972:656e:0:2::/80 }\n\
             add element inet miren_sandbox addr_app6 { fd6d:6972:656e:0:2::5 : 1 }\n"
        );
    }

    #[test]
    fn teardown_deletes_only_the_two_tables() {
        assert_eq!(
            teardown_script(),
            "table bridge miren_sandbox\ndelete table bridge miren_sandbox\n\
             table inet miren_sandbox\ndelete table inet miren_sandbox\n"
        );
    }
}
