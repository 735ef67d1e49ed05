//! Sandbox networking with iproute2: the agent's bridge (`--sandbox-bridge`, holding the first
//! address of the node's IPv4 subnet and of its IPv6 /80) and one network namespace per
//! instance, joined to the bridge by a veth pair, with both addresses and default routes via
//! the bridge. The instance's container joins the namespace (see [`super::container`]).
//! IPv6 addresses skip duplicate address detection (`nodad`): the agent hands each one out
//! once, and an instance must not wait a second for its address. Where the node has IPv6
//! turned off ([`ipv6_enabled`]), sandboxes get IPv4 only.

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
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| SandboxError::io("running ip (package iproute2)".into(), e))?;
    if out.status.success() {
        Ok(())
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

/// Creates the bridge if needed and gives it the gateway addresses (IPv6 with `subnet6`).
///
/// # Errors
/// [`SandboxError::Command`] when `ip` fails.
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
    ip(&["link", "set", bridge, "up"])
}

/// Removes the bridge (when the agent stops and nothing is kept).
pub fn remove_bridge(bridge: &str) {
    let _ = ip(&["link", "del", bridge]);
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
            ip(&["link", "set", &net.host_veth, "master", bridge, "up"])?;
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
