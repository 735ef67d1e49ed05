//! Running `nft` (through `nft_cli::run`) and `conntrack`: the edge of the data plane that
//! touches the kernel.

use std::{net::SocketAddr, process::Command};

use super::listing::{Listing, parse_listing};
use crate::{
    config::Protocol,
    dataplane::{DataplaneError, NodePortKey},
};

/// Runs `nft ARGS…` with `stdin` (if any): its stdout, or its stderr when it refused.
pub(super) fn nft(
    op: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Result<String, String>, DataplaneError> {
    crate::nft_cli::run(args, stdin).map_err(|e| DataplaneError::Io {
        op: format!("{op}: {}", e.what),
        source: e.source,
    })
}

/// Runs `nft -j list OBJECT…` for each object in parallel and parses the outputs as one
/// listing; objects that do not exist are left out (an empty listing if the table is missing).
pub(super) fn list(op: &str, objects: &[Vec<&str>]) -> Result<Listing, DataplaneError> {
    let command = |detail: String| DataplaneError::Command {
        op: op.to_owned(),
        detail,
    };
    let outputs = std::thread::scope(|scope| {
        let threads: Vec<_> = objects
            .iter()
            .map(|object| {
                let args: Vec<&str> = ["-j", "list"].iter().chain(object).copied().collect();
                // Threads start in the network namespace of the thread that creates them.
                scope.spawn(move || nft(op, &args, None))
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
            .collect::<Vec<_>>()
    });
    let mut documents = Vec::new();
    for output in outputs {
        match output? {
            Ok(json) => documents.push(json),
            Err(stderr) if stderr.contains("No such file or directory") => {}
            Err(stderr) => return Err(command(stderr)),
        }
    }
    let documents: Vec<&str> = documents.iter().map(String::as_str).collect();
    parse_listing(&documents).map_err(command)
}

/// Reads the whole table `inet NAME`.
pub(super) fn list_table(op: &str, name: &str) -> Result<Listing, DataplaneError> {
    list(op, &[vec!["table", "inet", name]])
}

/// Deletes the conntrack entries from `key` to a removed `endpoint` (of either family) that
/// would keep new packets on it; none matching is fine. UDP: every entry, so the flows move to
/// a live endpoint with their next datagram. TCP: only connection attempts the endpoint never
/// answered (state `SYN_SENT`, kept up to 120 s), which would otherwise capture a retry from
/// the same client port; established connections stay (a draining instance finishes them).
pub(super) fn purge_conntrack(
    key: NodePortKey,
    endpoint: SocketAddr,
) -> Result<(), DataplaneError> {
    let op = format!("deleting conntrack entries of {key} to {endpoint}");
    let family = if endpoint.is_ipv4() { "ipv4" } else { "ipv6" };
    let protocol: &[&str] = match key.protocol {
        Protocol::Udp => &["-p", "udp"],
        Protocol::Tcp => &["-p", "tcp", "--state", "SYN_SENT"],
    };
    let out = Command::new("conntrack")
        .args(["-D", "-f", family])
        .args(protocol)
        .arg("--orig-port-dst")
        .arg(key.port.to_string())
        .arg("--reply-src")
        .arg(endpoint.ip().to_string())
        .arg("--reply-port-src")
        .arg(endpoint.port().to_string())
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| DataplaneError::Io {
            op: if source.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "{op}: `conntrack` not found; install the package `conntrack` \
                     (`cargo xtask setup` does)"
                )
            } else {
                format!("{op}: starting `conntrack`")
            },
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // conntrack exits 1 when no entry matched.
    if out.status.success() || stderr.contains(" 0 flow entries") {
        Ok(())
    } else {
        Err(DataplaneError::Command {
            op,
            detail: stderr.trim().to_owned(),
        })
    }
}
