//! Sandbox addresses: handed out from `--sandbox-subnet` (the first address is the bridge's)
//! and persisted in `<state-dir>/sandbox/addresses.json` before use, so an agent restart never
//! hands out an address that a running or adopted sandbox still holds.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use super::SandboxError;
pub use crate::config::Subnet;

/// Allocated addresses, owner by address, persisted.
#[derive(Debug)]
pub struct Ipam {
    subnet: Subnet,
    file: PathBuf,
    owners: BTreeMap<Ipv4Addr, String>,
    /// The address handed out last: allocation continues after it, so a released address is
    /// not reused at once (peers' ARP caches and conntrack still remember it).
    last: Option<Ipv4Addr>,
}

impl Ipam {
    /// Loads the allocations from `dir/addresses.json` (none when missing).
    ///
    /// # Errors
    /// [`SandboxError::Io`] for an unreadable or corrupt file.
    pub fn open(dir: &Path, subnet: Subnet) -> Result<Self, SandboxError> {
        let file = dir.join("addresses.json");
        let owners = match std::fs::read_to_string(&file) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                SandboxError::io(
                    format!("reading {}", file.display()),
                    std::io::Error::other(e),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(SandboxError::io(format!("reading {}", file.display()), e)),
        };
        let last = owners.keys().next_back().copied();
        Ok(Self {
            subnet,
            file,
            owners,
            last,
        })
    }

    /// The next free address after the last one handed out (wrapping around), recorded for
    /// `owner` on disk before it is returned.
    ///
    /// # Errors
    /// [`SandboxError::SubnetFull`] or [`SandboxError::Io`].
    pub fn allocate(&mut self, owner: &str) -> Result<Ipv4Addr, SandboxError> {
        let after = self.last;
        let addr = self
            .subnet
            .hosts()
            .skip_while(|a| after.is_some_and(|last| *a <= last))
            .chain(self.subnet.hosts())
            .find(|a| !self.owners.contains_key(a))
            .ok_or(SandboxError::SubnetFull(self.subnet.prefix))?;
        self.owners.insert(addr, owner.to_owned());
        if let Err(e) = self.save() {
            self.owners.remove(&addr);
            return Err(e);
        }
        self.last = Some(addr);
        Ok(addr)
    }

    /// Returns `addr` to the pool.
    ///
    /// # Errors
    /// [`SandboxError::Io`] when the file cannot be written.
    pub fn release(&mut self, addr: Ipv4Addr) -> Result<(), SandboxError> {
        if self.owners.remove(&addr).is_some() {
            self.save()?;
        }
        Ok(())
    }

    /// Addresses recorded as in use, with their owners.
    pub fn allocated(&self) -> &BTreeMap<Ipv4Addr, String> {
        &self.owners
    }

    fn save(&self) -> Result<(), SandboxError> {
        let text = serde_json::to_string_pretty(&self.owners).unwrap_or_default();
        let tmp = self.file.with_extension("json.tmp");
        let op = || format!("writing {}", self.file.display());
        std::fs::write(&tmp, text).map_err(|e| SandboxError::io(op(), e))?;
        std::fs::rename(&tmp, &self.file).map_err(|e| SandboxError::io(op(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_survive_reopen_and_are_never_handed_out_twice() {
        let dir = std::env::temp_dir().join(format!("miren-ipam-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let subnet = Subnet::parse("10.99.0.0/29").unwrap();
        let mut ipam = Ipam::open(&dir, subnet).unwrap();
        let a = ipam.allocate("a").unwrap();
        let b = ipam.allocate("b").unwrap();
        assert_eq!(
            (a, b),
            (Ipv4Addr::new(10, 99, 0, 2), Ipv4Addr::new(10, 99, 0, 3))
        );
        drop(ipam);
        let mut reopened = Ipam::open(&dir, subnet).unwrap();
        assert_eq!(reopened.allocate("c").unwrap(), Ipv4Addr::new(10, 99, 0, 4));
        // A released address comes back only after the rest of the subnet was used.
        reopened.release(a).unwrap();
        assert_eq!(reopened.allocate("d").unwrap(), Ipv4Addr::new(10, 99, 0, 5));
        assert_eq!(reopened.allocate("e").unwrap(), Ipv4Addr::new(10, 99, 0, 6));
        assert_eq!(reopened.allocate("f").unwrap(), a);
        // Full now (.7 is the broadcast address).
        assert!(matches!(
            reopened.allocate("g"),
            Err(SandboxError::SubnetFull(29))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
