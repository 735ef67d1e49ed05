//! Sandbox subnets: `--sandbox-subnet` (IPv4) and the per-node subnets carved out of it, and
//! `--sandbox-subnet6`, whose addresses mirror the IPv4 ones ([`DualStack`]).

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

/// `--sandbox-subnet` (or a subnet derived from it) is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "sandbox subnet \"{0}\" is not an IPv4 CIDR with a prefix from /8 to /30, e.g. 10.88.0.0/16"
)]
pub struct SubnetError(pub String);

/// An IPv4 subnet such as 10.88.0.0/16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subnet {
    /// Network address.
    pub network: Ipv4Addr,
    /// Prefix length (8 to 30).
    pub prefix: u8,
}

impl Subnet {
    /// Parses `A.B.C.D/N` with 8 ≤ N ≤ 30.
    ///
    /// # Errors
    /// [`SubnetError`] naming the text.
    pub fn parse(text: &str) -> Result<Self, SubnetError> {
        let invalid = || SubnetError(text.to_owned());
        let (addr, prefix) = text.split_once('/').ok_or_else(invalid)?;
        let addr: Ipv4Addr = addr.trim().parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix.trim().parse().map_err(|_| invalid())?;
        if !(8..=30).contains(&prefix) {
            return Err(invalid());
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Self {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    /// The bridge's address (the first host address).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Host addresses for sandboxes: after the gateway, before the broadcast address.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let last = u32::from(self.network) + (1u32 << (32 - self.prefix)) - 2;
        (first..=last).map(Ipv4Addr::from)
    }

    /// Whether `addr` is inside the subnet.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(addr) & mask == u32::from(self.network)
    }

    /// The subnets of length `prefix` this one splits into, in address order; none when
    /// `prefix` is shorter than this subnet's or outside /8../30.
    pub fn split(&self, prefix: u8) -> impl Iterator<Item = Subnet> {
        let count = if (self.prefix..=30).contains(&prefix) {
            1u64 << (prefix - self.prefix)
        } else {
            0
        };
        let base = u64::from(u32::from(self.network));
        (0..count).map(move |i| Subnet {
            network: Ipv4Addr::from((base + (i << (32 - prefix))) as u32),
            prefix,
        })
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// `--sandbox-subnet6` is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "sandbox subnet \"{0}\" is not an IPv6 CIDR with a prefix from /48 to /64, e.g. fd6d:6972:656e::/64"
)]
pub struct Subnet6Error(pub String);

/// An IPv6 subnet such as `fd6d:6972:656e::/64` or a node's `/80` of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subnet6 {
    /// Network address.
    pub network: Ipv6Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl Subnet6 {
    /// Parses `ADDR/N` with 48 ≤ N ≤ 64 (room for a /80 per node).
    ///
    /// # Errors
    /// [`Subnet6Error`] naming the text.
    pub fn parse(text: &str) -> Result<Self, Subnet6Error> {
        let invalid = || Subnet6Error(text.to_owned());
        let (addr, prefix) = text.split_once('/').ok_or_else(invalid)?;
        let addr: Ipv6Addr = addr.trim().parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix.trim().parse().map_err(|_| invalid())?;
        if !(48..=64).contains(&prefix) {
            return Err(invalid());
        }
        Ok(Self {
            network: Ipv6Addr::from(u128::from(addr) & (u128::MAX << (128 - prefix))),
            prefix,
        })
    }

    /// The bridge's address (the first host address).
    pub fn gateway(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.network) + 1)
    }

    /// Whether `addr` is inside the subnet.
    pub fn contains(&self, addr: Ipv6Addr) -> bool {
        let mask = u128::MAX << (128 - self.prefix);
        u128::from(addr) & mask == u128::from(self.network)
    }
}

impl fmt::Display for Subnet6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Prefix length of a node's share of `--sandbox-subnet6`.
pub const NODE_PREFIX6: u8 = 80;

/// How sandboxes get their IPv6 addresses: each mirrors its IPv4 one. The IPv4 sandbox subnet
/// is split into node subnets (/`--node-subnet-size`; one node: all of it); node subnet
/// number K gets the /80 number K of `--sandbox-subnet6`, and an instance the address with the
/// same host part as its IPv4 address. Every agent of a cluster (same subnets, same node
/// size) so knows every instance's IPv6 address from its IPv4 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DualStack {
    /// `--sandbox-subnet`.
    pub v4: Subnet,
    /// Prefix length of a node's IPv4 subnet.
    pub node_prefix: u8,
    /// `--sandbox-subnet6`.
    pub v6: Subnet6,
}

impl DualStack {
    /// The IPv6 address of the sandbox at `addr`; `None` outside `--sandbox-subnet`.
    pub fn addr6(&self, addr: Ipv4Addr) -> Option<Ipv6Addr> {
        if !self.v4.contains(addr) {
            return None;
        }
        let offset = u32::from(addr) - u32::from(self.v4.network);
        let host_bits = 32 - u32::from(self.node_prefix);
        let node = u128::from(offset.checked_shr(host_bits).unwrap_or(0));
        let host = u128::from(offset & (u32::MAX.checked_shr(32 - host_bits).unwrap_or(0)));
        Some(Ipv6Addr::from(
            u128::from(self.v6.network) | node << (128 - NODE_PREFIX6) | host,
        ))
    }

    /// The /80 of the node whose IPv4 sandbox subnet is `node`.
    pub fn node_subnet6(&self, node: Subnet) -> Subnet6 {
        let network = self.addr6(node.network).unwrap_or(self.v6.network);
        Subnet6 {
            network,
            prefix: NODE_PREFIX6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_parses_and_rejects() {
        let subnet = Subnet::parse("10.88.1.7/16").unwrap();
        assert_eq!(subnet.network, Ipv4Addr::new(10, 88, 0, 0));
        assert_eq!(subnet.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(subnet.to_string(), "10.88.0.0/16");
        for bad in ["10.88.0.0", "10.88.0.0/31", "10.88.0.0/4", "x/16"] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_subnet_splits_into_node_subnets() {
        let cluster = Subnet::parse("10.88.0.0/16").unwrap();
        let nodes: Vec<String> = cluster.split(24).map(|s| s.to_string()).collect();
        assert_eq!(nodes.len(), 256);
        assert_eq!(nodes[0], "10.88.0.0/24");
        assert_eq!(nodes[255], "10.88.255.0/24");
        assert_eq!(cluster.split(16).count(), 1);
        assert_eq!(cluster.split(8).count(), 0);
        assert!(cluster.contains(Ipv4Addr::new(10, 88, 9, 9)));
        assert!(!cluster.contains(Ipv4Addr::new(10, 89, 0, 1)));
    }

    #[test]
    fn ipv6_addresses_mirror_the_ipv4_ones_in_a_slash_80_per_node() {
        let v6 = Subnet6::parse("fd6d:6972:656e:0:1::/64").unwrap();
        assert_eq!(v6.to_string(), "fd6d:6972:656e::/64");
        for bad in ["fd00::/47", "fd00::/65", "10.0.0.0/16", "fd00::"] {
            assert!(Subnet6::parse(bad).is_err(), "{bad}");
        }
        let cluster = DualStack {
            v4: Subnet::parse("10.88.0.0/16").unwrap(),
            node_prefix: 24,
            v6,
        };
        let node3 = Subnet::parse("10.88.3.0/24").unwrap();
        assert_eq!(
            cluster.node_subnet6(node3).to_string(),
            "fd6d:6972:656e:0:3::/80"
        );
        assert_eq!(
            cluster.addr6(Ipv4Addr::new(10, 88, 3, 17)),
            Some("fd6d:6972:656e:0:3::11".parse().unwrap())
        );
        assert!(
            cluster
                .node_subnet6(node3)
                .contains(cluster.addr6(Ipv4Addr::new(10, 88, 3, 254)).unwrap())
        );
        assert_eq!(cluster.addr6(Ipv4Addr::new(10, 89, 0, 1)), None);
        // One node: the whole IPv4 subnet is node 0's, and its /80 is the first.
        let single = DualStack {
            node_prefix: 16,
            ..cluster
        };
        assert_eq!(
            single.addr6(Ipv4Addr::new(10, 88, 3, 17)),
            Some("fd6d:6972:656e::311".parse().unwrap())
        );
        assert_eq!(
            single.node_subnet6(cluster.v4).to_string(),
            "fd6d:6972:656e::/80"
        );
    }
}
