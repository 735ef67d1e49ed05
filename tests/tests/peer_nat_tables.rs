//! The cross-node masquerade's nftables table (`dataplane::peer_nat`) in a namespace of its
//! own: opening it replaces an earlier agent's IPv4-only `ip miren_peer_nat` with
//! `inet miren_peer_nat`, keeping the subnets it held; peer subnets of both families are set
//! and read back across a reopen with the other data plane's rules.

use miren_agent::{
    config::{DualStack, Subnet, Subnet6},
    dataplane::peer_nat::{Masquerade, PeerNat, PeerSubnets},
    settings::DEFAULT_SANDBOX_SUBNET6,
};
use miren_tests::topology::Netns;

/// `nft ARGS…` in `ns`: its stdout.
fn nft(ns: &Netns, args: &[&str]) -> String {
    let out = ns.exec("nft", args).unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// The table's listing in `ns`.
fn table(ns: &Netns) -> String {
    nft(ns, &["list", "table", "inet", "miren_peer_nat"])
}

#[test]
fn the_table_replaces_the_ipv4_only_one_and_keeps_subnets_of_both_families() {
    let ns = Netns::new("peernat").unwrap();
    // An earlier agent's table.
    nft(
        &ns,
        &["add table ip miren_peer_nat; \
           add set ip miren_peer_nat peer_subnets { type ipv4_addr; flags interval; }; \
           add element ip miren_peer_nat peer_subnets { 10.88.1.0/24 }"],
    );
    assert!(nft(&ns, &["list", "tables"]).contains("table ip miren_peer_nat"));

    let nat = ns
        .run(|| PeerNat::open(&Masquerade::Dnated))
        .unwrap()
        .unwrap();
    let tables = nft(&ns, &["list", "tables"]);
    assert!(!tables.contains("table ip miren_peer_nat"), "{tables}");
    let listing = table(&ns);
    assert!(listing.contains("elements = { 10.88.1.0/24 }"), "{listing}");
    assert!(
        listing.contains("ct status dnat ip6 daddr @peer_subnets6 masquerade"),
        "{listing}"
    );

    let dual = DualStack {
        v4: Subnet::parse("10.88.0.0/16").unwrap(),
        node_prefix: 24,
        v6: Subnet6::parse(DEFAULT_SANDBOX_SUBNET6).unwrap(),
    };
    let peers = PeerSubnets::new([Subnet::parse("10.88.2.0/24").unwrap()], Some(&dual));
    ns.run(|| nat.set_peer_subnets(&peers)).unwrap().unwrap();
    let listing = table(&ns);
    assert!(!listing.contains("10.88.1.0/24"), "{listing}");
    assert!(listing.contains("elements = { 10.88.2.0/24 }"), "{listing}");
    assert!(
        listing.contains("elements = { fd6d:6972:656e:0:2::/80 }"),
        "{listing}"
    );

    // The other data plane's rules, the same subnets.
    let masquerade = Masquerade::ArrivedOn(vec!["eth0".into()]);
    ns.run(|| PeerNat::open(&masquerade)).unwrap().unwrap();
    let listing = table(&ns);
    assert!(
        listing.contains("iifname \"eth0\" ip6 daddr @peer_subnets6 masquerade")
            && !listing.contains("ct status dnat"),
        "{listing}"
    );
    assert!(
        listing.contains("elements = { 10.88.2.0/24 }")
            && listing.contains("elements = { fd6d:6972:656e:0:2::/80 }"),
        "{listing}"
    );
}
