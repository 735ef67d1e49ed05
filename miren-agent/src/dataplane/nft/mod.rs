//! [`NftDataplane`]: node ports in nftables, the fallback where XDP cannot run.
//!
//! The data plane owns one table, `inet miren`, and touches nothing else. Its rules are fixed
//! (their number does not grow with the node ports); everything per node port lives in set and
//! map elements, and the only chains that come and go are `endpoints_N`, one per distinct
//! endpoint count N:
//!
//! - `nat_in` / `nat_local` (nat, prerouting / output): traffic to a node address and a
//!   configured `(protocol, port)` jumps through the verdict map `nat` to `endpoints_N`, or to
//!   `no_endpoints`, which counts and drops.
//! - `endpoints_N` counts the new flow and DNATs it to slot `jhash(client addr, client port)
//!   mod N` of the node port in the map `endpoints_tcp` or `endpoints_udp`. Kernel conntrack
//!   keeps the flow on that endpoint; the client's address is kept (no masquerade).
//! - `count_in` / `count_local` / `count_out` (filter) count received packets per node port,
//!   replies per node port and forwarded packets per endpoint in the element counters of the
//!   sets `rx`, `tx_tcp`, `tx_udp`, `backend_tcp`, `backend_udp`.
//!
//! Every change is one atomic `nft -f -` transaction computed as the difference between what
//! the kernel holds (read back as JSON) and what the snapshot needs, so counter-carrying
//! elements that stay are never recreated and counters stay monotonic across applies and agent
//! restarts. Each rule carries a comment with a fingerprint of its text, so a table read back
//! shows whether its rules are still the ones this code writes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
};

use serde_json::Value;

use super::{
    BackendCounters, Counters, Dataplane, DataplaneError, NodePortKey, PortCounters, Snapshot,
};
use crate::config::Protocol;

/// Family and name of the table this data plane owns.
const TABLE: &str = "inet miren";
/// Seed of the endpoint hash ("mir").
const HASH_SEED: &str = "0x6d6972";
/// Most elements per `add element` / `delete element` line.
const ELEMENTS_PER_LINE: usize = 512;
/// Prefix of the fingerprint comment on every rule.
const RULE_COMMENT: &str = "miren:";

/// A set or map of the table, as declared and as nft's JSON lists its type.
struct SetDef {
    name: &'static str,
    /// Text between the braces of `add set|map`.
    declaration: &'static str,
    /// `true` for a map.
    map: bool,
    /// The `type` nft's JSON listing shows.
    json_type: &'static [&'static str],
    /// The `map` (value type) nft's JSON listing shows, for maps.
    json_map: Option<&'static str>,
    /// Whether elements carry counters.
    counter: bool,
}

/// The sets and maps of the table.
///
/// The endpoint maps are declared with `typeof`, because the hash slot is an `integer` that no
/// `type` name describes. nft 1.0.6 cannot print `jhash` inside a `typeof` (it crashes listing
/// the table), so the declarations name `meta length` (also a 32-bit integer) for the slot. It
/// also cannot add a `dnat` rule to an existing map whose `typeof` value is `ip daddr . th
/// dport` ("conflicting protocols"), and a value of `udp dport` makes every rule using the map
/// match UDP only; hence one map per protocol, each with its protocol's port.
const SETS: &[SetDef] = &[
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
struct BaseChain {
    kind: String,
    hook: String,
    priority: i64,
    policy: String,
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

/// A chain as the kernel holds it: its hook (base chains) and its rules' fingerprints.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChainState {
    base: Option<BaseChain>,
    /// The comment of each rule, in order (`None` for a rule without one).
    rules: Vec<Option<String>>,
}

/// A chain as this code writes it.
struct ChainDef {
    base: Option<BaseChain>,
    rules: Vec<String>,
}

impl ChainDef {
    fn state(&self) -> ChainState {
        ChainState {
            base: self.base.clone(),
            rules: self.rules.iter().map(|r| Some(fingerprint(r))).collect(),
        }
    }
}

/// The chains this code writes, by name: the fixed ones and `endpoints_N` for N ≥ 1.
fn chain_def(name: &str) -> Option<ChainDef> {
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
const FIXED_CHAINS: &[&str] = &[
    "count_in",
    "count_local",
    "nat_in",
    "nat_local",
    "no_endpoints",
    "count_out",
];

fn endpoints_chain(n: usize) -> String {
    format!("endpoints_{n}")
}

/// The comment identifying a rule's text: FNV-1a of the text (stable across builds).
fn fingerprint(rule: &str) -> String {
    let hash = rule.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{RULE_COMMENT}{hash:016x}")
}

/// The contents of `table inet miren`, as read back or as wanted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TableState {
    /// The table exists.
    exists: bool,
    /// A set or map has another type than this code declares, or holds elements this code
    /// cannot have written: the table must be recreated.
    incompatible: bool,
    node_addrs: BTreeSet<Ipv4Addr>,
    rx: BTreeSet<NodePortKey>,
    flows: BTreeSet<NodePortKey>,
    drops: BTreeSet<NodePortKey>,
    tx: BTreeSet<NodePortKey>,
    backends: BTreeSet<(NodePortKey, SocketAddrV4)>,
    /// Node port → the chain its `nat` element jumps to.
    nat: BTreeMap<NodePortKey, String>,
    /// (node port, hash slot) → endpoint.
    endpoints: BTreeMap<(NodePortKey, u32), SocketAddrV4>,
    chains: BTreeMap<String, ChainState>,
}

impl TableState {
    /// What the kernel must hold for `snapshot`.
    fn desired(snapshot: &Snapshot) -> Self {
        let mut state = Self {
            exists: true,
            node_addrs: snapshot.node_addrs.iter().copied().collect(),
            ..Self::default()
        };
        let mut chains: BTreeSet<String> = FIXED_CHAINS.iter().map(|c| (*c).to_owned()).collect();
        for (key, endpoints) in &snapshot.node_ports {
            let endpoints: BTreeSet<SocketAddrV4> = endpoints.iter().copied().collect();
            state.rx.insert(*key);
            state.flows.insert(*key);
            state.drops.insert(*key);
            state.tx.insert(*key);
            let target = if endpoints.is_empty() {
                "no_endpoints".to_owned()
            } else {
                endpoints_chain(endpoints.len())
            };
            chains.insert(target.clone());
            state.nat.insert(*key, target);
            for (slot, endpoint) in (0u32..).zip(&endpoints) {
                state.backends.insert((*key, *endpoint));
                state.endpoints.insert((*key, slot), *endpoint);
            }
        }
        state.chains = chains
            .into_iter()
            .filter_map(|name| Some((name.clone(), chain_def(&name)?.state())))
            .collect();
        state
    }

    /// UDP (node port, endpoint) pairs in `self` but not in `next`: their conntrack entries
    /// are stale.
    fn removed_udp_backends(&self, next: &Self) -> Vec<(NodePortKey, SocketAddrV4)> {
        self.backends
            .difference(&next.backends)
            .filter(|(key, _)| key.protocol == Protocol::Udp)
            .copied()
            .collect()
    }
}

fn proto(protocol: Protocol) -> &'static str {
    protocol.as_str()
}

fn port_elem(key: &NodePortKey) -> String {
    format!("{} . {}", proto(key.protocol), key.port)
}

fn backend_elem((key, endpoint): &(NodePortKey, SocketAddrV4)) -> String {
    format!("{} . {} . {}", key.port, endpoint.ip(), endpoint.port())
}

/// A transaction being built, in sections that run in this order.
#[derive(Default)]
struct Script {
    /// Deleting the table or chains that must be recreated.
    teardown: Vec<String>,
    /// Idempotent declarations of the table, its sets, maps and chains.
    declare: Vec<String>,
    /// Element deletions (maps first, so no chain is referenced by a stale jump).
    delete: Vec<String>,
    /// Chains whose rules are rewritten.
    rules: Vec<String>,
    /// Element additions.
    add: Vec<String>,
    /// Chains no longer used, once nothing jumps to them.
    retire: Vec<String>,
}

impl Script {
    fn elements(out: &mut Vec<String>, verb: &str, set: &str, elems: Vec<String>) {
        for chunk in elems.chunks(ELEMENTS_PER_LINE) {
            out.push(format!(
                "{verb} element {TABLE} {set} {{ {} }}",
                chunk.join(", ")
            ));
        }
    }

    /// Adds and deletes the difference between two sets of elements of `set`.
    fn diff_set<T: Ord>(
        &mut self,
        set: &str,
        current: &BTreeSet<T>,
        desired: &BTreeSet<T>,
        render: impl Fn(&T) -> String,
    ) {
        let gone = current.difference(desired).map(&render).collect();
        Self::elements(&mut self.delete, "delete", set, gone);
        let new = desired.difference(current).map(&render).collect();
        Self::elements(&mut self.add, "add", set, new);
    }

    /// Adds, deletes and replaces (delete, then add) map elements.
    fn diff_map<K: Ord, V: PartialEq>(
        &mut self,
        map: &str,
        current: &BTreeMap<K, V>,
        desired: &BTreeMap<K, V>,
        key: impl Fn(&K) -> String,
        value: impl Fn(&V) -> String,
    ) {
        let gone = current
            .iter()
            .filter(|(k, v)| desired.get(k) != Some(v))
            .map(|(k, _)| key(k))
            .collect();
        Self::elements(&mut self.delete, "delete", map, gone);
        let new = desired
            .iter()
            .filter(|(k, v)| current.get(k) != Some(v))
            .map(|(k, v)| format!("{} : {}", key(k), value(v)))
            .collect();
        Self::elements(&mut self.add, "add", map, new);
    }

    fn is_empty(&self) -> bool {
        self.teardown.is_empty()
            && self.delete.is_empty()
            && self.rules.is_empty()
            && self.add.is_empty()
            && self.retire.is_empty()
    }

    fn render(self) -> String {
        let mut text = String::new();
        for line in [
            self.teardown,
            self.declare,
            self.delete,
            self.rules,
            self.add,
            self.retire,
        ]
        .into_iter()
        .flatten()
        {
            text.push_str(&line);
            text.push('\n');
        }
        text
    }
}

/// The transaction that turns `current` into `desired`; `None` when they are equal.
fn transaction(current: &TableState, desired: &TableState) -> Option<String> {
    let mut script = Script::default();
    let empty = TableState::default();
    let current = if current.exists && current.incompatible {
        script.teardown.push(format!("delete table {TABLE}"));
        &empty
    } else {
        current
    };

    script.declare.push(format!("add table {TABLE}"));
    for set in SETS {
        let kind = if set.map { "map" } else { "set" };
        script.declare.push(format!(
            "add {kind} {TABLE} {} {{ {} }}",
            set.name, set.declaration
        ));
    }
    for (name, wanted) in &desired.chains {
        let def = chain_def(name).expect("desired chains have definitions");
        let existing = current.chains.get(name);
        if existing.is_some_and(|chain| chain.base != wanted.base) {
            script.teardown.push(format!("flush chain {TABLE} {name}"));
            script.teardown.push(format!("delete chain {TABLE} {name}"));
        }
        script.declare.push(match &def.base {
            Some(base) => format!(
                "add chain {TABLE} {name} {{ type {} hook {} priority {}; policy {}; }}",
                base.kind, base.hook, base.priority, base.policy
            ),
            None => format!("add chain {TABLE} {name}"),
        });
        if existing != Some(wanted) {
            script.rules.push(format!("flush chain {TABLE} {name}"));
            for rule in &def.rules {
                script.rules.push(format!(
                    "add rule {TABLE} {name} {rule} comment \"{}\"",
                    fingerprint(rule)
                ));
            }
        }
    }
    for name in current.chains.keys() {
        if !desired.chains.contains_key(name) {
            script.retire.push(format!("flush chain {TABLE} {name}"));
            script.retire.push(format!("delete chain {TABLE} {name}"));
        }
    }

    script.diff_map("nat", &current.nat, &desired.nat, port_elem, |chain| {
        format!("goto {chain}")
    });
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let of = |endpoints: &BTreeMap<(NodePortKey, u32), SocketAddrV4>| -> BTreeMap<_, _> {
            endpoints
                .iter()
                .filter(|((k, _), _)| k.protocol == protocol)
                .map(|((k, slot), endpoint)| ((k.port, *slot), *endpoint))
                .collect()
        };
        script.diff_map(
            &format!("endpoints_{}", proto(protocol)),
            &of(&current.endpoints),
            &of(&desired.endpoints),
            |(port, slot)| format!("{port} . {slot}"),
            |endpoint| format!("{} . {}", endpoint.ip(), endpoint.port()),
        );
    }
    script.diff_set(
        "node_addrs",
        &current.node_addrs,
        &desired.node_addrs,
        |a| a.to_string(),
    );
    for (set, current_keys, desired_keys) in [
        ("rx", &current.rx, &desired.rx),
        ("flows", &current.flows, &desired.flows),
        ("drops", &current.drops, &desired.drops),
    ] {
        script.diff_set(set, current_keys, desired_keys, port_elem);
    }
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let of = |keys: &BTreeSet<NodePortKey>| -> BTreeSet<u16> {
            keys.iter()
                .filter(|k| k.protocol == protocol)
                .map(|k| k.port)
                .collect()
        };
        script.diff_set(
            &format!("tx_{}", proto(protocol)),
            &of(&current.tx),
            &of(&desired.tx),
            u16::to_string,
        );
        let of = |backends: &BTreeSet<(NodePortKey, SocketAddrV4)>| -> BTreeSet<_> {
            backends
                .iter()
                .filter(|(k, _)| k.protocol == protocol)
                .copied()
                .collect()
        };
        script.diff_set(
            &format!("backend_{}", proto(protocol)),
            &of(&current.backends),
            &of(&desired.backends),
            backend_elem,
        );
    }
    // Nothing to write when only the idempotent declarations remain.
    (!script.is_empty()).then(|| script.render())
}

/// What a listing of the table says: its state and its counters.
#[derive(Debug, Default)]
struct Listing {
    state: TableState,
    counters: Counters,
}

/// An element counter.
#[derive(Debug, Clone, Copy, Default)]
struct ElemCounter {
    packets: u64,
    bytes: u64,
}

fn bad(what: impl std::fmt::Display, value: &Value) -> String {
    format!("unexpected {what} in nft's JSON: {value}")
}

fn parse_protocol(value: &Value) -> Option<Protocol> {
    match value {
        Value::String(s) if s == "tcp" => Some(Protocol::Tcp),
        Value::String(s) if s == "udp" => Some(Protocol::Udp),
        Value::Number(n) if n.as_u64() == Some(6) => Some(Protocol::Tcp),
        Value::Number(n) if n.as_u64() == Some(17) => Some(Protocol::Udp),
        _ => None,
    }
}

fn parse_u32(value: &Value) -> Option<u32> {
    match value {
        Value::Number(n) => n.as_u64()?.try_into().ok(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn parse_port(value: &Value) -> Option<u16> {
    parse_u32(value)?.try_into().ok()
}

fn parse_addr(value: &Value) -> Option<Ipv4Addr> {
    value.as_str()?.parse().ok()
}

/// The parts of a concatenation (`{"concat": [...]}`), or the value itself.
fn concat(value: &Value) -> Vec<&Value> {
    match value.get("concat").and_then(Value::as_array) {
        Some(parts) => parts.iter().collect(),
        None => vec![value],
    }
}

fn parse_key(value: &Value) -> Option<NodePortKey> {
    match concat(value).as_slice() {
        [protocol, port] => Some(NodePortKey {
            protocol: parse_protocol(protocol)?,
            port: parse_port(port)?,
        }),
        _ => None,
    }
}

fn parse_endpoint(addr: &Value, port: &Value) -> Option<SocketAddrV4> {
    Some(SocketAddrV4::new(parse_addr(addr)?, parse_port(port)?))
}

/// The elements of a set: each value with its counter (when the set has counters).
fn set_elements(set: &Value) -> Vec<(&Value, ElemCounter)> {
    let Some(elems) = set.get("elem").and_then(Value::as_array) else {
        return Vec::new();
    };
    elems
        .iter()
        .map(|elem| match elem.get("elem") {
            Some(inner) => {
                let counter = inner.get("counter");
                let read = |field| {
                    counter
                        .and_then(|c| c.get(field))
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                };
                let value = inner.get("val").unwrap_or(inner);
                (
                    value,
                    ElemCounter {
                        packets: read("packets"),
                        bytes: read("bytes"),
                    },
                )
            }
            None => (elem, ElemCounter::default()),
        })
        .collect()
}

/// `true` if `object` (a listed set or map) has the type `def` declares.
fn matches_def(object: &Value, def: &SetDef) -> bool {
    let json_type = match object.get("type") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(parts)) => parts.iter().filter_map(Value::as_str).collect(),
        _ => return false,
    };
    let counter = object
        .get("stmt")
        .and_then(Value::as_array)
        .is_some_and(|stmts| stmts.iter().any(|s| s.get("counter").is_some()));
    json_type == def.json_type
        && object.get("map").and_then(Value::as_str) == def.json_map
        && counter == def.counter
}

/// Parses the output of `nft -j list table inet miren`, or of listing some of its sets, as one
/// listing.
fn parse_listing(documents: &[&str]) -> Result<Listing, String> {
    let roots = documents
        .iter()
        .map(|json| serde_json::from_str(json).map_err(|e| format!("invalid JSON: {e}")))
        .collect::<Result<Vec<Value>, _>>()?;
    let objects = roots
        .iter()
        .map(|root| {
            root.get("nftables")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("document", root))
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten();
    let mut listing = Listing::default();
    let state = &mut listing.state;
    let mut port_counters: BTreeMap<NodePortKey, PortCounters> = BTreeMap::new();
    for object in objects {
        if object.get("table").is_some() {
            state.exists = true;
        } else if let Some(set) = object.get("set").or_else(|| object.get("map")) {
            let name = set.get("name").and_then(Value::as_str).unwrap_or_default();
            let Some(def) = SETS.iter().find(|def| def.name == name) else {
                continue;
            };
            if !matches_def(set, def) {
                state.incompatible = true;
                continue;
            }
            if !parse_elements(state, &mut listing.counters, &mut port_counters, name, set) {
                state.incompatible = true;
            }
        } else if let Some(chain) = object.get("chain") {
            let name = chain
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("chain", chain))?;
            let field = |f| chain.get(f).and_then(Value::as_str).map(str::to_owned);
            let base = match (field("type"), field("hook")) {
                (Some(kind), Some(hook)) => Some(BaseChain {
                    kind,
                    hook,
                    priority: chain.get("prio").and_then(Value::as_i64).unwrap_or(0),
                    policy: field("policy").unwrap_or_default(),
                }),
                _ => None,
            };
            state.chains.insert(
                name.to_owned(),
                ChainState {
                    base,
                    rules: Vec::new(),
                },
            );
        } else if let Some(rule) = object.get("rule") {
            let chain = rule
                .get("chain")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("rule", rule))?;
            let comment = rule
                .get("comment")
                .and_then(Value::as_str)
                .map(str::to_owned);
            state
                .chains
                .get_mut(chain)
                .ok_or_else(|| bad("rule of an unlisted chain", rule))?
                .rules
                .push(comment);
        }
    }
    // A node port's counters are complete only with its `rx` element; the others add to it.
    for key in &state.rx {
        listing
            .counters
            .ports
            .insert(*key, port_counters.remove(key).unwrap_or_default());
    }
    listing
        .counters
        .backends
        .retain(|(key, _), _| state.rx.contains(key));
    Ok(listing)
}

/// Reads the elements of the set or map `name` into `state` and their counters into
/// `counters`; `false` if an element is not one this code writes.
fn parse_elements(
    state: &mut TableState,
    counters: &mut Counters,
    ports: &mut BTreeMap<NodePortKey, PortCounters>,
    name: &str,
    set: &Value,
) -> bool {
    let mut ok = true;
    if let Some(def) = SETS.iter().find(|def| def.name == name && def.map) {
        for elem in set
            .get("elem")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let parsed = elem.as_array().and_then(|pair| match pair.as_slice() {
                [key, value] => Some((key, value)),
                _ => None,
            });
            ok &= parsed
                .and_then(|(key, value)| {
                    if def.name == "nat" {
                        let target = value.get("goto")?.get("target")?.as_str()?;
                        state.nat.insert(parse_key(key)?, target.to_owned());
                    } else {
                        let [port, slot] = concat(key)[..] else {
                            return None;
                        };
                        let [addr, endpoint_port] = concat(value)[..] else {
                            return None;
                        };
                        let protocol = if def.name == "endpoints_tcp" {
                            Protocol::Tcp
                        } else {
                            Protocol::Udp
                        };
                        let key = NodePortKey {
                            protocol,
                            port: parse_port(port)?,
                        };
                        state.endpoints.insert(
                            (key, parse_u32(slot)?),
                            parse_endpoint(addr, endpoint_port)?,
                        );
                    }
                    Some(())
                })
                .is_some();
        }
        return ok;
    }
    for (value, counter) in set_elements(set) {
        let parsed = match name {
            "node_addrs" => parse_addr(value).map(|addr| {
                state.node_addrs.insert(addr);
            }),
            "rx" | "flows" | "drops" => parse_key(value).map(|key| {
                let entry = ports.entry(key).or_default();
                match name {
                    "rx" => {
                        state.rx.insert(key);
                        entry.rx_packets = counter.packets;
                        entry.rx_bytes = counter.bytes;
                    }
                    "flows" => {
                        state.flows.insert(key);
                        entry.flows = counter.packets;
                    }
                    _ => {
                        state.drops.insert(key);
                        entry.drop_no_backend = counter.packets;
                    }
                }
            }),
            "tx_tcp" | "tx_udp" => parse_port(value).map(|port| {
                let protocol = if name == "tx_tcp" {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                };
                let key = NodePortKey { port, protocol };
                state.tx.insert(key);
                let entry = ports.entry(key).or_default();
                entry.tx_packets = counter.packets;
                entry.tx_bytes = counter.bytes;
            }),
            _ => {
                let protocol = if name == "backend_tcp" {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                };
                match concat(value)[..] {
                    [port, addr, endpoint_port] => parse_port(port)
                        .zip(parse_endpoint(addr, endpoint_port))
                        .map(|(port, endpoint)| {
                            let key = NodePortKey { port, protocol };
                            state.backends.insert((key, endpoint));
                            counters.backends.insert(
                                (key, endpoint),
                                BackendCounters {
                                    packets: counter.packets,
                                    bytes: counter.bytes,
                                },
                            );
                        }),
                    _ => None,
                }
            }
        };
        ok &= parsed.is_some();
    }
    ok
}

/// Runs `nft ARGS…` with `stdin` (if any): its stdout, or its stderr when it refused.
fn nft(
    op: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Result<String, String>, DataplaneError> {
    crate::nft_cli::run(args, stdin).map_err(|e| DataplaneError::Io {
        op: format!("{op}: {}", e.what),
        source: e.source,
    })
}

/// Runs `nft -j list OBJECT…` for each object in parallel and parses the outputs as one
/// listing; objects that do not exist are left out (an empty listing if the table is missing).
fn list(op: &str, objects: &[Vec<&str>]) -> Result<Listing, DataplaneError> {
    let command = |detail: String| DataplaneError::Command {
        op: op.to_owned(),
        detail,
    };
    let outputs = std::thread::scope(|scope| {
        let threads: Vec<_> = objects
            .iter()
            .map(|object| {
                let args: Vec<&str> = ["-j", "list"].iter().chain(object).copied().collect();
                // Threads start in the network namespace of the thread that creates them.
                scope.spawn(move || nft(op, &args, None))
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
            .collect::<Vec<_>>()
    });
    let mut documents = Vec::new();
    for output in outputs {
        match output? {
            Ok(json) => documents.push(json),
            Err(stderr) if stderr.contains("No such file or directory") => {}
            Err(stderr) => return Err(command(stderr)),
        }
    }
    let documents: Vec<&str> = documents.iter().map(String::as_str).collect();
    parse_listing(&documents).map_err(command)
}

/// Reads the whole table.
fn list_table(op: &str) -> Result<Listing, DataplaneError> {
    list(op, &[vec!["table", "inet", "miren"]])
}

/// Deletes the conntrack entries of UDP flows from `key` to `endpoint`; none matching is fine.
fn purge_conntrack(key: NodePortKey, endpoint: SocketAddrV4) -> Result<(), DataplaneError> {
    let op = format!("deleting conntrack entries of {key} to {endpoint}");
    let out = Command::new("conntrack")
        .args(["-D", "-p", "udp", "--orig-port-dst"])
        .arg(key.port.to_string())
        .arg("--reply-src")
        .arg(endpoint.ip().to_string())
        .arg("--reply-port-src")
        .arg(endpoint.port().to_string())
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| DataplaneError::Io {
            op: if source.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "{op}: `conntrack` not found; install the package `conntrack` \
                     (`cargo xtask setup` does)"
                )
            } else {
                format!("{op}: starting `conntrack`")
            },
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // conntrack exits 1 when no entry matched.
    if out.status.success() || stderr.contains(" 0 flow entries") {
        Ok(())
    } else {
        Err(DataplaneError::Command {
            op,
            detail: stderr.trim().to_owned(),
        })
    }
}

/// The nftables node-port data plane: owns `table inet miren` in the caller's network
/// namespace.
#[derive(Debug)]
pub struct NftDataplane {
    /// What the kernel's table holds, as last read or written.
    state: TableState,
    /// UDP backends removed from the table whose conntrack entries are not deleted yet.
    stale_flows: BTreeSet<(NodePortKey, SocketAddrV4)>,
}

impl NftDataplane {
    /// Checks that `nft` works and adopts `table inet miren` if it exists (its counters are
    /// kept), in the calling thread's network namespace.
    ///
    /// # Errors
    /// [`DataplaneError::Io`] if `nft` is missing; [`DataplaneError::Command`] if it fails or
    /// the table cannot be read.
    pub fn open() -> Result<Self, DataplaneError> {
        let op = "checking nft";
        nft(op, &["--version"], None)?.map_err(|detail| DataplaneError::Command {
            op: op.to_owned(),
            detail,
        })?;
        let state = list_table("reading table inet miren")?.state;
        if state.exists {
            tracing::info!(
                node_ports = state.nat.len(),
                "adopted nftables table inet miren"
            );
        }
        Ok(Self {
            state,
            stale_flows: BTreeSet::new(),
        })
    }

    /// Deletes `table inet miren` (leftovers of an nft-mode agent); `true` if it existed.
    ///
    /// # Errors
    /// [`DataplaneError::Io`] if `nft` is missing; [`DataplaneError::Command`] if it fails.
    pub fn remove_table() -> Result<bool, DataplaneError> {
        let op = "deleting table inet miren";
        match nft(op, &["delete", "table", "inet", "miren"], None)? {
            Ok(_) => Ok(true),
            Err(stderr) if stderr.contains("No such file or directory") => Ok(false),
            Err(detail) => Err(DataplaneError::Command {
                op: op.to_owned(),
                detail,
            }),
        }
    }

    /// Runs one transaction from the believed state to `desired`; the believed state is
    /// updated only if it succeeded.
    fn write(&mut self, desired: &TableState) -> Result<(), DataplaneError> {
        let Some(script) = transaction(&self.state, desired) else {
            return Ok(());
        };
        let op = "applying table inet miren";
        nft(op, &["-f", "-"], Some(&script))?.map_err(|detail| DataplaneError::Command {
            op: op.to_owned(),
            detail,
        })?;
        self.state = desired.clone();
        Ok(())
    }
}

impl Dataplane for NftDataplane {
    fn mode(&self) -> &'static str {
        "nft"
    }

    fn apply(&mut self, snapshot: &Snapshot) -> Result<(), DataplaneError> {
        let desired = TableState::desired(snapshot);
        let removed = self.state.removed_udp_backends(&desired);
        if let Err(err) = self.write(&desired) {
            // The kernel is unchanged (transactions are atomic), but it may not hold what was
            // believed: read it back and try once more from what it really holds.
            tracing::warn!(error = %err, "nft transaction failed; re-reading the table");
            self.refresh()?;
            self.write(&desired)?;
        }
        self.stale_flows.extend(removed);
        self.stale_flows
            .retain(|backend| !desired.backends.contains(backend));
        while let Some(&(key, endpoint)) = self.stale_flows.first() {
            purge_conntrack(key, endpoint)?;
            self.stale_flows.remove(&(key, endpoint));
        }
        Ok(())
    }

    fn refresh(&mut self) -> Result<(), DataplaneError> {
        self.state = list_table("re-reading table inet miren")?.state;
        Ok(())
    }

    fn counters(&self) -> Result<Counters, DataplaneError> {
        // Only the sets with counters, each listed by its own nft process in parallel: listing
        // the whole table (with the maps and rules) takes several times as long.
        let sets: Vec<Vec<&str>> = SETS
            .iter()
            .filter(|set| set.counter)
            .map(|set| vec!["set", "inet", "miren", set.name])
            .collect();
        Ok(list("reading the counters of table inet miren", &sets)?.counters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nft -j list table inet miren` after the first apply of [`snapshot`] (nft 1.0.6),
    /// trimmed of handles and rule expressions, with counters from some traffic.
    const LISTING: &str = r#"{"nftables": [
{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
{"table": {"family": "inet", "name": "miren", "handle": 2}},
{"set": {"name": "node_addrs", "type": "ipv4_addr", "elem": ["10.1.0.2"]}},
{"set": {"name": "rx", "type": ["inet_proto", "inet_service"], "elem": [{"elem": {"val": {"concat": ["udp", 7000]}, "counter": {"packets": 5, "bytes": 500}}}, {"elem": {"val": {"concat": ["tcp", 7001]}, "counter": {"packets": 6, "bytes": 600}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "flows", "type": ["inet_proto", "inet_service"], "elem": [{"elem": {"val": {"concat": ["udp", 7000]}, "counter": {"packets": 2, "bytes": 200}}}, {"elem": {"val": {"concat": ["tcp", 7001]}, "counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "drops", "type": ["inet_proto", "inet_service"], "elem": [{"elem": {"val": {"concat": ["udp", 7000]}, "counter": {"packets": 0, "bytes": 0}}}, {"elem": {"val": {"concat": ["tcp", 7001]}, "counter": {"packets": 6, "bytes": 600}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "tx_tcp", "type": "inet_service", "elem": [{"elem": {"val": 7001, "counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "tx_udp", "type": "inet_service", "elem": [{"elem": {"val": 7000, "counter": {"packets": 5, "bytes": 520}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "backend_tcp", "type": ["inet_service", "ipv4_addr", "inet_service"], "stmt": [{"counter": null}]}},
{"set": {"name": "backend_udp", "type": ["inet_service", "ipv4_addr", "inet_service"], "elem": [{"elem": {"val": {"concat": [7000, "10.2.0.2", 9000]}, "counter": {"packets": 3, "bytes": 300}}}, {"elem": {"val": {"concat": [7000, "10.2.0.3", 9000]}, "counter": {"packets": 2, "bytes": 200}}}], "stmt": [{"counter": null}]}},
{"map": {"name": "nat", "type": ["inet_proto", "inet_service"], "map": "verdict", "elem": [[{"concat": ["udp", 7000]}, {"goto": {"target": "endpoints_2"}}], [{"concat": ["tcp", 7001]}, {"goto": {"target": "no_endpoints"}}]]}},
{"map": {"name": "endpoints_tcp", "type": ["inet_service", "integer"], "map": "ipv4_addr . inet_service"}},
{"map": {"name": "endpoints_udp", "type": ["inet_service", "integer"], "map": "ipv4_addr . inet_service", "elem": [[{"concat": [7000, 0]}, {"concat": ["10.2.0.2", 9000]}], [{"concat": [7000, 1]}, {"concat": ["10.2.0.3", 9000]}]]}},
{"chain": {"name": "count_in", "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}},
{"chain": {"name": "count_local", "type": "filter", "hook": "output", "prio": -150, "policy": "accept"}},
{"chain": {"name": "count_out", "type": "filter", "hook": "postrouting", "prio": 100, "policy": "accept"}},
{"chain": {"name": "endpoints_2"}},
{"chain": {"name": "nat_in", "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
{"chain": {"name": "nat_local", "type": "nat", "hook": "output", "prio": -100, "policy": "accept"}},
{"chain": {"name": "no_endpoints"}},
{"rule": {"chain": "count_in", "comment": "miren:7ce6ae4d83b9da05"}},
{"rule": {"chain": "count_in", "comment": "miren:6f0e0170f0c72628"}},
{"rule": {"chain": "count_in", "comment": "miren:b32fd4a17e245c0c"}},
{"rule": {"chain": "count_local", "comment": "miren:7ce6ae4d83b9da05"}},
{"rule": {"chain": "count_out", "comment": "miren:d733620b5e1aa39a"}},
{"rule": {"chain": "count_out", "comment": "miren:8f006083da064752"}},
{"rule": {"chain": "endpoints_2", "comment": "miren:5dda0709d72c0a90"}},
{"rule": {"chain": "endpoints_2", "comment": "miren:25bba61fda718ff9"}},
{"rule": {"chain": "endpoints_2", "comment": "miren:861d410176d355a5"}},
{"rule": {"chain": "nat_in", "comment": "miren:d1f5cd1c1e3cfd87"}},
{"rule": {"chain": "nat_local", "comment": "miren:d1f5cd1c1e3cfd87"}},
{"rule": {"chain": "no_endpoints", "comment": "miren:368176471832e557"}},
{"rule": {"chain": "no_endpoints", "comment": "miren:f1a2a766dcd55bac"}}
]}"#;

    const UDP_7000: NodePortKey = NodePortKey {
        port: 7000,
        protocol: Protocol::Udp,
    };
    const TCP_7001: NodePortKey = NodePortKey {
        port: 7001,
        protocol: Protocol::Tcp,
    };

    fn ep(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    /// Node address 10.1.0.2; UDP 7000 → `udp_endpoints`; TCP 7001 without endpoints.
    fn snapshot(udp_endpoints: &[&str]) -> Snapshot {
        Snapshot {
            node_addrs: vec![Ipv4Addr::new(10, 1, 0, 2)],
            node_ports: BTreeMap::from([
                (UDP_7000, udp_endpoints.iter().map(|e| ep(e)).collect()),
                (TCP_7001, Vec::new()),
            ]),
        }
    }

    /// The lines of a transaction that change something (not the idempotent declarations).
    fn changes(script: &str) -> Vec<&str> {
        script
            .lines()
            .filter(|l| {
                !["add table ", "add set ", "add map ", "add chain "]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .collect()
    }

    fn adopted() -> TableState {
        parse_listing(&[LISTING]).unwrap().state
    }

    #[test]
    fn a_first_apply_declares_everything_and_adds_every_element() {
        let desired = TableState::desired(&snapshot(&["10.2.0.3:9000", "10.2.0.2:9000"]));
        let script = transaction(&TableState::default(), &desired).unwrap();
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines[0], "add table inet miren");
        for line in [
            "add map inet miren endpoints_udp { typeof th dport . meta length : ip daddr . udp dport; }",
            "add chain inet miren nat_in { type nat hook prerouting priority -100; policy accept; }",
            "add chain inet miren endpoints_2",
            "add chain inet miren no_endpoints",
            "add element inet miren node_addrs { 10.1.0.2 }",
            "add element inet miren rx { udp . 7000, tcp . 7001 }",
            "add element inet miren drops { udp . 7000, tcp . 7001 }",
            "add element inet miren tx_udp { 7000 }",
            "add element inet miren tx_tcp { 7001 }",
            "add element inet miren backend_udp { 7000 . 10.2.0.2 . 9000, 7000 . 10.2.0.3 . 9000 }",
            "add element inet miren endpoints_udp { 7000 . 0 : 10.2.0.2 . 9000, 7000 . 1 : 10.2.0.3 . 9000 }",
            "add element inet miren nat { udp . 7000 : goto endpoints_2, tcp . 7001 : goto no_endpoints }",
        ] {
            assert!(lines.contains(&line), "missing {line:?} in\n{script}");
        }
        assert!(
            lines.iter().any(|l| l.starts_with(
                "add rule inet miren endpoints_2 dnat ip to udp dport . jhash ip saddr . udp sport mod 2 seed 0x6d6972 map @endpoints_udp comment \"miren:"
            )),
            "{script}"
        );
        assert!(!script.contains("delete"), "{script}");
        assert!(
            !script.contains("element inet miren backend_tcp"),
            "no TCP endpoints: {script}"
        );
    }

    #[test]
    fn a_captured_listing_reads_back_as_the_state_it_was_written_from() {
        let listing = parse_listing(&[LISTING]).unwrap();
        let desired = TableState::desired(&snapshot(&["10.2.0.2:9000", "10.2.0.3:9000"]));
        assert_eq!(listing.state, desired);
        assert_eq!(transaction(&listing.state, &desired), None);

        let counters = listing.counters;
        assert_eq!(
            counters.ports[&UDP_7000],
            PortCounters {
                rx_packets: 5,
                rx_bytes: 500,
                flows: 2,
                tx_packets: 5,
                tx_bytes: 520,
                ..PortCounters::default()
            }
        );
        assert_eq!(counters.ports[&TCP_7001].drop_no_backend, 6);
        assert_eq!(
            counters.backends[&(UDP_7000, ep("10.2.0.3:9000"))],
            BackendCounters {
                packets: 2,
                bytes: 200
            }
        );
        assert_eq!(counters.backends.len(), 2);
        assert_eq!(counters.global, super::super::GlobalCounters::default());
    }

    #[test]
    fn the_same_snapshot_needs_no_transaction() {
        let desired = TableState::desired(&snapshot(&["10.2.0.2:9000"]));
        assert_eq!(transaction(&desired, &desired), None);
        // Duplicates and order of endpoints do not matter.
        let shuffled = TableState::desired(&snapshot(&[
            "10.2.0.3:9000",
            "10.2.0.2:9000",
            "10.2.0.3:9000",
        ]));
        assert_eq!(transaction(&adopted(), &shuffled), None);
    }

    #[test]
    fn an_endpoint_change_touches_only_the_changed_elements() {
        let desired = TableState::desired(&snapshot(&["10.2.0.2:9000", "10.2.0.4:9000"]));
        let script = transaction(&adopted(), &desired).unwrap();
        assert_eq!(
            changes(&script),
            [
                "delete element inet miren endpoints_udp { 7000 . 1 }",
                "delete element inet miren backend_udp { 7000 . 10.2.0.3 . 9000 }",
                "add element inet miren endpoints_udp { 7000 . 1 : 10.2.0.4 . 9000 }",
                "add element inet miren backend_udp { 7000 . 10.2.0.4 . 9000 }",
            ]
        );
        assert_eq!(
            adopted().removed_udp_backends(&desired),
            [(UDP_7000, ep("10.2.0.3:9000"))]
        );
    }

    #[test]
    fn a_new_endpoint_count_moves_the_jump_and_retires_the_unused_chain() {
        let desired = TableState::desired(&snapshot(&[
            "10.2.0.2:9000",
            "10.2.0.3:9000",
            "10.2.0.4:9000",
        ]));
        let script = transaction(&adopted(), &desired).unwrap();
        let changes = changes(&script);
        let at = |line: &str| {
            changes
                .iter()
                .position(|l| *l == line)
                .unwrap_or_else(|| panic!("missing {line:?} in\n{script}"))
        };
        let unjump = at("delete element inet miren nat { udp . 7000 }");
        let jump = at("add element inet miren nat { udp . 7000 : goto endpoints_3 }");
        let create = at("flush chain inet miren endpoints_3");
        let retire = at("delete chain inet miren endpoints_2");
        assert!(unjump < retire && create < jump, "{script}");
        assert!(
            changes
                .contains(&"add element inet miren endpoints_udp { 7000 . 2 : 10.2.0.4 . 9000 }")
        );
        assert!(
            !changes
                .iter()
                .any(|l| l.contains("endpoints_udp { 7000 . 0")),
            "{script}"
        );
        assert!(
            !changes.iter().any(|l| l.contains(" rx ")),
            "counters stay: {script}"
        );
    }

    #[test]
    fn a_changed_rule_is_rewritten_and_a_changed_set_recreates_the_table() {
        let desired = TableState::desired(&snapshot(&["10.2.0.2:9000", "10.2.0.3:9000"]));
        let tampered = LISTING.replace("miren:368176471832e557", "someone else");
        let script = transaction(&parse_listing(&[&tampered]).unwrap().state, &desired).unwrap();
        assert_eq!(
            changes(&script),
            [
                "flush chain inet miren no_endpoints",
                "add rule inet miren no_endpoints meta l4proto . th dport @drops comment \"miren:368176471832e557\"",
                "add rule inet miren no_endpoints drop comment \"miren:f1a2a766dcd55bac\"",
            ]
        );

        let retyped = LISTING.replace(
            r#""name": "drops", "type": ["inet_proto", "inet_service"]"#,
            r#""name": "drops", "type": ["inet_proto", "ipv4_addr"]"#,
        );
        let state = parse_listing(&[&retyped]).unwrap().state;
        assert!(state.incompatible);
        let script = transaction(&state, &desired).unwrap();
        assert!(
            script.starts_with("delete table inet miren\nadd table inet miren\n"),
            "{script}"
        );
        assert!(script.contains("add element inet miren drops { udp . 7000, tcp . 7001 }"));
    }
}
