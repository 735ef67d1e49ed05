//! Running the `nft` command (package nftables), for the nft node-port data plane, the
//! cross-node masquerade and the sandbox firewall: each owns its tables and errors; this only
//! starts `nft`, collects what it said and reads the interval sets of its JSON listings.

use std::{
    collections::BTreeSet,
    io::Write as _,
    process::{Command, Stdio},
};

use serde_json::Value;

use crate::config::Subnet;

/// `nft` could not be run or waited for (as opposed to running and refusing).
#[derive(Debug)]
pub struct NftIoError {
    /// What failed, with what to do when `nft` is missing.
    pub what: &'static str,
    /// Cause.
    pub source: std::io::Error,
}

/// Runs `nft ARGS…` (C locale) with `stdin` (if any): `Ok(stdout)` when it succeeded,
/// `Err(stderr)` when it refused.
///
/// # Errors
/// [`NftIoError`] when `nft` cannot be started or waited for.
pub fn run(args: &[&str], stdin: Option<&str>) -> Result<Result<String, String>, NftIoError> {
    let mut child = Command::new("nft")
        .args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NftIoError {
            what: if source.kind() == std::io::ErrorKind::NotFound {
                "`nft` not found; install the package `nftables` (`cargo xtask setup` does)"
            } else {
                "starting `nft`"
            },
            source,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error means nft exited early; its status and stderr tell why.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| NftIoError {
        what: "waiting for `nft`",
        source,
    })?;
    Ok(if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    })
}

/// Whether `name` is a Linux interface name (1 to 15 of `A-Z a-z 0-9 _ . -`), which also
/// keeps it from breaking out of the quotes in an nft script; the message says why not.
///
/// # Errors
/// A message naming `name` when it is not one.
pub fn check_ifname(name: &str) -> Result<(), String> {
    let valid = (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "\"{name}\" is not an interface name (1 to 15 of A-Z a-z 0-9 _ . -)"
        ))
    }
}

/// `nft -j list ARGS…`: `Ok(Some(json))`, `Ok(None)` when the table or set does not exist,
/// `Err(stderr)` when `nft` refused for another reason.
///
/// # Errors
/// [`NftIoError`] when `nft` cannot be started or waited for.
pub fn list_json(args: &[&str]) -> Result<Result<Option<String>, String>, NftIoError> {
    let args: Vec<&str> = ["-j", "list"].iter().chain(args).copied().collect();
    Ok(match run(&args, None)? {
        Ok(listing) => Ok(Some(listing)),
        Err(stderr) if stderr.contains("No such file or directory") => Ok(None),
        Err(stderr) => Err(stderr),
    })
}

/// The prefix elements (`A.B.C.D/N`) of the sets of a JSON listing (interval sets).
///
/// # Errors
/// A message when the listing is not JSON.
pub fn set_prefixes(listing: &str) -> Result<BTreeSet<Subnet>, String> {
    Ok(prefix_elements(listing)?
        .iter()
        .filter_map(|(addr, len)| Subnet::parse(&format!("{addr}/{len}")).ok())
        .collect())
}

/// The prefix elements of the sets of a JSON listing, of either family: (address, length).
///
/// # Errors
/// A message when the listing is not JSON.
pub fn prefix_elements(listing: &str) -> Result<Vec<(String, u8)>, String> {
    let value: Value = serde_json::from_str(listing)
        .map_err(|e| format!("unreadable `nft -j list` output: {e}"))?;
    let objects = value["nftables"].as_array().cloned().unwrap_or_default();
    Ok(objects
        .iter()
        .filter_map(|object| object["set"]["elem"].as_array())
        .flatten()
        .filter_map(|element| {
            let prefix = &element["prefix"];
            let len = u8::try_from(prefix["len"].as_u64()?).ok()?;
            Some((prefix["addr"].as_str()?.to_owned(), len))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_of_interval_sets_are_read_from_a_json_listing() {
        let listing = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"set": {"family": "inet", "name": "peer_subnets", "table": "miren_sandbox",
              "type": "ipv4_addr", "handle": 4, "flags": ["interval"],
              "elem": [{"prefix": {"addr": "10.88.1.0", "len": 24}},
                       {"prefix": {"addr": "10.88.2.0", "len": 24}}]}}]}"#;
        let subnets: Vec<String> = set_prefixes(listing)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(subnets, ["10.88.1.0/24", "10.88.2.0/24"]);
        assert!(set_prefixes("not json").is_err());
    }
}
