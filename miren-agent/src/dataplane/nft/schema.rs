//! What this code writes into its table (`inet miren`, or `inet miren_local` for XDP's
//! companion, see [`Scope`]): the table's name, its sets and maps, its chains and their rules,
//! and the fingerprint comment each rule carries.

pub(super) use crate::dataplane::Family;
use crate::{config::Protocol, nft_cli};

/// Which traffic a table of this code handles, and so its name and the interface conditions
/// of its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The nftables data plane (`inet miren`): node ports on every interface. With `external`
    /// interfaces (`--iface`), flows arriving elsewhere (an instance calling a node port
    /// through the node address: hairpin) are masqueraded, so their replies come back
    /// through the node.
    Plane {
        /// The external interfaces; none: no hairpin masquerade.
        external: Vec<String>,
    },
    /// The XDP data plane's companion (`inet miren_local`): what XDP cannot see, i.e.
    /// connections from the node itself (output hook) and node-port packets arriving on an
    /// interface that is not one of `xdp` (e.g. from the sandbox bridge: hairpin, which is
    /// masqueraded). Packets arriving on `xdp` are XDP's: never DNATed nor counted here.
    Companion {
        /// The interfaces XDP is attached to.
        xdp: Vec<String>,
    },
}

impl Default for Scope {
    /// The nftables data plane without external interfaces.
    fn default() -> Self {
        Self::Plane {
            external: Vec::new(),
        }
    }
}

impl Scope {
    /// The nftables data plane with the external interfaces `external`.
    ///
    /// # Errors
    /// An interface name nft cannot hold.
    pub fn plane(external: &[String]) -> Result<Self, String> {
        check_ifnames(external)?;
        Ok(Self::Plane {
            external: external.to_vec(),
        })
    }

    /// The companion of the XDP data plane attached to `xdp`.
    ///
    /// # Errors
    /// An interface name nft cannot hold.
    pub fn companion(xdp: &[String]) -> Result<Self, String> {
        check_ifnames(xdp)?;
        Ok(Self::Companion { xdp: xdp.to_vec() })
    }

    /// The table's name (in family `inet`).
    pub fn table_name(&self) -> &'static str {
        match self {
            Self::Plane { .. } => "miren",
            Self::Companion { .. } => "miren_local",
        }
    }

    /// Family and name of the table, as nft commands name it.
    pub(super) fn table(&self) -> String {
        format!("inet {}", self.table_name())
    }

    /// The external (`Plane`) or XDP (`Companion`) interfaces.
    fn ifaces(&self) -> &[String] {
        match self {
            Self::Plane { external } => external,
            Self::Companion { xdp } => xdp,
        }
    }

    /// `iifname != { "IF", … } ` when the interfaces are not this table's to match.
    fn not_from(&self) -> String {
        let ifaces = self.ifaces();
        if ifaces.is_empty() {
            return String::new();
        }
        let names: Vec<String> = ifaces.iter().map(|i| format!("\"{i}\"")).collect();
        format!("iifname != {{ {} }} ", names.join(", "))
    }

    /// The condition on prerouting rules that DNAT or count received packets: none for the
    /// data plane, not from an XDP interface for the companion.
    fn arriving(&self) -> String {
        match self {
            Self::Plane { .. } => String::new(),
            Self::Companion { .. } => self.not_from(),
        }
    }

    /// Whether flows arriving elsewhere than the interfaces are masqueraded (`nat_out`).
    fn masquerades(&self) -> bool {
        !self.ifaces().is_empty()
    }

    /// The chains every table of this scope has.
    pub(super) fn fixed_chains(&self) -> Vec<&'static str> {
        let mut chains = FIXED_CHAINS.to_vec();
        if self.masquerades() {
            chains.push(NAT_OUT);
        }
        chains
    }
}

fn check_ifnames(ifaces: &[String]) -> Result<(), String> {
    ifaces.iter().try_for_each(|i| nft_cli::check_ifname(i))
}
/// Seed of the endpoint hash ("mir").
const HASH_SEED: &str = "0x6d6972";
/// Prefix of the fingerprint comment on every rule.
const RULE_COMMENT: &str = "miren:";

/// The table holds the same sets, maps and rules for both families; the IPv6 ones carry the
/// suffix `6` and match `ip6` headers (or `meta nfproto ipv6`).
impl Family {
    /// The network header's name in rules: `ip` or `ip6`.
    fn header(self) -> &'static str {
        match self {
            Self::V4 => "ip",
            Self::V6 => "ip6",
        }
    }

    /// The name of this family's instance of the set or map `base`.
    pub(super) fn set(self, base: &str) -> String {
        match self {
            Self::V4 => base.to_owned(),
            Self::V6 => format!("{base}6"),
        }
    }
}

/// What a set or map of the table holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum SetKind {
    /// The node's addresses of one family.
    NodeAddrs(Family),
    /// `(protocol, port)` of each node port, counting received packets of one family.
    Rx(Family),
    /// `(protocol, port)`, counting new flows of one family.
    Flows(Family),
    /// `(protocol, port)`, counting packets of one family dropped for want of endpoints.
    Drops(Family),
    /// The ports of one protocol's node ports, counting replies of one family.
    Tx(Protocol, Family),
    /// `(port, endpoint address, endpoint port)` of one protocol and family, counting
    /// forwarded packets.
    Backend(Protocol, Family),
    /// Verdict map: `(protocol, port)` → the chain that balances one family's flows.
    Nat(Family),
    /// `(port, hash slot)` → endpoint, of one protocol and family.
    Endpoints(Protocol, Family),
}

/// A set or map of the table, as declared and as nft's JSON lists its type.
pub(super) struct SetDef {
    pub(super) name: &'static str,
    pub(super) kind: SetKind,
    /// Text between the braces of `add set|map`.
    pub(super) declaration: &'static str,
    /// The `type` nft's JSON listing shows.
    pub(super) json_type: &'static [&'static str],
    /// The `map` (value type) nft's JSON listing shows, for maps.
    pub(super) json_map: Option<&'static str>,
    /// Whether elements carry counters.
    pub(super) counter: bool,
}

impl SetDef {
    pub(super) fn is_map(&self) -> bool {
        self.json_map.is_some()
    }
}

/// The sets and maps of the table.
///
/// The endpoint maps are declared with `typeof`, because the hash slot is an `integer` that no
/// `type` name describes. nft 1.0.6 cannot print `jhash` inside a `typeof` (it crashes listing
/// the table), so the declarations name `meta length` (also a 32-bit integer) for the slot. It
/// also cannot add a `dnat` rule to an existing map whose `typeof` value is `ip daddr . th
/// dport` ("conflicting protocols"), and a value of `udp dport` makes every rule using the map
/// match UDP only; hence one map per protocol, each with its protocol's port.
pub(super) const SETS: &[SetDef] = &[
    SetDef {
        name: "node_addrs",
        kind: SetKind::NodeAddrs(Family::V4),
        declaration: "type ipv4_addr;",
        json_type: &["ipv4_addr"],
        json_map: None,
        counter: false,
    },
    SetDef {
        name: "node_addrs6",
        kind: SetKind::NodeAddrs(Family::V6),
        declaration: "type ipv6_addr;",
        json_type: &["ipv6_addr"],
        json_map: None,
        counter: false,
    },
    port_set("rx", SetKind::Rx(Family::V4)),
    port_set("rx6", SetKind::Rx(Family::V6)),
    port_set("flows", SetKind::Flows(Family::V4)),
    port_set("flows6", SetKind::Flows(Family::V6)),
    port_set("drops", SetKind::Drops(Family::V4)),
    port_set("drops6", SetKind::Drops(Family::V6)),
    tx_set("tx_tcp", Protocol::Tcp, Family::V4),
    tx_set("tx_udp", Protocol::Udp, Family::V4),
    tx_set("tx_tcp6", Protocol::Tcp, Family::V6),
    tx_set("tx_udp6", Protocol::Udp, Family::V6),
    backend_set("backend_tcp", Protocol::Tcp, Family::V4),
    backend_set("backend_udp", Protocol::Udp, Family::V4),
    backend_set("backend_tcp6", Protocol::Tcp, Family::V6),
    backend_set("backend_udp6", Protocol::Udp, Family::V6),
    nat_map("nat", Family::V4),
    nat_map("nat6", Family::V6),
    endpoints_map(
        "endpoints_tcp",
        "typeof th dport . meta length : ip daddr . tcp dport;",
        Protocol::Tcp,
        Family::V4,
    ),
    endpoints_map(
        "endpoints_udp",
        "typeof th dport . meta length : ip daddr . udp dport;",
        Protocol::Udp,
        Family::V4,
    ),
    endpoints_map(
        "endpoints_tcp6",
        "typeof th dport . meta length : ip6 daddr . tcp dport;",
        Protocol::Tcp,
        Family::V6,
    ),
    endpoints_map(
        "endpoints_udp6",
        "typeof th dport . meta length : ip6 daddr . udp dport;",
        Protocol::Udp,
        Family::V6,
    ),
];

/// The definition of the set or map holding `kind`.
pub(super) fn set_def(kind: SetKind) -> &'static SetDef {
    SETS.iter()
        .find(|def| def.kind == kind)
        .expect("every kind has a set")
}

const fn nat_map(name: &'static str, family: Family) -> SetDef {
    SetDef {
        name,
        kind: SetKind::Nat(family),
        declaration: "type inet_proto . inet_service : verdict;",
        json_type: &["inet_proto", "inet_service"],
        json_map: Some("verdict"),
        counter: false,
    }
}

const fn endpoints_map(
    name: &'static str,
    declaration: &'static str,
    protocol: Protocol,
    family: Family,
) -> SetDef {
    SetDef {
        name,
        kind: SetKind::Endpoints(protocol, family),
        declaration,
        json_type: &["inet_service", "integer"],
        json_map: Some(match family {
            Family::V4 => "ipv4_addr . inet_service",
            Family::V6 => "ipv6_addr . inet_service",
        }),
        counter: false,
    }
}

const fn port_set(name: &'static str, kind: SetKind) -> SetDef {
    SetDef {
        name,
        kind,
        declaration: "type inet_proto . inet_service; counter;",
        json_type: &["inet_proto", "inet_service"],
        json_map: None,
        counter: true,
    }
}

const fn tx_set(name: &'static str, protocol: Protocol, family: Family) -> SetDef {
    SetDef {
        name,
        kind: SetKind::Tx(protocol, family),
        declaration: "type inet_service; counter;",
        json_type: &["inet_service"],
        json_map: None,
        counter: true,
    }
}

const fn backend_set(name: &'static str, protocol: Protocol, family: Family) -> SetDef {
    SetDef {
        name,
        kind: SetKind::Backend(protocol, family),
        declaration: match family {
            Family::V4 => "type inet_service . ipv4_addr . inet_service; counter;",
            Family::V6 => "type inet_service . ipv6_addr . inet_service; counter;",
        },
        json_type: match family {
            Family::V4 => &["inet_service", "ipv4_addr", "inet_service"],
            Family::V6 => &["inet_service", "ipv6_addr", "inet_service"],
        },
        json_map: None,
        counter: true,
    }
}

/// The hook of a base chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BaseChain {
    pub(super) kind: String,
    pub(super) hook: String,
    pub(super) priority: i64,
    pub(super) policy: String,
}

impl BaseChain {
    fn new(kind: &str, hook: &str, priority: i64) -> Self {
        Self {
            kind: kind.to_owned(),
            hook: hook.to_owned(),
            priority,
            policy: "accept".to_owned(),
        }
    }
}

/// A chain as this code writes it.
pub(super) struct ChainDef {
    pub(super) base: Option<BaseChain>,
    pub(super) rules: Vec<String>,
}

/// The chains this code writes for `scope`, by name: the fixed ones and `endpoints_N` for
/// N ≥ 1. Each rule that looks at addresses comes once per family, IPv4 first.
pub(super) fn chain_def(name: &str, scope: &Scope) -> Option<ChainDef> {
    let protocols = [Protocol::Tcp, Protocol::Udp];
    let per_family = |rule: &dyn Fn(Family, &str) -> String| -> Vec<String> {
        Family::ALL
            .iter()
            .map(|family| rule(*family, family.header()))
            .collect()
    };
    let per_family_and_protocol = |rule: &dyn Fn(Family, &str, &str) -> String| -> Vec<String> {
        Family::ALL
            .iter()
            .flat_map(|family| protocols.map(|p| rule(*family, family.header(), p.as_str())))
            .collect()
    };
    let addrs = |family: Family| family.set("node_addrs");
    let arriving = scope.arriving();
    let rx_from = |from: &str, family, ip: &str| {
        format!(
            "{from}ct direction original {ip} daddr @{} meta l4proto . th dport @{}",
            addrs(family),
            family.set("rx")
        )
    };
    let rx_in = |family, ip: &str| rx_from(&arriving, family, ip);
    let rx_local = |family, ip: &str| rx_from("", family, ip);
    let tx = |family, ip: &str, proto: &str| {
        format!(
            "ct direction reply ct status dnat ct original {ip} daddr @{} \
             meta l4proto {proto} ct original proto-dst @{}",
            addrs(family),
            family.set(&format!("tx_{proto}"))
        )
    };
    let backend = |family, ip: &str, proto: &str| {
        format!(
            "ct direction original ct status dnat ct original {ip} daddr @{} \
             meta l4proto {proto} ct original proto-dst . {ip} daddr . th dport @{}",
            addrs(family),
            family.set(&format!("backend_{proto}"))
        )
    };
    let nat_from = |from: &str, family: Family, ip: &str| {
        format!(
            "{from}{ip} daddr @{} meta l4proto . th dport vmap @{}",
            addrs(family),
            family.set("nat")
        )
    };
    let nat_in = |family, ip: &str| nat_from(&arriving, family, ip);
    let nat_local = |family, ip: &str| nat_from("", family, ip);
    // Flows this table DNATed that arrived on an interface (not from the node itself) other
    // than the external (XDP) ones: the instance would answer the caller directly (the same
    // bridge, or a peer node), bypassing the reverse translation.
    let not_from = scope.not_from();
    let masquerade = |family, ip: &str| {
        format!(
            "ct status dnat ct original {ip} daddr @{} meta iif != 0 {not_from}masquerade",
            addrs(family)
        )
    };
    // Flows and drops are counted in chains both families jump to.
    let count_family = |family: Family, set: &str| {
        format!(
            "meta nfproto {} meta l4proto . th dport @{}",
            family.label(),
            family.set(set)
        )
    };
    let def = |base, rules: Vec<String>| Some(ChainDef { base, rules });
    match name {
        "count_in" => def(
            Some(BaseChain::new("filter", "prerouting", -150)),
            [per_family(&rx_in), per_family_and_protocol(&tx)].concat(),
        ),
        "count_local" => def(
            Some(BaseChain::new("filter", "output", -150)),
            per_family(&rx_local),
        ),
        "nat_in" => def(
            Some(BaseChain::new("nat", "prerouting", -100)),
            per_family(&nat_in),
        ),
        "nat_local" => def(
            Some(BaseChain::new("nat", "output", -100)),
            per_family(&nat_local),
        ),
        NAT_OUT if scope.masquerades() => def(
            Some(BaseChain::new("nat", "postrouting", 100)),
            per_family(&masquerade),
        ),
        "no_endpoints" => def(
            None,
            [
                per_family(&|family, _| count_family(family, "drops")),
                vec!["drop".to_owned()],
            ]
            .concat(),
        ),
        "count_out" => def(
            Some(BaseChain::new("filter", "postrouting", 100)),
            per_family_and_protocol(&backend),
        ),
        _ => {
            let n: usize = name.strip_prefix("endpoints_")?.parse().ok()?;
            // `dnat ip to` leaves IPv6 packets alone and `dnat ip6 to` IPv4 ones: the chain
            // serves both families' jumps.
            let dnat = |family: Family, ip: &str, proto: &str| {
                format!(
                    "dnat {ip} to {proto} dport . jhash {ip} saddr . {proto} sport mod {n} \
                     seed {HASH_SEED} map @{}",
                    family.set(&format!("endpoints_{proto}"))
                )
            };
            (n > 0 && name == endpoints_chain(n)).then(|| ChainDef {
                base: None,
                rules: [
                    per_family(&|family, _| count_family(family, "flows")),
                    per_family_and_protocol(&dnat),
                ]
                .concat(),
            })
        }
    }
}

/// The postrouting chain masquerading hairpin flows (with interfaces in the [`Scope`]).
const NAT_OUT: &str = "nat_out";

/// Names of the chains every table has.
const FIXED_CHAINS: &[&str] = &[
    "count_in",
    "count_local",
    "nat_in",
    "nat_local",
    "no_endpoints",
    "count_out",
];

pub(super) fn endpoints_chain(n: usize) -> String {
    format!("endpoints_{n}")
}

/// The comment identifying a rule's text: FNV-1a of the text (stable across builds).
pub(super) fn fingerprint(rule: &str) -> String {
    let hash = rule.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{RULE_COMMENT}{hash:016x}")
}
