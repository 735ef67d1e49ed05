//! What this code writes into `table inet miren`: the table's name, its sets and maps, its
//! chains and their rules, and the fingerprint comment each rule carries.

/// Family and name of the table this data plane owns.
pub(super) const TABLE: &str = "inet miren";
/// Seed of the endpoint hash ("mir").
const HASH_SEED: &str = "0x6d6972";
/// Prefix of the fingerprint comment on every rule.
const RULE_COMMENT: &str = "miren:";

/// A set or map of the table, as declared and as nft's JSON lists its type.
pub(super) struct SetDef {
    pub(super) name: &'static str,
    /// Text between the braces of `add set|map`.
    pub(super) declaration: &'static str,
    /// `true` for a map.
    pub(super) map: bool,
    /// The `type` nft's JSON listing shows.
    pub(super) json_type: &'static [&'static str],
    /// The `map` (value type) nft's JSON listing shows, for maps.
    pub(super) json_map: Option<&'static str>,
    /// Whether elements carry counters.
    pub(super) counter: bool,
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
        declaration: "type ipv4_addr;",
        map: false,
        json_type: &["ipv4_addr"],
        json_map: None,
        counter: false,
    },
    port_set("rx"),
    port_set("flows"),
    port_set("drops"),
    tx_set("tx_tcp"),
    tx_set("tx_udp"),
    backend_set("backend_tcp"),
    backend_set("backend_udp"),
    SetDef {
        name: "nat",
        declaration: "type inet_proto . inet_service : verdict;",
        map: true,
        json_type: &["inet_proto", "inet_service"],
        json_map: Some("verdict"),
        counter: false,
    },
    endpoints_map(
        "endpoints_tcp",
        "typeof th dport . meta length : ip daddr . tcp dport;",
    ),
    endpoints_map(
        "endpoints_udp",
        "typeof th dport . meta length : ip daddr . udp dport;",
    ),
];

const fn endpoints_map(name: &'static str, declaration: &'static str) -> SetDef {
    SetDef {
        name,
        declaration,
        map: true,
        json_type: &["inet_service", "integer"],
        json_map: Some("ipv4_addr . inet_service"),
        counter: false,
    }
}

const fn port_set(name: &'static str) -> SetDef {
    SetDef {
        name,
        declaration: "type inet_proto . inet_service; counter;",
        map: false,
        json_type: &["inet_proto", "inet_service"],
        json_map: None,
        counter: true,
    }
}

const fn tx_set(name: &'static str) -> SetDef {
    SetDef {
        name,
        declaration: "type inet_service; counter;",
        map: false,
        json_type: &["inet_service"],
        json_map: None,
        counter: true,
    }
}

const fn backend_set(name: &'static str) -> SetDef {
    SetDef {
        name,
        declaration: "type inet_service . ipv4_addr . inet_service; counter;",
        map: false,
        json_type: &["inet_service", "ipv4_addr", "inet_service"],
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

/// The chains this code writes, by name: the fixed ones and `endpoints_N` for N ≥ 1.
pub(super) fn chain_def(name: &str) -> Option<ChainDef> {
    let rx = "ct direction original ip daddr @node_addrs meta l4proto . th dport @rx";
    let tx = |proto: &str| {
        format!(
            "ct direction reply ct status dnat ct original ip daddr @node_addrs \
             meta l4proto {proto} ct original proto-dst @tx_{proto}"
        )
    };
    let backend = |proto: &str| {
        format!(
            "ct direction original ct status dnat ct original ip daddr @node_addrs \
             meta l4proto {proto} ct original proto-dst . ip daddr . th dport @backend_{proto}"
        )
    };
    let nat = "ip daddr @node_addrs meta l4proto . th dport vmap @nat";
    let dnat = |proto: &str, n: usize| {
        format!(
            "dnat ip to {proto} dport . jhash ip saddr . {proto} sport mod {n} seed {HASH_SEED} \
             map @endpoints_{proto}"
        )
    };
    let def = |base, rules: Vec<String>| Some(ChainDef { base, rules });
    match name {
        "count_in" => def(
            Some(BaseChain::new("filter", "prerouting", -150)),
            vec![rx.to_owned(), tx("tcp"), tx("udp")],
        ),
        "count_local" => def(
            Some(BaseChain::new("filter", "output", -150)),
            vec![rx.to_owned()],
        ),
        "nat_in" => def(
            Some(BaseChain::new("nat", "prerouting", -100)),
            vec![nat.to_owned()],
        ),
        "nat_local" => def(
            Some(BaseChain::new("nat", "output", -100)),
            vec![nat.to_owned()],
        ),
        "no_endpoints" => def(
            None,
            vec![
                "meta l4proto . th dport @drops".to_owned(),
                "drop".to_owned(),
            ],
        ),
        "count_out" => def(
            Some(BaseChain::new("filter", "postrouting", 100)),
            vec![backend("tcp"), backend("udp")],
        ),
        _ => {
            let n: usize = name.strip_prefix("endpoints_")?.parse().ok()?;
            (n > 0 && name == endpoints_chain(n)).then(|| ChainDef {
                base: None,
                rules: vec![
                    "meta l4proto . th dport @flows".to_owned(),
                    dnat("tcp", n),
                    dnat("udp", n),
                ],
            })
        }
    }
}

/// Names of the chains every table has.
pub(super) const FIXED_CHAINS: &[&str] = &[
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
