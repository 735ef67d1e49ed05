//! Sandbox networking with iproute2: the agent's bridge (`--sandbox-bridge`, holding the first
//! address of the node's IPv4 subnet and of its IPv6 /80) and one network namespace per
//! instance, joined to the bridge by a veth pair, with both addresses and default routes via
//! the bridge. The instance's container joins the namespace (see [`super::container`]).
//! IPv6 addresses skip duplicate address detection (`nodad`): the agent hands each one out
//! once, and an instance must not wait a second for its address. Where the node has IPv6
//! turned off ([`ipv6_enabled`]), sandboxes get IPv4 only.
//!
//! Hairpin (an instance calling its own app's node port and landing on itself or on another
//! instance here) works the same with and without br_netfilter's `bridge-nf-call-iptables`:
//! - every instance's bridge port is in hairpin mode: with br_netfilter (Docker hosts,
//!   Kubernetes nodes) the kernel bridges the DNATed packet, which may have to go back out of
//!   the port it came in on; a bridge does that only on a hairpin port (kubelet's hairpin-veth
//!   mode does the same). [`ensure_bridge`] also turns it on for ports made by earlier agents;
//! - the nftables table [`HAIRPIN_TABLE`] masquerades node-port flows (`ct status dnat`) from
//!   this node's instances to this node's instances to the bridge's address (as kube-proxy
//!   masquerades hairpin flows): an instance reached at its own address would answer itself
//!   over loopback, and one answering another instance directly would bypass the reverse
//!   translation. Routed (without br_netfilter) the data plane's own hairpin rule does the
//!   same.
//!

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::Command,
};

use super::{SandboxError, ipam::Subnet};
use crate::config::Subnet6;

/// Prefix of every namespace the agent creates (`miren-s<id>`).
pub const NETNS_PREFIX: &str = "miren-s";
/// Prefix of the host side of every sandbox veth (`mvs<id>`).
pub const VETH_PREFIX: &str = "mvs";

fn ip(args: &[&str]) -> Result<(), SandboxError> {
    ip_output(args).map(drop)
}

/// Runs `ip ARGS…`: its stdout.
fn ip_output(args: &[&str]) -> Result<String, SandboxError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| SandboxError::io("running ip (package iproute2)".into(), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SandboxError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Whether IPv6 is on in the agent's network namespace (`net.ipv6.conf.{all,default}.
/// disable_ipv6` are 0; a kernel booted with `ipv6.disable=1` has neither).
pub fn ipv6_enabled() -> bool {
    ["all", "default"].iter().all(|conf| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"))
            .is_ok_and(|value| value.trim() == "0")
    })
}

/// Creates the bridge if needed, gives it the gateway addresses (IPv6 with `subnet6`), puts
/// the instance ports already on it (adopted instances') in hairpin mode and (re)creates
/// [`HAIRPIN_TABLE`] for the subnets.
///
/// # Errors
/// [`SandboxError::Command`] when `ip` fails, [`SandboxError::Firewall`] when `nft` refuses
/// the table, [`SandboxError::Io`] when `nft` cannot run.
pub fn ensure_bridge(
    bridge: &str,
    subnet: Subnet,
    subnet6: Option<Subnet6>,
) -> Result<(), SandboxError> {
    if ip(&["link", "show", bridge]).is_err() {
        ip(&["link", "add", bridge, "type", "bridge"])?;
    }
    let gateway = format!("{}/{}", subnet.gateway(), subnet.prefix);
    ip(&["addr", "replace", &gateway, "dev", bridge])?;
    if let Some(subnet6) = subnet6 {
        let gateway6 = format!("{}/{}", subnet6.gateway(), subnet6.prefix);
        ip(&["-6", "addr", "replace", &gateway6, "dev", bridge, "nodad"])?;
    }
    ip(&["link", "set", bridge, "up"])?;
    let ports = ip_output(&["-o", "link", "show", "master", bridge])?;
    for port in instance_ports(&ports) {
        hairpin(port)?;
    }
    nft(
        "creating the hairpin masquerade (nftables table inet miren_hairpin)",
        &hairpin_script(subnet, subnet6),
    )
}

/// The nftables table masquerading hairpin node-port flows between this node's instances.
pub const HAIRPIN_TABLE: &str = "inet miren_hairpin";

/// The transaction replacing [`HAIRPIN_TABLE`] with one for `subnet` (and `subnet6`).
fn hairpin_script(subnet: Subnet, subnet6: Option<Subnet6>) -> String {
    let v6 = subnet6.map_or(String::new(), |s| {
        format!("\t\tct status dnat ip6 saddr {s} ip6 daddr {s} masquerade\n")
    });
    format!(
        "table {HAIRPIN_TABLE}\n\
         delete table {HAIRPIN_TABLE}\n\
         table {HAIRPIN_TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tct status dnat ip saddr {subnet} ip daddr {subnet} masquerade\n\
         {v6}\
         \t}}\n\
         }}\n"
    )
}

/// Runs `script` as one `nft -f -` transaction, doing `op`.
fn nft(op: &str, script: &str) -> Result<(), SandboxError> {
    crate::nft_cli::run(&["-f", "-"], Some(script))
        .map_err(|e| SandboxError::io(format!("{op}: {}", e.what), e.source))?
        .map_err(|detail| SandboxError::Firewall {
            op: op.to_owned(),
            detail,
        })
        .map(drop)
}

/// The instance ports (`mvs…`) in an `ip -o link show master BRIDGE` listing, whose lines
/// read `INDEX: NAME@PEER: <FLAGS> …`.
fn instance_ports(listing: &str) -> impl Iterator<Item = &str> {
    listing
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name))
        .filter(|name| name.starts_with(VETH_PREFIX))
}

/// Puts bridge port `veth` in hairpin mode.
fn hairpin(veth: &str) -> Result<(), SandboxError> {
    ip(&["link", "set", veth, "type", "bridge_slave", "hairpin", "on"])
}

/// Removes the bridge and [`HAIRPIN_TABLE`] (when the agent stops and nothing is kept).
pub fn remove_bridge(bridge: &str) {
    let _ = ip(&["link", "del", bridge]);
    let _ = nft(
        "removing the hairpin masquerade",
        &format!("table {HAIRPIN_TABLE}\ndelete table {HAIRPIN_TABLE}\n"),
    );
}

/// One sandbox's network: its namespace and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNet {
    /// Namespace name (`ip netns`).
    pub netns: String,
    /// Host side of the veth pair, on the bridge.
    pub host_veth: String,
    /// The sandbox's address.
    pub addr: Ipv4Addr,
}

/// Where a sandbox is put on the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The node's IPv4 sandbox subnet.
    pub subnet: Subnet,
    /// The sandbox's IPv4 address in it.
    pub addr: Ipv4Addr,
    /// The node's IPv6 /80 and the sandbox's address in it (none where IPv6 is off).
    pub v6: Option<(Subnet6, Ipv6Addr)>,
}

impl SandboxNet {
    /// Creates namespace, veth, addresses and routes for sandbox `id` at `at`; on failure
    /// removes what it created.
    ///
    /// # Errors
    /// [`SandboxError::Command`] or [`SandboxError::Io`].
    pub fn create(id: &str, bridge: &str, at: Placement) -> Result<Self, SandboxError> {
        let net = Self {
            netns: format!("{NETNS_PREFIX}{id}"),
            host_veth: format!("{VETH_PREFIX}{id}"),
            addr: at.addr,
        };
        let build = || -> Result<(), SandboxError> {
            ip(&["netns", "add", &net.netns])?;
            ip(&[
                "link",
                "add",
                &net.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &net.netns,
            ])?;
            ip(&["link", "set", &net.host_veth, "master", bridge])?;
            hairpin(&net.host_veth)?;
            ip(&["link", "set", &net.host_veth, "up"])?;
            let ns = &net.netns;
            let cidr = format!("{}/{}", at.addr, at.subnet.prefix);
            ip(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
            if let Some((subnet6, addr6)) = at.v6 {
                let cidr6 = format!("{addr6}/{}", subnet6.prefix);
                ip(&[
                    "-n", ns, "-6", "addr", "add", &cidr6, "dev", "eth0", "nodad",
                ])?;
            }
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            let gateway = at.subnet.gateway().to_string();
            ip(&["-n", ns, "route", "add", "default", "via", &gateway])?;
            if let Some((subnet6, _)) = at.v6 {
                let gateway6 = subnet6.gateway().to_string();
                ip(&["-n", ns, "-6", "route", "add", "default", "via", &gateway6])?;
            }
            Ok(())
        };
        match build() {
            Ok(()) => Ok(net),
            Err(e) => {
                net.remove();
                Err(e)
            }
        }
    }

    /// The namespace's file, which a container joins.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// SIGKILLs every process in the namespace.
    pub fn kill_processes(&self) {
        let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.netns])
            .output()
        else {
            return;
        };
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Deletes the namespace (the veth pair goes with it).
    pub fn remove(&self) {
        let _ = ip(&["link", "del", &self.host_veth]);
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hairpin_flows_within_the_node_subnets_are_masqueraded() {
        let subnet = Subnet::parse("10.88.1.0/24").unwrap();
        let script = hairpin_script(subnet, None);
        assert!(
            script.contains(
                "\t\tct status dnat ip saddr 10.88.1.0/24 ip daddr 10.88.1.0/24 masquerade\n"
            ),
            "{script}"
        );
        assert!(!script.contains("ip6"), "{script}");
        let subnet6 = Subnet6 {
            network: "fd6d:6972:656e:0:1::".parse().unwrap(),
            prefix: 80,
        };
        let script = hairpin_script(subnet, Some(subnet6));
        assert!(
            script.starts_with("table inet miren_hairpin\ndelete table inet miren_hairpin\n"),
            "{script}"
        );
        assert!(
            script.contains("\t\tct status dnat ip6 saddr fd6d:6972:656e:0:1::/80 ip6 daddr fd6d:6972:656e:0:1::/80 masquerade\n"),
            "{script}"
        );
    }

    #[test]
    fn instance_ports_are_read_from_the_bridge_listing() {
        let listing = "7: mvs1a2bx0@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue master miren0 state UP mode DEFAULT group default qlen 1000\\    link/ether 5e:2a:aa:10:11:12 brd ff:ff:ff:ff:ff:ff link-netns miren-s1a2bx0\n\
                       9: eth7: <BROADCAST,MULTICAST> mtu 1500 qdisc noop master miren0 state DOWN\n\
                       12: mvs1a2bx3@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 master miren0\n";
        assert_eq!(
            instance_ports(listing).collect::<Vec<_>>(),
            ["mvs1a2bx0", "mvs1a2bx3"]
        );
        assert_eq!(instance_ports("").count(), 0);
    }
}
