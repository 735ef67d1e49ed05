//! [`parse_listing`]: reading nft's JSON listing of `table inet miren` (or of some of its sets)
//! back as a [`TableState`] and the counters of its elements.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use serde_json::Value;

use super::{
    schema::{BaseChain, Family, SETS, SetDef, SetKind},
    state::{ChainState, TableState},
};
use crate::{
    config::Protocol,
    dataplane::{BackendCounters, Counters, NodePortKey, PortCounters},
};

/// What a listing of the table says: its state and its counters.
#[derive(Debug, Default)]
pub(super) struct Listing {
    pub(super) state: TableState,
    pub(super) counters: Counters,
}

/// The node ports each per-family counter set lists, and their counters by family, until
/// every set is read.
#[derive(Default)]
struct PortSets {
    keys: BTreeMap<SetKind, BTreeSet<NodePortKey>>,
    counters: BTreeMap<(NodePortKey, Family), PortCounters>,
}

impl PortSets {
    /// Records that the set `kind` (of `family`) lists `key`; its counters, to fill in.
    fn listed(&mut self, kind: SetKind, family: Family, key: NodePortKey) -> &mut PortCounters {
        self.keys.entry(kind).or_default().insert(key);
        self.counters.entry((key, family)).or_default()
    }

    /// The node ports listed in the sets `kind` of both families. A node port only one
    /// family's set lists (a table of an agent from before per-family counters) is left out,
    /// so the next transaction adds it to both (adding an element that exists keeps it and
    /// its counter).
    fn in_both(&self, kind: impl Fn(Family) -> SetKind) -> BTreeSet<NodePortKey> {
        let [v4, v6] = Family::ALL.map(|family| self.keys.get(&kind(family)));
        match (v4, v6) {
            (Some(v4), Some(v6)) => v4.intersection(v6).copied().collect(),
            _ => BTreeSet::new(),
        }
    }
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

/// An address of `family`.
fn parse_addr(value: &Value, family: Family) -> Option<IpAddr> {
    let addr: IpAddr = value.as_str()?.parse().ok()?;
    (Family::of(addr) == family).then_some(addr)
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

fn parse_endpoint(addr: &Value, port: &Value, family: Family) -> Option<SocketAddr> {
    Some(SocketAddr::new(
        parse_addr(addr, family)?,
        parse_port(port)?,
    ))
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
pub(super) fn parse_listing(documents: &[&str]) -> Result<Listing, String> {
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
    let mut ports = PortSets::default();
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
            if !parse_elements(state, &mut listing.counters, &mut ports, def, set) {
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
    state.rx = ports.in_both(SetKind::Rx);
    state.flows = ports.in_both(SetKind::Flows);
    state.drops = ports.in_both(SetKind::Drops);
    state.tx = [Protocol::Tcp, Protocol::Udp]
        .iter()
        .flat_map(|protocol| ports.in_both(|family| SetKind::Tx(*protocol, family)))
        .collect();
    let counters = &mut listing.counters;
    // A node port's counters are complete only with its `rx` elements; the others add to them.
    for key in &state.rx {
        for family in Family::ALL {
            let part = ports.counters.remove(&(*key, family)).unwrap_or_default();
            counters.insert_port(*key, family, part);
        }
    }
    counters
        .backends
        .retain(|(key, _), _| state.rx.contains(key));
    counters
        .backends6
        .retain(|(key, _), _| state.rx.contains(key));
    Ok(listing)
}

/// Reads the elements of the set or map `def` into `state` and their counters into
/// `counters`; `false` if an element is not one this code writes.
fn parse_elements(
    state: &mut TableState,
    counters: &mut Counters,
    ports: &mut PortSets,
    def: &SetDef,
    set: &Value,
) -> bool {
    let mut ok = true;
    if def.is_map() {
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
                .and_then(|(key, value)| parse_map_element(state, def.kind, key, value))
                .is_some();
        }
        return ok;
    }
    for (value, counter) in set_elements(set) {
        let parsed = match def.kind {
            SetKind::NodeAddrs(family) => parse_addr(value, family).map(|addr| {
                state.node_addrs.insert(addr);
            }),
            SetKind::Rx(family) => parse_key(value).map(|key| {
                let entry = ports.listed(def.kind, family, key);
                entry.rx_packets = counter.packets;
                entry.rx_bytes = counter.bytes;
            }),
            SetKind::Flows(family) => parse_key(value).map(|key| {
                ports.listed(def.kind, family, key).flows = counter.packets;
            }),
            SetKind::Drops(family) => parse_key(value).map(|key| {
                ports.listed(def.kind, family, key).drop_no_backend = counter.packets;
            }),
            SetKind::Tx(protocol, family) => parse_port(value).map(|port| {
                let entry = ports.listed(def.kind, family, NodePortKey { port, protocol });
                entry.tx_packets = counter.packets;
                entry.tx_bytes = counter.bytes;
            }),
            SetKind::Backend(protocol, family) => match concat(value)[..] {
                [port, addr, endpoint_port] => parse_port(port)
                    .zip(parse_endpoint(addr, endpoint_port, family))
                    .map(|(port, endpoint)| {
                        let key = NodePortKey { port, protocol };
                        state.backends.insert((key, endpoint));
                        counters.insert_backend(
                            key,
                            endpoint,
                            BackendCounters {
                                packets: counter.packets,
                                bytes: counter.bytes,
                            },
                        );
                    }),
                _ => None,
            },
            SetKind::Nat(_) | SetKind::Endpoints(..) => None,
        };
        ok &= parsed.is_some();
    }
    ok
}

/// Reads one element of the map `kind` into `state`; `None` if it is not one this code
/// writes.
fn parse_map_element(
    state: &mut TableState,
    kind: SetKind,
    key: &Value,
    value: &Value,
) -> Option<()> {
    match kind {
        SetKind::Nat(family) => {
            let target = value.get("goto")?.get("target")?.as_str()?;
            state
                .nat
                .insert((family, parse_key(key)?), target.to_owned());
        }
        SetKind::Endpoints(protocol, family) => {
            let [port, slot] = concat(key)[..] else {
                return None;
            };
            let [addr, endpoint_port] = concat(value)[..] else {
                return None;
            };
            let key = NodePortKey {
                protocol,
                port: parse_port(port)?,
            };
            state.endpoints.insert(
                (family, key, parse_u32(slot)?),
                parse_endpoint(addr, endpoint_port, family)?,
            );
        }
        _ => return None,
    }
    Some(())
}
