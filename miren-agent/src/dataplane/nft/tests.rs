//! Unit tests of the nft data plane without nft: snapshots to [`TableState`]s, states to
//! transactions and a captured JSON listing back to a state (they cross `state`, `script` and
//! `listing`, and share the listing fixture).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
};

use super::{listing::parse_listing, schema::Scope, script, state::TableState};
use crate::{
    config::Protocol,
    dataplane::{
        BackendCounters, Family, GlobalCounters, NodePortKey, PortCounters, Snapshot, Snapshot4,
    },
};

/// The table the nftables data plane wants for `snapshot` (no external interfaces).
fn desired(snapshot: &Snapshot) -> TableState {
    TableState::desired(snapshot, &Scope::default())
}

/// The transaction of the nftables data plane's table.
fn transaction(current: &TableState, desired: &TableState) -> Option<String> {
    script::transaction(current, desired, &Scope::default())
}

/// `nft -j list table inet miren` after the first apply of [`snapshot`] (nft 1.0.6),
/// trimmed of handles and rule expressions, with counters from some traffic.
const LISTING: &str = r#"{"nftables": [
{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
{"table": {"family": "inet", "name": "miren", "handle": 2}},
{"set": {"name": "node_addrs", "type": "ipv4_addr", "elem": ["10.1.0.2"]}},
{"set": {"name": "node_addrs6", "type": "ipv6_addr", "elem": ["fd00:1::2"]}},
{"set": {"name": "rx", "type": ["inet_proto", "inet_service"], "elem": [{"elem": {"val": {"concat": ["udp", 7000]}, "counter": {"packets": 3, "bytes": 300}}}, {"elem": {"val": {"concat": ["tcp", 7001]}, "counter": {"packets": 4, "bytes": 400}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "rx6", "type": ["inet_proto", "inet_service"], "elem": [{"elem": {"val": {"concat": ["udp", 7000]}, "counter": {"packets": 2, "bytes": 240}}}, {"elem": {"val": {"concat": ["tcp", 7001]}, "counter": {"packets": 2, "bytes": 200}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "flows", "type": ["inet_proto", "inet_service"], "elem": [{"elem": {"val": {"concat": ["udp", 7000]}, "counter": {"packets": 1, "bytes": 100}}}, {"elem": {"val": {"concat": ["tcp", 7001]}, "counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "flows6", "type": ["inet_proto", "inet_service"], "elem": [{"elem": {"val": {"concat": ["udp", 7000]}, "counter": {"packets": 1, "bytes": 120}}}, {"elem": {"val": {"concat": ["tcp", 7001]}, "counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "drops", "type": ["inet_proto", "inet_service"], "elem": [{"elem": {"val": {"concat": ["udp", 7000]}, "counter": {"packets": 0, "bytes": 0}}}, {"elem": {"val": {"concat": ["tcp", 7001]}, "counter": {"packets": 4, "bytes": 400}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "drops6", "type": ["inet_proto", "inet_service"], "elem": [{"elem": {"val": {"concat": ["udp", 7000]}, "counter": {"packets": 0, "bytes": 0}}}, {"elem": {"val": {"concat": ["tcp", 7001]}, "counter": {"packets": 2, "bytes": 200}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "tx_tcp", "type": "inet_service", "elem": [{"elem": {"val": 7001, "counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "tx_udp", "type": "inet_service", "elem": [{"elem": {"val": 7000, "counter": {"packets": 3, "bytes": 300}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "tx_tcp6", "type": "inet_service", "elem": [{"elem": {"val": 7001, "counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "tx_udp6", "type": "inet_service", "elem": [{"elem": {"val": 7000, "counter": {"packets": 2, "bytes": 245}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "backend_tcp", "type": ["inet_service", "ipv4_addr", "inet_service"], "stmt": [{"counter": null}]}},
{"set": {"name": "backend_udp", "type": ["inet_service", "ipv4_addr", "inet_service"], "elem": [{"elem": {"val": {"concat": [7000, "10.2.0.2", 9000]}, "counter": {"packets": 3, "bytes": 300}}}, {"elem": {"val": {"concat": [7000, "10.2.0.3", 9000]}, "counter": {"packets": 0, "bytes": 0}}}], "stmt": [{"counter": null}]}},
{"set": {"name": "backend_tcp6", "type": ["inet_service", "ipv6_addr", "inet_service"], "stmt": [{"counter": null}]}},
{"set": {"name": "backend_udp6", "type": ["inet_service", "ipv6_addr", "inet_service"], "elem": [{"elem": {"val": {"concat": [7000, "fd00:2::2", 9000]}, "counter": {"packets": 0, "bytes": 0}}}, {"elem": {"val": {"concat": [7000, "fd00:2::3", 9000]}, "counter": {"packets": 2, "bytes": 240}}}], "stmt": [{"counter": null}]}},
{"map": {"name": "nat", "type": ["inet_proto", "inet_service"], "map": "verdict", "elem": [[{"concat": ["udp", 7000]}, {"goto": {"target": "endpoints_2"}}], [{"concat": ["tcp", 7001]}, {"goto": {"target": "no_endpoints"}}]]}},
{"map": {"name": "nat6", "type": ["inet_proto", "inet_service"], "map": "verdict", "elem": [[{"concat": ["udp", 7000]}, {"goto": {"target": "endpoints_2"}}], [{"concat": ["tcp", 7001]}, {"goto": {"target": "no_endpoints"}}]]}},
{"map": {"name": "endpoints_tcp", "type": ["inet_service", "integer"], "map": "ipv4_addr . inet_service"}},
{"map": {"name": "endpoints_udp", "type": ["inet_service", "integer"], "map": "ipv4_addr . inet_service", "elem": [[{"concat": [7000, 0]}, {"concat": ["10.2.0.2", 9000]}], [{"concat": [7000, 1]}, {"concat": ["10.2.0.3", 9000]}]]}},
{"map": {"name": "endpoints_tcp6", "type": ["inet_service", "integer"], "map": "ipv6_addr . inet_service"}},
{"map": {"name": "endpoints_udp6", "type": ["inet_service", "integer"], "map": "ipv6_addr . inet_service", "elem": [[{"concat": [7000, 0]}, {"concat": ["fd00:2::2", 9000]}], [{"concat": [7000, 1]}, {"concat": ["fd00:2::3", 9000]}]]}},
{"chain": {"name": "count_in", "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}},
{"chain": {"name": "count_local", "type": "filter", "hook": "output", "prio": -150, "policy": "accept"}},
{"chain": {"name": "count_out", "type": "filter", "hook": "postrouting", "prio": 100, "policy": "accept"}},
{"chain": {"name": "endpoints_2"}},
{"chain": {"name": "nat_in", "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
{"chain": {"name": "nat_local", "type": "nat", "hook": "output", "prio": -100, "policy": "accept"}},
{"chain": {"name": "no_endpoints"}},
{"rule": {"chain": "count_in", "comment": "miren:7ce6ae4d83b9da05"}},
{"rule": {"chain": "count_in", "comment": "miren:4af9e05ae93fd241"}},
{"rule": {"chain": "count_in", "comment": "miren:6f0e0170f0c72628"}},
{"rule": {"chain": "count_in", "comment": "miren:b32fd4a17e245c0c"}},
{"rule": {"chain": "count_in", "comment": "miren:c1ec4c7565196236"}},
{"rule": {"chain": "count_in", "comment": "miren:398795008e6d2caa"}},
{"rule": {"chain": "count_local", "comment": "miren:7ce6ae4d83b9da05"}},
{"rule": {"chain": "count_local", "comment": "miren:4af9e05ae93fd241"}},
{"rule": {"chain": "count_out", "comment": "miren:d733620b5e1aa39a"}},
{"rule": {"chain": "count_out", "comment": "miren:8f006083da064752"}},
{"rule": {"chain": "count_out", "comment": "miren:d9dc220269a48eb6"}},
{"rule": {"chain": "count_out", "comment": "miren:493d906e38dbd442"}},
{"rule": {"chain": "endpoints_2", "comment": "miren:c59c6697aa12ec7a"}},
{"rule": {"chain": "endpoints_2", "comment": "miren:e00ef86e46dca9da"}},
{"rule": {"chain": "endpoints_2", "comment": "miren:25bba61fda718ff9"}},
{"rule": {"chain": "endpoints_2", "comment": "miren:861d410176d355a5"}},
{"rule": {"chain": "endpoints_2", "comment": "miren:64c87c1d78b367b5"}},
{"rule": {"chain": "endpoints_2", "comment": "miren:1bdd42fe565f2699"}},
{"rule": {"chain": "nat_in", "comment": "miren:d1f5cd1c1e3cfd87"}},
{"rule": {"chain": "nat_in", "comment": "miren:f676481bf5d28b17"}},
{"rule": {"chain": "nat_local", "comment": "miren:d1f5cd1c1e3cfd87"}},
{"rule": {"chain": "nat_local", "comment": "miren:f676481bf5d28b17"}},
{"rule": {"chain": "no_endpoints", "comment": "miren:fa85f74ae062a785"}},
{"rule": {"chain": "no_endpoints", "comment": "miren:84afb2889391a68b"}},
{"rule": {"chain": "no_endpoints", "comment": "miren:f1a2a766dcd55bac"}}
]}"#;

/// The first transaction for [`snapshot`] of UDP 7000 → 10.2.0.2 and 10.2.0.3 (and their IPv6
/// twins): every set, map and chain, every rule and every element.
const FIRST_APPLY: &str = r#"add table inet miren
add set inet miren node_addrs { type ipv4_addr; }
add set inet miren node_addrs6 { type ipv6_addr; }
add set inet miren rx { type inet_proto . inet_service; counter; }
add set inet miren rx6 { type inet_proto . inet_service; counter; }
add set inet miren flows { type inet_proto . inet_service; counter; }
add set inet miren flows6 { type inet_proto . inet_service; counter; }
add set inet miren drops { type inet_proto . inet_service; counter; }
add set inet miren drops6 { type inet_proto . inet_service; counter; }
add set inet miren tx_tcp { type inet_service; counter; }
add set inet miren tx_udp { type inet_service; counter; }
add set inet miren tx_tcp6 { type inet_service; counter; }
add set inet miren tx_udp6 { type inet_service; counter; }
add set inet miren backend_tcp { type inet_service . ipv4_addr . inet_service; counter; }
add set inet miren backend_udp { type inet_service . ipv4_addr . inet_service; counter; }
add set inet miren backend_tcp6 { type inet_service . ipv6_addr . inet_service; counter; }
add set inet miren backend_udp6 { type inet_service . ipv6_addr . inet_service; counter; }
add map inet miren nat { type inet_proto . inet_service : verdict; }
add map inet miren nat6 { type inet_proto . inet_service : verdict; }
add map inet miren endpoints_tcp { typeof th dport . meta length : ip daddr . tcp dport; }
add map inet miren endpoints_udp { typeof th dport . meta length : ip daddr . udp dport; }
add map inet miren endpoints_tcp6 { typeof th dport . meta length : ip6 daddr . tcp dport; }
add map inet miren endpoints_udp6 { typeof th dport . meta length : ip6 daddr . udp dport; }
add chain inet miren count_in { type filter hook prerouting priority -150; policy accept; }
add chain inet miren count_local { type filter hook output priority -150; policy accept; }
add chain inet miren count_out { type filter hook postrouting priority 100; policy accept; }
add chain inet miren endpoints_2
add chain inet miren nat_in { type nat hook prerouting priority -100; policy accept; }
add chain inet miren nat_local { type nat hook output priority -100; policy accept; }
add chain inet miren no_endpoints
flush chain inet miren count_in
add rule inet miren count_in ct direction original ip daddr @node_addrs meta l4proto . th dport @rx comment "miren:7ce6ae4d83b9da05"
add rule inet miren count_in ct direction original ip6 daddr @node_addrs6 meta l4proto . th dport @rx6 comment "miren:4af9e05ae93fd241"
add rule inet miren count_in ct direction reply ct status dnat ct original ip daddr @node_addrs meta l4proto tcp ct original proto-dst @tx_tcp comment "miren:6f0e0170f0c72628"
add rule inet miren count_in ct direction reply ct status dnat ct original ip daddr @node_addrs meta l4proto udp ct original proto-dst @tx_udp comment "miren:b32fd4a17e245c0c"
add rule inet miren count_in ct direction reply ct status dnat ct original ip6 daddr @node_addrs6 meta l4proto tcp ct original proto-dst @tx_tcp6 comment "miren:c1ec4c7565196236"
add rule inet miren count_in ct direction reply ct status dnat ct original ip6 daddr @node_addrs6 meta l4proto udp ct original proto-dst @tx_udp6 comment "miren:398795008e6d2caa"
flush chain inet miren count_local
add rule inet miren count_local ct direction original ip daddr @node_addrs meta l4proto . th dport @rx comment "miren:7ce6ae4d83b9da05"
add rule inet miren count_local ct direction original ip6 daddr @node_addrs6 meta l4proto . th dport @rx6 comment "miren:4af9e05ae93fd241"
flush chain inet miren count_out
add rule inet miren count_out ct direction original ct status dnat ct original ip daddr @node_addrs meta l4proto tcp ct original proto-dst . ip daddr . th dport @backend_tcp comment "miren:d733620b5e1aa39a"
add rule inet miren count_out ct direction original ct status dnat ct original ip daddr @node_addrs meta l4proto udp ct original proto-dst . ip daddr . th dport @backend_udp comment "miren:8f006083da064752"
add rule inet miren count_out ct direction original ct status dnat ct original ip6 daddr @node_addrs6 meta l4proto tcp ct original proto-dst . ip6 daddr . th dport @backend_tcp6 comment "miren:d9dc220269a48eb6"
add rule inet miren count_out ct direction original ct status dnat ct original ip6 daddr @node_addrs6 meta l4proto udp ct original proto-dst . ip6 daddr . th dport @backend_udp6 comment "miren:493d906e38dbd442"
flush chain inet miren endpoints_2
add rule inet miren endpoints_2 meta nfproto ipv4 meta l4proto . th dport @flows comment "miren:c59c6697aa12ec7a"
add rule inet miren endpoints_2 meta nfproto ipv6 meta l4proto . th dport @flows6 comment "miren:e00ef86e46dca9da"
add rule inet miren endpoints_2 dnat ip to tcp dport . jhash ip saddr . tcp sport mod 2 seed 0x6d6972 map @endpoints_tcp comment "miren:25bba61fda718ff9"
add rule inet miren endpoints_2 dnat ip to udp dport . jhash ip saddr . udp sport mod 2 seed 0x6d6972 map @endpoints_udp comment "miren:861d410176d355a5"
add rule inet miren endpoints_2 dnat ip6 to tcp dport . jhash ip6 saddr . tcp sport mod 2 seed 0x6d6972 map @endpoints_tcp6 comment "miren:64c87c1d78b367b5"
add rule inet miren endpoints_2 dnat ip6 to udp dport . jhash ip6 saddr . udp sport mod 2 seed 0x6d6972 map @endpoints_udp6 comment "miren:1bdd42fe565f2699"
flush chain inet miren nat_in
add rule inet miren nat_in ip daddr @node_addrs meta l4proto . th dport vmap @nat comment "miren:d1f5cd1c1e3cfd87"
add rule inet miren nat_in ip6 daddr @node_addrs6 meta l4proto . th dport vmap @nat6 comment "miren:f676481bf5d28b17"
flush chain inet miren nat_local
add rule inet miren nat_local ip daddr @node_addrs meta l4proto . th dport vmap @nat comment "miren:d1f5cd1c1e3cfd87"
add rule inet miren nat_local ip6 daddr @node_addrs6 meta l4proto . th dport vmap @nat6 comment "miren:f676481bf5d28b17"
flush chain inet miren no_endpoints
add rule inet miren no_endpoints meta nfproto ipv4 meta l4proto . th dport @drops comment "miren:fa85f74ae062a785"
add rule inet miren no_endpoints meta nfproto ipv6 meta l4proto . th dport @drops6 comment "miren:84afb2889391a68b"
add rule inet miren no_endpoints drop comment "miren:f1a2a766dcd55bac"
add element inet miren nat { udp . 7000 : goto endpoints_2, tcp . 7001 : goto no_endpoints }
add element inet miren nat6 { udp . 7000 : goto endpoints_2, tcp . 7001 : goto no_endpoints }
add element inet miren endpoints_udp { 7000 . 0 : 10.2.0.2 . 9000, 7000 . 1 : 10.2.0.3 . 9000 }
add element inet miren endpoints_udp6 { 7000 . 0 : fd00:2::2 . 9000, 7000 . 1 : fd00:2::3 . 9000 }
add element inet miren node_addrs { 10.1.0.2 }
add element inet miren node_addrs6 { fd00:1::2 }
add element inet miren rx { udp . 7000, tcp . 7001 }
add element inet miren flows { udp . 7000, tcp . 7001 }
add element inet miren drops { udp . 7000, tcp . 7001 }
add element inet miren tx_tcp { 7001 }
add element inet miren tx_udp { 7000 }
add element inet miren rx6 { udp . 7000, tcp . 7001 }
add element inet miren flows6 { udp . 7000, tcp . 7001 }
add element inet miren drops6 { udp . 7000, tcp . 7001 }
add element inet miren tx_tcp6 { 7001 }
add element inet miren tx_udp6 { 7000 }
add element inet miren backend_udp { 7000 . 10.2.0.2 . 9000, 7000 . 10.2.0.3 . 9000 }
add element inet miren backend_udp6 { 7000 . fd00:2::2 . 9000, 7000 . fd00:2::3 . 9000 }
"#;

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

/// The IPv6 twin of an IPv4 endpoint: 10.2.0.X:P → [fd00:2::X]:P.
fn ep6(s: &str) -> SocketAddrV6 {
    let v4 = ep(s);
    let [.., host] = v4.ip().octets();
    SocketAddrV6::new(
        Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, u16::from(host)),
        v4.port(),
        0,
        0,
    )
}

/// Node address 10.1.0.2; UDP 7000 → `udp_endpoints`; TCP 7001 without endpoints.
fn snapshot4(udp_endpoints: &[&str]) -> Snapshot {
    Snapshot4 {
        node_addrs: vec![Ipv4Addr::new(10, 1, 0, 2)],
        node_ports: BTreeMap::from([
            (UDP_7000, udp_endpoints.iter().map(|e| ep(e)).collect()),
            (TCP_7001, Vec::new()),
        ]),
    }
    .into()
}

/// [`snapshot4`] on a dual-stack node: also the node address fd00:1::2 and the IPv6 twin
/// ([`ep6`]) of each of `udp_endpoints6`.
fn dual_stack(udp_endpoints: &[&str], udp_endpoints6: &[&str]) -> Snapshot {
    let mut snapshot = snapshot4(udp_endpoints);
    snapshot
        .node_addrs
        .push(IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2)));
    snapshot
        .node_ports
        .get_mut(&UDP_7000)
        .unwrap()
        .extend(udp_endpoints6.iter().map(|e| SocketAddr::V6(ep6(e))));
    snapshot
}

/// [`dual_stack`] with every endpoint's twin.
fn snapshot(udp_endpoints: &[&str]) -> Snapshot {
    dual_stack(udp_endpoints, udp_endpoints)
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
    let desired = self::desired(&snapshot(&["10.2.0.3:9000", "10.2.0.2:9000"]));
    let script = transaction(&TableState::default(), &desired).unwrap();
    if script != FIRST_APPLY {
        panic!("the first transaction is\n{script}");
    }
}

#[test]
fn a_node_without_ipv6_gets_no_ipv6_elements() {
    let desired = self::desired(&snapshot4(&["10.2.0.2:9000", "10.2.0.3:9000"]));
    let script = transaction(&TableState::default(), &desired).unwrap();
    let elements: Vec<&str> = script
        .lines()
        .filter(|l| l.starts_with("add element"))
        .collect();
    // The IPv6 rules are there, but match no address; IPv6 flows have no endpoints.
    assert!(elements.contains(
        &"add element inet miren nat6 { udp . 7000 : goto no_endpoints, tcp . 7001 : goto no_endpoints }"
    ));
    assert!(
        !elements
            .iter()
            .any(|l| ["node_addrs6", "endpoints_udp6", "backend_udp6"]
                .iter()
                .any(|set| l.contains(&format!(" {set} ")))),
        "{script}"
    );
    // The IPv4 part is the dual-stack one's.
    let v4_lines = |script: &str| -> Vec<String> {
        changes(script)
            .into_iter()
            .filter(|l| !l.contains("6 ") && !l.contains("ip6"))
            .map(str::to_owned)
            .collect()
    };
    let both = self::desired(&snapshot(&["10.2.0.2:9000", "10.2.0.3:9000"]));
    assert_eq!(
        v4_lines(&script),
        v4_lines(&transaction(&TableState::default(), &both).unwrap())
    );

    // The node loses its IPv6 address: the IPv6 endpoints go, their UDP flows are purged.
    let script = transaction(&adopted(), &desired).unwrap();
    assert_eq!(
        changes(&script),
        [
            "delete element inet miren nat6 { udp . 7000 }",
            "delete element inet miren endpoints_udp6 { 7000 . 0, 7000 . 1 }",
            "delete element inet miren node_addrs6 { fd00:1::2 }",
            "delete element inet miren backend_udp6 { 7000 . fd00:2::2 . 9000, 7000 . fd00:2::3 . 9000 }",
            "add element inet miren nat6 { udp . 7000 : goto no_endpoints }",
        ]
    );
    assert_eq!(
        adopted().removed_udp_backends(&desired),
        [
            (UDP_7000, ep6("10.2.0.2:9000").into()),
            (UDP_7000, ep6("10.2.0.3:9000").into())
        ]
    );
}

#[test]
fn a_captured_listing_reads_back_as_the_state_it_was_written_from() {
    let listing = parse_listing(&[LISTING]).unwrap();
    let desired = self::desired(&snapshot(&["10.2.0.2:9000", "10.2.0.3:9000"]));
    assert_eq!(listing.state, desired);
    assert_eq!(transaction(&listing.state, &desired), None);

    let counters = listing.counters;
    assert_eq!(
        counters.families[&(UDP_7000, Family::V4)],
        PortCounters {
            rx_packets: 3,
            rx_bytes: 300,
            flows: 1,
            tx_packets: 3,
            tx_bytes: 300,
            ..PortCounters::default()
        }
    );
    assert_eq!(
        counters.families[&(UDP_7000, Family::V6)],
        PortCounters {
            rx_packets: 2,
            rx_bytes: 240,
            flows: 1,
            tx_packets: 2,
            tx_bytes: 245,
            ..PortCounters::default()
        }
    );
    assert_eq!(
        counters.ports[&UDP_7000],
        PortCounters {
            rx_packets: 5,
            rx_bytes: 540,
            flows: 2,
            tx_packets: 5,
            tx_bytes: 545,
            ..PortCounters::default()
        }
    );
    let drops = |family| counters.families[&(TCP_7001, family)].drop_no_backend;
    assert_eq!((drops(Family::V4), drops(Family::V6)), (4, 2));
    assert_eq!(counters.ports[&TCP_7001].drop_no_backend, 6);
    assert_eq!(counters.families.len(), 4);
    assert_eq!(
        counters.backends[&(UDP_7000, ep("10.2.0.2:9000"))],
        BackendCounters {
            packets: 3,
            bytes: 300
        }
    );
    assert_eq!(
        counters.backends6[&(UDP_7000, ep6("10.2.0.3:9000"))],
        BackendCounters {
            packets: 2,
            bytes: 240
        }
    );
    assert_eq!((counters.backends.len(), counters.backends6.len()), (2, 2));
    let of_port: Vec<(SocketAddr, u64)> = counters
        .backends_of(UDP_7000)
        .map(|(addr, c)| (addr, c.packets))
        .collect();
    assert_eq!(
        of_port,
        [
            (ep("10.2.0.2:9000").into(), 3),
            (ep("10.2.0.3:9000").into(), 0),
            (ep6("10.2.0.2:9000").into(), 0),
            (ep6("10.2.0.3:9000").into(), 2),
        ]
    );
    assert_eq!(counters.backends_of(TCP_7001).count(), 0);
    assert_eq!(counters.global, GlobalCounters::default());
}

#[test]
fn a_table_from_before_per_family_counters_gets_the_ipv6_sets_filled_and_keeps_its_counters() {
    // The earlier agent's table: `rx`, `flows`, `drops`, `tx_*` counted both families; the
    // IPv6 sets do not exist yet (declaring them is part of every transaction).
    let earlier: String = LISTING
        .lines()
        .filter(|line| {
            !["rx6", "flows6", "drops6", "tx_tcp6", "tx_udp6"]
                .iter()
                .any(|set| line.contains(&format!(r#""name": "{set}""#)))
        })
        .collect::<Vec<_>>()
        .join("\n");
    let listing = parse_listing(&[&earlier]).unwrap();
    assert!(!listing.state.incompatible);
    assert!(listing.state.rx.is_empty(), "{:?}", listing.state.rx);
    let desired = self::desired(&snapshot(&["10.2.0.2:9000", "10.2.0.3:9000"]));
    let script = transaction(&listing.state, &desired).unwrap();
    // Every counter set gets every node port; adding an element that exists keeps it and its
    // counter (checked with nft 1.0.6), so the IPv4 counts go on.
    let elements: Vec<&str> = changes(&script)
        .into_iter()
        .filter(|l| l.contains(" element "))
        .collect();
    assert_eq!(
        elements,
        [
            "add element inet miren rx { udp . 7000, tcp . 7001 }",
            "add element inet miren flows { udp . 7000, tcp . 7001 }",
            "add element inet miren drops { udp . 7000, tcp . 7001 }",
            "add element inet miren tx_tcp { 7001 }",
            "add element inet miren tx_udp { 7000 }",
            "add element inet miren rx6 { udp . 7000, tcp . 7001 }",
            "add element inet miren flows6 { udp . 7000, tcp . 7001 }",
            "add element inet miren drops6 { udp . 7000, tcp . 7001 }",
            "add element inet miren tx_tcp6 { 7001 }",
            "add element inet miren tx_udp6 { 7000 }",
        ]
    );
    assert!(!script.contains("delete"), "{script}");
}

#[test]
fn the_same_snapshot_needs_no_transaction() {
    let desired = self::desired(&snapshot(&["10.2.0.2:9000"]));
    assert_eq!(transaction(&desired, &desired), None);
    // Duplicates and order of endpoints do not matter.
    let shuffled = self::desired(&snapshot(&[
        "10.2.0.3:9000",
        "10.2.0.2:9000",
        "10.2.0.3:9000",
    ]));
    assert_eq!(transaction(&adopted(), &shuffled), None);
}

#[test]
fn an_endpoint_change_touches_only_the_changed_elements() {
    let desired = self::desired(&snapshot(&["10.2.0.2:9000", "10.2.0.4:9000"]));
    let script = transaction(&adopted(), &desired).unwrap();
    assert_eq!(
        changes(&script),
        [
            "delete element inet miren endpoints_udp { 7000 . 1 }",
            "delete element inet miren endpoints_udp6 { 7000 . 1 }",
            "delete element inet miren backend_udp { 7000 . 10.2.0.3 . 9000 }",
            "delete element inet miren backend_udp6 { 7000 . fd00:2::3 . 9000 }",
            "add element inet miren endpoints_udp { 7000 . 1 : 10.2.0.4 . 9000 }",
            "add element inet miren endpoints_udp6 { 7000 . 1 : fd00:2::4 . 9000 }",
            "add element inet miren backend_udp { 7000 . 10.2.0.4 . 9000 }",
            "add element inet miren backend_udp6 { 7000 . fd00:2::4 . 9000 }",
        ]
    );
    assert_eq!(
        adopted().removed_udp_backends(&desired),
        [
            (UDP_7000, ep("10.2.0.3:9000").into()),
            (UDP_7000, ep6("10.2.0.3:9000").into())
        ]
    );
}

#[test]
fn a_new_endpoint_count_moves_the_jump_and_retires_the_unused_chain() {
    let desired = self::desired(&snapshot(&[
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
    let unjump6 = at("delete element inet miren nat6 { udp . 7000 }");
    let jump = at("add element inet miren nat { udp . 7000 : goto endpoints_3 }");
    let jump6 = at("add element inet miren nat6 { udp . 7000 : goto endpoints_3 }");
    let create = at("flush chain inet miren endpoints_3");
    let retire = at("delete chain inet miren endpoints_2");
    assert!(
        unjump.max(unjump6) < retire && create < jump.min(jump6),
        "{script}"
    );
    for line in [
        "add element inet miren endpoints_udp { 7000 . 2 : 10.2.0.4 . 9000 }",
        "add element inet miren endpoints_udp6 { 7000 . 2 : fd00:2::4 . 9000 }",
    ] {
        at(line);
    }
    assert!(
        !changes.iter().any(|l| l.contains("{ 7000 . 0")),
        "{script}"
    );
    assert!(
        !changes.iter().any(|l| l.contains(" rx ")),
        "counters stay: {script}"
    );
}

#[test]
fn each_family_jumps_to_the_chain_of_its_own_endpoint_count() {
    // The second instance has no IPv6 address (yet).
    let desired = self::desired(&dual_stack(
        &["10.2.0.2:9000", "10.2.0.3:9000"],
        &["10.2.0.2:9000"],
    ));
    let script = transaction(&adopted(), &desired).unwrap();
    let changes = changes(&script);
    for line in [
        "flush chain inet miren endpoints_1",
        "delete element inet miren nat6 { udp . 7000 }",
        "add element inet miren nat6 { udp . 7000 : goto endpoints_1 }",
        "delete element inet miren endpoints_udp6 { 7000 . 1 }",
        "delete element inet miren backend_udp6 { 7000 . fd00:2::3 . 9000 }",
    ] {
        assert!(changes.contains(&line), "missing {line:?} in\n{script}");
    }
    assert!(
        !changes.iter().any(|l| l.contains(" nat {")
            || l.contains("endpoints_udp {")
            || l.contains("chain inet miren endpoints_2")),
        "IPv4 unchanged: {script}"
    );
    assert!(
        changes.iter().any(|l| l.starts_with(
            "add rule inet miren endpoints_1 dnat ip6 to udp dport . jhash ip6 saddr . udp sport mod 1 "
        )),
        "{script}"
    );
}

#[test]
fn a_changed_rule_is_rewritten_and_a_changed_set_recreates_the_table() {
    let desired = self::desired(&snapshot(&["10.2.0.2:9000", "10.2.0.3:9000"]));
    let tampered = LISTING.replace("miren:fa85f74ae062a785", "someone else");
    let script = transaction(&parse_listing(&[&tampered]).unwrap().state, &desired).unwrap();
    assert_eq!(
        changes(&script),
        [
            "flush chain inet miren no_endpoints",
            "add rule inet miren no_endpoints meta nfproto ipv4 meta l4proto . th dport @drops comment \"miren:fa85f74ae062a785\"",
            "add rule inet miren no_endpoints meta nfproto ipv6 meta l4proto . th dport @drops6 comment \"miren:84afb2889391a68b\"",
            "add rule inet miren no_endpoints drop comment \"miren:f1a2a766dcd55bac\"",
        ]
    );

    for (from, to) in [
        (
            r#""name": "drops", "type": ["inet_proto", "inet_service"]"#,
            r#""name": "drops", "type": ["inet_proto", "ipv4_addr"]"#,
        ),
        (
            r#""name": "backend_udp6", "type": ["inet_service", "ipv6_addr""#,
            r#""name": "backend_udp6", "type": ["inet_service", "ipv4_addr""#,
        ),
        // An IPv4 address in the IPv6 set cannot have been written by this code.
        (r#"["fd00:1::2"]"#, r#"["10.1.0.9"]"#),
    ] {
        let retyped = LISTING.replace(from, to);
        assert_ne!(retyped, LISTING, "{from}");
        let state = parse_listing(&[&retyped]).unwrap().state;
        assert!(state.incompatible, "{to}");
        let script = transaction(&state, &desired).unwrap();
        assert!(
            script.starts_with("delete table inet miren\nadd table inet miren\n"),
            "{script}"
        );
        assert!(script.contains("add element inet miren drops { udp . 7000, tcp . 7001 }"));
    }
}

#[test]
fn the_companion_leaves_xdp_interfaces_alone_and_masquerades_hairpin() {
    let scope = Scope::companion(&["eth0".to_owned(), "eth1".to_owned()]).unwrap();
    let desired = TableState::desired(&snapshot(&["10.2.0.2:9000"]), &scope);
    let script = script::transaction(&TableState::default(), &desired, &scope).unwrap();
    assert!(
        script.lines().all(|l| l.contains(" inet miren_local")),
        "{script}"
    );
    let rules = |chain: &str| -> Vec<&str> {
        let prefix = format!("add rule inet miren_local {chain} ");
        script.lines().filter(|l| l.starts_with(&prefix)).collect()
    };
    let not_xdp = "iifname != { \"eth0\", \"eth1\" } ";
    // Prerouting DNAT and receive counts only for packets XDP cannot see.
    for rule in rules("nat_in")
        .into_iter()
        .chain(rules("count_in").into_iter().take(2))
    {
        assert!(rule.contains(not_xdp), "{rule}");
    }
    // The node's own connections, replies and backend counts (conntrack's DNAT, which XDP
    // never leaves) need no interface condition.
    for chain in ["nat_local", "count_local", "count_out"] {
        assert!(!rules(chain).is_empty() && rules(chain).iter().all(|r| !r.contains("iifname")));
    }
    assert!(
        rules("count_in")[2..]
            .iter()
            .all(|r| !r.contains("iifname"))
    );
    let masquerade = rules("nat_out");
    assert_eq!(masquerade.len(), 2, "{script}");
    assert!(
        masquerade
            .iter()
            .all(|r| r.contains(&format!("meta iif != 0 {not_xdp}masquerade")))
    );
    assert!(script.contains("add chain inet miren_local nat_out { type nat hook postrouting priority 100; policy accept; }"));
    // The nftables data plane keeps every interface, and masquerades hairpin only with
    // external interfaces given.
    let plane = Scope::plane(&["eth0".to_owned()]).unwrap();
    let desired = TableState::desired(&snapshot(&["10.2.0.2:9000"]), &plane);
    let script = script::transaction(&TableState::default(), &desired, &plane).unwrap();
    assert!(
        script
            .lines()
            .filter(|l| l.contains(" nat_in ip"))
            .all(|l| !l.contains("iifname"))
    );
    assert!(
        script.contains("add rule inet miren nat_out ct status dnat"),
        "{script}"
    );
    assert!(
        !transaction(&TableState::default(), &desired_default())
            .unwrap()
            .contains("nat_out")
    );
    assert!(Scope::companion(&["bad name!".to_owned()]).is_err());
}

fn desired_default() -> TableState {
    self::desired(&snapshot(&["10.2.0.2:9000"]))
}
