//! Unit tests of the nft data plane without nft: snapshots to [`TableState`]s, states to
//! transactions and a captured JSON listing back to a state (they cross `state`, `script` and
//! `listing`, and share the listing fixture).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use super::{listing::parse_listing, script::transaction, state::TableState};
use crate::{
    config::Protocol,
    dataplane::{BackendCounters, GlobalCounters, NodePortKey, PortCounters, Snapshot, Snapshot4},
};

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
    Snapshot4 {
        node_addrs: vec![Ipv4Addr::new(10, 1, 0, 2)],
        node_ports: BTreeMap::from([
            (UDP_7000, udp_endpoints.iter().map(|e| ep(e)).collect()),
            (TCP_7001, Vec::new()),
        ]),
    }
    .into()
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
    assert_eq!(counters.global, GlobalCounters::default());
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
        changes.contains(&"add element inet miren endpoints_udp { 7000 . 2 : 10.2.0.4 . 9000 }")
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
