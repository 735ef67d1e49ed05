//! [`transaction`]: the `nft -f` script that turns one [`TableState`] into another.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use super::{
    schema::{Family, SETS, Scope, SetKind, chain_def, fingerprint, set_def},
    state::TableState,
};
use crate::{config::Protocol, dataplane::NodePortKey};

/// Most elements per `add element` / `delete element` line.
const ELEMENTS_PER_LINE: usize = 512;

fn proto(protocol: Protocol) -> &'static str {
    protocol.as_str()
}

fn port_elem(key: &NodePortKey) -> String {
    format!("{} . {}", proto(key.protocol), key.port)
}

fn backend_elem((key, endpoint): &(NodePortKey, SocketAddr)) -> String {
    format!("{} . {} . {}", key.port, endpoint.ip(), endpoint.port())
}

/// A transaction being built, in sections that run in this order.
#[derive(Default)]
struct Script {
    /// Family and name of the table (`inet miren`).
    table: String,
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
    fn elements(table: &str, out: &mut Vec<String>, verb: &str, set: &str, elems: Vec<String>) {
        for chunk in elems.chunks(ELEMENTS_PER_LINE) {
            out.push(format!(
                "{verb} element {table} {set} {{ {} }}",
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
        Self::elements(&self.table, &mut self.delete, "delete", set, gone);
        let new = desired.difference(current).map(&render).collect();
        Self::elements(&self.table, &mut self.add, "add", set, new);
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
        Self::elements(&self.table, &mut self.delete, "delete", map, gone);
        let new = desired
            .iter()
            .filter(|(k, v)| current.get(k) != Some(v))
            .map(|(k, v)| format!("{} : {}", key(k), value(v)))
            .collect();
        Self::elements(&self.table, &mut self.add, "add", map, new);
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

/// The transaction that turns `current` into `desired` in the table of `scope`; `None` when
/// they are equal.
pub(super) fn transaction(
    current: &TableState,
    desired: &TableState,
    scope: &Scope,
) -> Option<String> {
    let table = scope.table();
    let table = table.as_str();
    let mut script = Script {
        table: table.to_owned(),
        ..Script::default()
    };
    let empty = TableState::default();
    let current = if current.exists && current.incompatible {
        script.teardown.push(format!("delete table {table}"));
        &empty
    } else {
        current
    };

    script.declare.push(format!("add table {table}"));
    for set in SETS {
        let kind = if set.is_map() { "map" } else { "set" };
        script.declare.push(format!(
            "add {kind} {table} {} {{ {} }}",
            set.name, set.declaration
        ));
    }
    for (name, wanted) in &desired.chains {
        let def = chain_def(name, scope).expect("desired chains have definitions");
        let existing = current.chains.get(name);
        if existing.is_some_and(|chain| chain.base != wanted.base) {
            script.teardown.push(format!("flush chain {table} {name}"));
            script.teardown.push(format!("delete chain {table} {name}"));
        }
        script.declare.push(match &def.base {
            Some(base) => format!(
                "add chain {table} {name} {{ type {} hook {} priority {}; policy {}; }}",
                base.kind, base.hook, base.priority, base.policy
            ),
            None => format!("add chain {table} {name}"),
        });
        if existing != Some(wanted) {
            script.rules.push(format!("flush chain {table} {name}"));
            for rule in &def.rules {
                script.rules.push(format!(
                    "add rule {table} {name} {rule} comment \"{}\"",
                    fingerprint(rule)
                ));
            }
        }
    }
    for name in current.chains.keys() {
        if !desired.chains.contains_key(name) {
            script.retire.push(format!("flush chain {table} {name}"));
            script.retire.push(format!("delete chain {table} {name}"));
        }
    }

    for family in Family::ALL {
        let of = |nat: &BTreeMap<(Family, NodePortKey), String>| -> BTreeMap<_, _> {
            nat.iter()
                .filter(|((f, _), _)| *f == family)
                .map(|((_, key), chain)| (*key, chain.clone()))
                .collect()
        };
        script.diff_map(
            set_def(SetKind::Nat(family)).name,
            &of(&current.nat),
            &of(&desired.nat),
            port_elem,
            |chain| format!("goto {chain}"),
        );
    }
    for family in Family::ALL {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let of = |endpoints: &BTreeMap<(Family, NodePortKey, u32), SocketAddr>| {
                endpoints
                    .iter()
                    .filter(|((f, k, _), _)| *f == family && k.protocol == protocol)
                    .map(|((_, k, slot), endpoint)| ((k.port, *slot), *endpoint))
                    .collect::<BTreeMap<_, _>>()
            };
            script.diff_map(
                set_def(SetKind::Endpoints(protocol, family)).name,
                &of(&current.endpoints),
                &of(&desired.endpoints),
                |(port, slot)| format!("{port} . {slot}"),
                |endpoint| format!("{} . {}", endpoint.ip(), endpoint.port()),
            );
        }
    }
    for family in Family::ALL {
        let of = |addrs: &BTreeSet<std::net::IpAddr>| -> BTreeSet<_> {
            addrs
                .iter()
                .filter(|a| Family::of(**a) == family)
                .copied()
                .collect()
        };
        script.diff_set(
            set_def(SetKind::NodeAddrs(family)).name,
            &of(&current.node_addrs),
            &of(&desired.node_addrs),
            |a| a.to_string(),
        );
    }
    // Each family's counter sets hold every node port.
    for family in Family::ALL {
        for (kind, current_keys, desired_keys) in [
            (SetKind::Rx(family), &current.rx, &desired.rx),
            (SetKind::Flows(family), &current.flows, &desired.flows),
            (SetKind::Drops(family), &current.drops, &desired.drops),
        ] {
            script.diff_set(set_def(kind).name, current_keys, desired_keys, port_elem);
        }
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let of = |keys: &BTreeSet<NodePortKey>| -> BTreeSet<u16> {
                keys.iter()
                    .filter(|k| k.protocol == protocol)
                    .map(|k| k.port)
                    .collect()
            };
            script.diff_set(
                set_def(SetKind::Tx(protocol, family)).name,
                &of(&current.tx),
                &of(&desired.tx),
                u16::to_string,
            );
        }
    }
    for family in Family::ALL {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let of = |backends: &BTreeSet<(NodePortKey, SocketAddr)>| -> BTreeSet<_> {
                backends
                    .iter()
                    .filter(|(k, e)| k.protocol == protocol && Family::of(e.ip()) == family)
                    .copied()
                    .collect()
            };
            script.diff_set(
                set_def(SetKind::Backend(protocol, family)).name,
                &of(&current.backends),
                &of(&desired.backends),
                backend_elem,
            );
        }
    }
    // Nothing to write when only the idempotent declarations remain.
    (!script.is_empty()).then(|| script.render())
}
