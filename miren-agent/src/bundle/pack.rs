//! Packing an app directory into a bundle (the CLI's side of a deploy).

use std::{
    io::{self, Read},
    os::unix::{ffi::OsStrExt as _, fs::PermissionsExt as _},
    path::{Path, PathBuf},
};

use super::{
    BIGGEST_LISTED, BundleError, BundleHash, MAX_ENTRIES, MAX_NAME_BYTES, MAX_PATH_BYTES,
    target_stays_inside,
};

/// The name left out at any depth: a git repository's history is not app code.
const SKIPPED_NAME: &str = ".git";
/// The app's config, left out: it travels in the deploy request, so a change of config
/// alone (e.g. `num_instances`) leaves the bundle, and the instances running it, as they are.
const APP_CONFIG: &str = ".miren/app.toml";
/// Bytes of a tar header block.
const BLOCK: u64 = 512;

/// An app directory packed into a bundle.
#[derive(Debug)]
pub struct Packed {
    /// The tar bytes.
    pub tar: Vec<u8>,
    /// Their SHA-256.
    pub hash: BundleHash,
    /// Files, directories and symlinks in it.
    pub entries: usize,
    /// Sockets, fifos and device files of the directory, which a bundle cannot hold (paths
    /// inside the directory).
    pub skipped: Vec<PathBuf>,
}

/// What one entry of the directory is.
#[derive(Debug)]
enum Kind {
    Dir,
    File { size: u64, exec: bool },
    Symlink { target: PathBuf },
}

/// One entry, by its path inside the directory.
#[derive(Debug)]
struct Item {
    rel: PathBuf,
    kind: Kind,
}

/// The directory's entries, in bundle order.
#[derive(Debug, Default)]
struct Walk {
    items: Vec<Item>,
    skipped: Vec<PathBuf>,
    escaping: Vec<(String, String)>,
}

/// Packs `dir` into a tar: every regular file, directory and symlink under it but `.git` (at
/// any depth) and `.miren/app.toml` (sent with the deploy), sorted by path, with mtime 0, uid
/// and gid 0 and mode 0755 (directories and files with an exec bit) or 0644, so the same
/// content always gives the same bytes and hash.
///
/// # Errors
/// [`BundleError::EscapingSymlinks`] when a symlink points outside `dir` (absolute targets
/// included: a bundle holds only what is inside it), [`BundleError::DirectoryTooLarge`]
/// (naming the limit and the biggest files) when the tar would exceed `max_bytes` — checked
/// before any file is read —, [`BundleError::TooManyEntries`], [`BundleError::PathTooLong`],
/// and [`BundleError::Io`] when something cannot be read.
pub fn pack(dir: &Path, max_bytes: u64) -> Result<Packed, BundleError> {
    let walk = walk(dir)?;
    if !walk.escaping.is_empty() {
        return Err(BundleError::EscapingSymlinks {
            dir: dir.to_owned(),
            count: walk.escaping.len(),
            links: walk.escaping.into_iter().take(BIGGEST_LISTED).collect(),
        });
    }
    let at_least = lower_bound(&walk.items);
    if at_least > max_bytes {
        return Err(too_large(dir, at_least, max_bytes, &walk.items));
    }
    let tar = build(dir, &walk.items, at_least)?;
    let size = tar.len() as u64;
    if size > max_bytes {
        return Err(too_large(dir, size, max_bytes, &walk.items));
    }
    Ok(Packed {
        hash: BundleHash::of(&tar),
        tar,
        entries: walk.items.len(),
        skipped: walk.skipped,
    })
}

/// Lists `dir` (without following symlinks), sorted by path component by component, so a
/// directory's entries follow it.
fn walk(dir: &Path) -> Result<Walk, BundleError> {
    let mut walk = Walk::default();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel_dir) = pending.pop() {
        let abs_dir = dir.join(&rel_dir);
        let listing = std::fs::read_dir(&abs_dir).map_err(BundleError::io("listing", &abs_dir))?;
        for entry in listing {
            let entry = entry.map_err(BundleError::io("listing", &abs_dir))?;
            let name = entry.file_name();
            let rel = rel_dir.join(&name);
            if name == SKIPPED_NAME || rel == Path::new(APP_CONFIG) {
                continue;
            }
            check_path(&rel)?;
            let abs = entry.path();
            let meta = std::fs::symlink_metadata(&abs).map_err(BundleError::io("reading", &abs))?;
            let kind = if meta.is_dir() {
                pending.push(rel.clone());
                Kind::Dir
            } else if meta.is_file() {
                Kind::File {
                    size: meta.len(),
                    exec: meta.permissions().mode() & 0o111 != 0,
                }
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&abs).map_err(BundleError::io("reading", &abs))?;
                if !target_stays_inside(&rel, &target) {
                    walk.escaping
                        .push((rel.display().to_string(), target.display().to_string()));
                }
                Kind::Symlink { target }
            } else {
                walk.skipped.push(rel);
                continue;
            };
            walk.items.push(Item { rel, kind });
            if walk.items.len() > MAX_ENTRIES {
                return Err(BundleError::TooManyEntries);
            }
        }
    }
    walk.items.sort_by(|a, b| a.rel.cmp(&b.rel));
    walk.skipped.sort();
    walk.escaping.sort();
    Ok(walk)
}

/// Refuses a path a bundle cannot hold.
fn check_path(rel: &Path) -> Result<(), BundleError> {
    let too_long = rel.as_os_str().len() > MAX_PATH_BYTES
        || rel
            .file_name()
            .is_some_and(|name| name.as_bytes().len() > MAX_NAME_BYTES);
    if too_long {
        return Err(BundleError::PathTooLong {
            path: rel.display().to_string().chars().take(200).collect(),
        });
    }
    Ok(())
}

/// The fewest bytes the tar of `items` takes: a header per entry, file data in whole blocks,
/// two zero blocks at the end (long names add more).
fn lower_bound(items: &[Item]) -> u64 {
    let data: u64 = items
        .iter()
        .map(|item| match item.kind {
            Kind::File { size, .. } => size.div_ceil(BLOCK) * BLOCK,
            Kind::Dir | Kind::Symlink { .. } => 0,
        })
        .sum();
    BLOCK * (items.len() as u64 + 2) + data
}

fn too_large(dir: &Path, size: u64, limit: u64, items: &[Item]) -> BundleError {
    let mut files: Vec<(String, u64)> = items
        .iter()
        .filter_map(|item| match item.kind {
            Kind::File { size, .. } => Some((item.rel.display().to_string(), size)),
            Kind::Dir | Kind::Symlink { .. } => None,
        })
        .collect();
    files.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    files.truncate(BIGGEST_LISTED);
    BundleError::DirectoryTooLarge {
        dir: dir.to_owned(),
        size,
        limit,
        biggest: files,
    }
}

/// The tar of `items` (read from `dir`).
fn build(dir: &Path, items: &[Item], capacity: u64) -> Result<Vec<u8>, BundleError> {
    let mut builder = tar::Builder::new(Vec::with_capacity(usize::try_from(capacity).unwrap_or(0)));
    for item in items {
        let abs = dir.join(&item.rel);
        let failed = BundleError::io("packing", &abs);
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        let appended = match &item.kind {
            Kind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                builder.append_data(&mut header, &item.rel, io::empty())
            }
            Kind::File { size, exec } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(if *exec { 0o755 } else { 0o644 });
                header.set_size(*size);
                let file = std::fs::File::open(&abs).map_err(BundleError::io("reading", &abs))?;
                let mut reader = Counted {
                    inner: file.take(*size),
                    count: 0,
                };
                builder
                    .append_data(&mut header, &item.rel, &mut reader)
                    .and_then(|()| {
                        if reader.count == *size {
                            Ok(())
                        } else {
                            Err(io::Error::other(
                                "the file shrank while it was packed; deploy again",
                            ))
                        }
                    })
            }
            Kind::Symlink { target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, &item.rel, target)
            }
        };
        appended.map_err(failed)?;
    }
    builder
        .into_inner()
        .map_err(BundleError::io("packing", dir))
}

/// A reader counting the bytes it passed on.
struct Counted<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}
