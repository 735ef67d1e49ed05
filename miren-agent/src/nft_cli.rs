//! Running the `nft` command (package nftables), for the nft node-port data plane and the
//! sandbox firewall: each owns its tables and errors; this only starts `nft` and collects what
//! it said.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

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
