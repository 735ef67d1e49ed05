//! App code bundles: `miren deploy DIR` packs DIR into a tar ([`pack`]) and uploads it; the
//! agent keeps it content-addressed by the SHA-256 of the tar bytes ([`BundleStore`]) and
//! instances run from the agent's unpacked copy, never from the user's directory.
//!
//! - [`pack`] (the CLI): a deterministic tar of the directory — `.git` left out at any depth,
//!   sorted entries, mtime 0, uid/gid 0, modes 0644/0755 from the exec bit — so the same
//!   content always has the same hash; symlinks leaving the directory are refused.
//! - [`BundleStore`] (the agent): `STATE_DIR/bundles/<hash>.tar` and the unpacked tree
//!   `<hash>/`, both written under `tmp/` and renamed into place, so a crash never leaves a
//!   tree that looks complete. Every bundle enters through [`BundleStore::receive`] and
//!   [`BundleStore::put_verified`], which check the size limit and the hash: the API's
//!   upload uses them, and so will a fetch from a peer.
//! - Unpacking refuses what a hostile tar could use (absolute or `..` paths, hard links,
//!   devices, fifos, symlinks leaving the tree, writing through a symlink) and normalizes
//!   what it keeps (directories 0755, files 0644 or 0755, owned by the agent): the tree is
//!   readable by the per-app container user and mounted read-only.
//! - [`collect_unused`] removes bundles no app and no running instance uses, after every
//!   revision of the control plane (a bundle uploaded in the last [`GC_GRACE`] stays, so an
//!   upload is not collected before its deploy).

mod pack;
mod store;
mod unpack;

#[cfg(test)]
mod tests;

use std::{
    fmt,
    path::{Component, Path, PathBuf},
    str::FromStr,
    time::Duration,
};

pub use pack::{Packed, pack};
pub use store::{BundleStore, BundleUsers, Incoming, collect_unused};

/// The largest bundle (tar bytes) an agent accepts unless configured otherwise.
pub const DEFAULT_MAX_BUNDLE_BYTES: u64 = 256 << 20;
/// The most entries (files, directories, symlinks) in one bundle.
pub const MAX_ENTRIES: usize = 200_000;
/// The longest path inside a bundle, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// The longest name of one path component, in bytes (Linux's `NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;
/// How long an unused bundle is kept after its upload (or its last use by a deploy).
pub const GC_GRACE: Duration = Duration::from_secs(3600);
/// How many of the biggest files a "too large" error lists.
const BIGGEST_LISTED: usize = 5;

/// The SHA-256 of a bundle's tar bytes, as 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BundleHash(String);

impl BundleHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self::from_digest(&sha2::Sha256::digest(bytes))
    }

    fn from_digest(digest: &[u8]) -> Self {
        use fmt::Write as _;
        let mut hex = String::with_capacity(64);
        for byte in digest {
            let _ = write!(hex, "{byte:02x}");
        }
        Self(hex)
    }

    /// The 64 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, for messages.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for BundleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for BundleHash {
    type Err = BundleError;

    /// 64 hex digits, in either case (kept in lowercase).
    fn from_str(text: &str) -> Result<Self, BundleError> {
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(text.to_ascii_lowercase()))
        } else {
            Err(BundleError::InvalidHash {
                text: text.chars().take(80).collect(),
            })
        }
    }
}

/// Errors of packing, receiving, unpacking and collecting bundles.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The text is not a SHA-256 in hex.
    #[error("\"{text}\" is not a bundle hash: expected the 64 hex digits of a SHA-256")]
    InvalidHash {
        /// What was given (at most 80 characters of it).
        text: String,
    },
    /// The app directory packs into more than the limit.
    #[error(
        "the app directory {} packs into a bundle of at least {}, over the limit of {}; the biggest files:\n{}\n  keep large data out of the app directory (everything in it but .git is uploaded)",
        dir.display(),
        format_size(*size),
        format_size(*limit),
        list_biggest(biggest)
    )]
    DirectoryTooLarge {
        /// The app directory.
        dir: PathBuf,
        /// The bundle's size (a lower bound when it was refused before packing).
        size: u64,
        /// The limit in bytes.
        limit: u64,
        /// The biggest files (path inside the directory, bytes), biggest first.
        biggest: Vec<(String, u64)>,
    },
    /// An upload grew past the limit.
    #[error(
        "the bundle is larger than this agent's limit of {} (its --max-bundle-size)",
        format_size(*limit)
    )]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The received bytes do not have the hash they were sent under.
    #[error(
        "the uploaded bytes have SHA-256 {actual}, not {expected} as named in the request: the upload was cut or changed; upload it again"
    )]
    HashMismatch {
        /// The hash the bytes were sent under.
        expected: BundleHash,
        /// The hash of what arrived.
        actual: BundleHash,
    },
    /// Symlinks in the app directory point outside it.
    #[error(
        "the app directory {} has {count} symlink(s) pointing outside it (a bundle holds only what is inside; nothing was uploaded):\n{}\n  copy what they point to into the app directory, or remove them",
        dir.display(),
        list_links(links)
    )]
    EscapingSymlinks {
        /// The app directory.
        dir: PathBuf,
        /// How many there are.
        count: usize,
        /// (symlink inside the directory, its target), the first few of them.
        links: Vec<(String, String)>,
    },
    /// A bundle has more than [`MAX_ENTRIES`] entries.
    #[error(
        "the bundle has more than {MAX_ENTRIES} files, directories and symlinks; keep generated files out of the app directory"
    )]
    TooManyEntries,
    /// A path in a bundle is longer than [`MAX_PATH_BYTES`] or has a component longer than
    /// [`MAX_NAME_BYTES`].
    #[error(
        "{path}: the path is too long for a bundle (at most {MAX_PATH_BYTES} bytes, {MAX_NAME_BYTES} per name)"
    )]
    PathTooLong {
        /// The path (its first 200 characters).
        path: String,
    },
    /// A bundle entry the agent refuses to unpack.
    #[error("the bundle's entry \"{path}\" is refused: {reason}")]
    UnsafeEntry {
        /// The entry's path as written in the tar.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// The bytes are not a readable tar.
    #[error("the bundle is not a valid tar archive: {detail}")]
    Corrupt {
        /// What the tar reader said.
        detail: String,
    },
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl BundleError {
    /// An [`BundleError::Io`] maker for `map_err`.
    pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { op, path, source }
    }

    /// True for a refusal caused by the bundle's content or by the request (not by the
    /// agent's files): the API answers 400 or 413, not 500.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, Self::Io { .. })
    }
}

/// True when a symlink at `link` (a path inside a tree, without `..`) with `target` points
/// inside the tree, resolving `..` lexically. Absolute and empty targets never do.
pub(crate) fn target_stays_inside(link: &Path, target: &Path) -> bool {
    if target.as_os_str().is_empty() {
        return false;
    }
    let mut depth = link.parent().map_or(0, |dir| {
        dir.components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .count()
    });
    for component in target.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir if depth > 0 => depth -= 1,
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// `256 MiB`, `1.5 GiB`, `300 B`: binary units, one decimal below 10.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value >= 10.0 {
        return format!("{value:.0} {}", UNITS[unit]);
    }
    let text = format!("{value:.1}");
    format!(
        "{} {}",
        text.strip_suffix(".0").unwrap_or(&text),
        UNITS[unit]
    )
}

fn list_biggest(files: &[(String, u64)]) -> String {
    let lines: Vec<String> = files
        .iter()
        .map(|(path, size)| format!("  {:>9}  {path}", format_size(*size)))
        .collect();
    lines.join("\n")
}

fn list_links(links: &[(String, String)]) -> String {
    let lines: Vec<String> = links
        .iter()
        .map(|(link, target)| format!("  {link} -> {target}"))
        .collect();
    lines.join("\n")
}
