//! Unpacking a received bundle into a tree the agent owns, refusing what a hostile tar could
//! use against the node.

use std::{
    collections::HashSet,
    ffi::OsStr,
    fs::{self, OpenOptions, Permissions},
    io::{self, Read},
    os::unix::{
        ffi::OsStrExt as _,
        fs::{OpenOptionsExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
};

use super::{BundleError, MAX_ENTRIES, MAX_NAME_BYTES, MAX_PATH_BYTES, target_stays_inside};

/// Mode of every directory of an unpacked tree, and of its files with an exec bit.
const EXEC_MODE: u32 = 0o755;
/// Mode of the other files.
const FILE_MODE: u32 = 0o644;
/// Why a directory entry is refused where an earlier entry put something else.
const NOT_A_DIR: &str = "a directory where an earlier entry put a file or symlink";
/// Why an entry below a file or symlink is refused (nothing is written through a symlink).
const THROUGH_NON_DIR: &str = "a path through a symlink or file of an earlier entry";

/// Unpacks the tar `archive` into the existing, empty directory `dest`: regular files,
/// directories and symlinks pointing inside the tree (a tar's global pax header is ignored).
/// Nothing is written through a symlink or outside `dest`; ownership, times and special mode
/// bits are not taken from the tar: directories get 0755, files 0755 when the tar gave them
/// an exec bit, else 0644. Returns the number of entries.
///
/// # Errors
/// [`BundleError::UnsafeEntry`] for an absolute path or one with `..`, a hard link, a device,
/// a fifo, a sparse file, a symlink leaving the tree or without a target, a path through a
/// symlink or a file, or two entries with one path; [`BundleError::TooManyEntries`],
/// [`BundleError::PathTooLong`], [`BundleError::Corrupt`] for what is not a tar, and
/// [`BundleError::Io`] when the tree cannot be written.
pub(super) fn unpack(archive: impl Read, dest: &Path) -> Result<usize, BundleError> {
    let corrupt = |e: io::Error| BundleError::Corrupt {
        detail: e.to_string(),
    };
    let mut archive = tar::Archive::new(archive);
    let mut tree = Tree {
        root: dest,
        dirs: HashSet::new(),
    };
    let mut count = 0;
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        count += 1;
        if count > MAX_ENTRIES {
            return Err(BundleError::TooManyEntries);
        }
        let raw = entry.path_bytes().into_owned();
        let refuse = |reason| BundleError::UnsafeEntry {
            path: shown(&raw),
            reason,
        };
        let Some(rel) = clean_path(&raw)? else {
            // The tree's root itself (`.` or `./`).
            if kind == tar::EntryType::Directory {
                continue;
            }
            return Err(refuse("it names the bundle's root"));
        };
        let mode = entry.header().mode().map_err(corrupt)?;
        match kind {
            tar::EntryType::Directory => tree.dir(&rel, &raw, NOT_A_DIR)?,
            tar::EntryType::Regular => {
                let path = tree.parent_of(&rel, &raw)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| exists_or(e, &raw, &path))?;
                io::copy(&mut entry, &mut file).map_err(corrupt)?;
                let mode = if mode & 0o111 == 0 {
                    FILE_MODE
                } else {
                    EXEC_MODE
                };
                file.set_permissions(Permissions::from_mode(mode))
                    .map_err(BundleError::io("writing", &path))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(std::borrow::Cow::into_owned)
                    .unwrap_or_default();
                if target.len() > MAX_PATH_BYTES {
                    return Err(BundleError::PathTooLong {
                        path: shown(&target),
                    });
                }
                if target.contains(&0)
                    || !target_stays_inside(&rel, Path::new(OsStr::from_bytes(&target)))
                {
                    return Err(refuse("a symlink pointing outside the bundle"));
                }
                let path = tree.parent_of(&rel, &raw)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(|e| exists_or(e, &raw, &path))?;
            }
            tar::EntryType::Link => return Err(refuse("a hard link")),
            tar::EntryType::Char | tar::EntryType::Block => return Err(refuse("a device file")),
            tar::EntryType::Fifo => return Err(refuse("a fifo")),
            tar::EntryType::GNUSparse => return Err(refuse("a sparse file")),
            _ => return Err(refuse("an entry type bundles do not use")),
        }
    }
    Ok(count)
}

/// The directories of a tree being unpacked.
struct Tree<'a> {
    root: &'a Path,
    /// Directories (inside the tree) known to be real directories created here.
    dirs: HashSet<PathBuf>,
}

impl Tree<'_> {
    /// Creates directory `rel` (0755) with its parents, or accepts it when it exists; when
    /// something else is there, refuses the entry `raw` with `reason`.
    fn dir(&mut self, rel: &Path, raw: &[u8], reason: &'static str) -> Result<(), BundleError> {
        if self.dirs.contains(rel) {
            return Ok(());
        }
        let path = self.parent_of(rel, raw)?;
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(BundleError::UnsafeEntry {
                    path: shown(raw),
                    reason,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&path).map_err(BundleError::io("creating", &path))?;
                fs::set_permissions(&path, Permissions::from_mode(EXEC_MODE))
                    .map_err(BundleError::io("creating", &path))?;
            }
            Err(e) => return Err(BundleError::io("reading", &path)(e)),
        }
        self.dirs.insert(rel.to_owned());
        Ok(())
    }

    /// The path of `rel` on disk, once every directory above it is a real directory of the
    /// tree (created 0755 when missing; a symlink or a file there is refused).
    fn parent_of(&mut self, rel: &Path, raw: &[u8]) -> Result<PathBuf, BundleError> {
        if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            self.dir(parent, raw, THROUGH_NON_DIR)?;
        }
        Ok(self.root.join(rel))
    }
}

/// The relative path of an entry with its `.` and empty components dropped; `None` for the
/// root itself.
fn clean_path(raw: &[u8]) -> Result<Option<PathBuf>, BundleError> {
    let refuse = |reason| BundleError::UnsafeEntry {
        path: shown(raw),
        reason,
    };
    if raw.len() > MAX_PATH_BYTES {
        return Err(BundleError::PathTooLong { path: shown(raw) });
    }
    if raw.contains(&0) {
        return Err(refuse("a NUL byte in its path"));
    }
    if raw.starts_with(b"/") {
        return Err(refuse("an absolute path"));
    }
    let mut rel = PathBuf::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(refuse("a `..` in its path")),
            name if name.len() > MAX_NAME_BYTES => {
                return Err(BundleError::PathTooLong { path: shown(raw) });
            }
            name => rel.push(OsStr::from_bytes(name)),
        }
    }
    Ok((!rel.as_os_str().is_empty()).then_some(rel))
}

/// An entry whose path already exists is a duplicate (or would go through a symlink);
/// other failures are the agent's.
fn exists_or(error: io::Error, raw: &[u8], path: &Path) -> BundleError {
    // ELOOP: O_NOFOLLOW met a symlink an earlier entry created at this path.
    if error.kind() == io::ErrorKind::AlreadyExists || error.raw_os_error() == Some(libc::ELOOP) {
        BundleError::UnsafeEntry {
            path: shown(raw),
            reason: "a second entry with the same path",
        }
    } else {
        BundleError::io("writing", path)(error)
    }
}

/// An entry's path for messages: its first 200 characters.
fn shown(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).chars().take(200).collect()
}
