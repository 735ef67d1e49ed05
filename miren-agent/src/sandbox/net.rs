//! Sandbox networking with iproute2: the agent's bridge (`--sandbox-bridge`, holding the
//! subnet's first address) and one network namespace per instance, joined to the bridge by a
//! veth pair, with a default route via the bridge. The instance's container joins the namespace
//! (see [`super::container`]).

use std::{net::Ipv4Addr, path::PathBuf, process::Command};

use super::{SandboxError, ipam::Subnet};

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

/// Creates the bridge if needed and gives it the gateway address.
///
/// # Errors
/// [`SandboxError::Command`] when `ip` fails.
pub fn ensure_bridge(bridge: &str, subnet: Subnet) -> Result<(), SandboxError> {
    if ip(&["link", "show", bridge]).is_err() {
        ip(&["link", "add", bridge, "type", "bridge"])?;
    }
    let gateway = format!("{}/{}", subnet.gateway(), subnet.prefix);
    ip(&["addr", "replace", &gateway, "dev", bridge])?;
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

impl SandboxNet {
    /// Creates namespace, veth and routes for sandbox `id` with `addr`; on failure removes
    /// what it created.
    ///
    /// # Errors
    /// [`SandboxError::Command`] or [`SandboxError::Io`].
    pub fn create(
        id: &str,
        bridge: &str,
        subnet: Subnet,
        addr: Ipv4Addr,
    ) -> Result<Self, SandboxError> {
        let net = Self {
            netns: format!("{NETNS_PREFIX}{id}"),
            host_veth: format!("{VETH_PREFIX}{id}"),
            addr,
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
            let cidr = format!("{addr}/{}", subnet.prefix);
            ip(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            let gateway = subnet.gateway().to_string();
            ip(&["-n", ns, "route", "add", "default", "via", &gateway])
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
