//! IPv4 subnets: `--sandbox-subnet` and the per-node subnets carved out of it.

use std::{fmt, net::Ipv4Addr};

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
}
