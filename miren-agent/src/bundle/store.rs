//! The agent's bundles in `STATE_DIR/bundles`: `<hash>.tar` as received (what a peer will be
//! served) and `<hash>/`, the unpacked tree instances run from. Both are written under `tmp/`
//! and renamed into place (the blob first, then its tree), so a tree that exists is complete;
//! `tmp/` is emptied when the store opens, and a blob whose tree is missing is unpacked again.

use std::{
    collections::{BTreeSet, HashSet},
    fs::{self, File, OpenOptions, Permissions},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use sha2::Digest as _;
use tokio::sync::watch;

use super::{BundleError, BundleHash, GC_GRACE, unpack::unpack};
use crate::control::ControlPlane;

/// How often unused bundles are looked for even without a change of the desired state (an
/// instance of an old bundle may stop without one).
const GC_INTERVAL: Duration = Duration::from_secs(600);
/// The subdirectory for what is being written or removed.
const TMP: &str = "tmp";

/// Content-addressed app code bundles on this node.
#[derive(Debug)]
pub struct BundleStore {
    dir: PathBuf,
    tmp: PathBuf,
    max_bytes: u64,
    next_tmp: AtomicU64,
    /// Held while a bundle appears, is kept ([`BundleStore::keep`]) or is collected, so a
    /// bundle a deploy is about to use is never removed under it.
    lock: Mutex<()>,
}

impl BundleStore {
    /// Opens the store in `dir` (created 0700), accepting bundles of at most `max_bytes`.
    /// Removes what an interrupted write left in `tmp/` and unpacks again every blob whose
    /// tree is missing (one the unpacking refuses is removed; failures are logged).
    ///
    /// # Errors
    /// [`BundleError::Io`] when the directory cannot be created or listed.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, BundleError> {
        fs::create_dir_all(dir).map_err(BundleError::io("creating", dir))?;
        fs::set_permissions(dir, Permissions::from_mode(0o700))
            .map_err(BundleError::io("creating", dir))?;
        let tmp = dir.join(TMP);
        match fs::remove_dir_all(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(BundleError::io("emptying", &tmp)(e));
            }
            _ => {}
        }
        fs::create_dir(&tmp)
            .and_then(|()| fs::set_permissions(&tmp, Permissions::from_mode(0o700)))
            .map_err(BundleError::io("creating", &tmp))?;
        let store = Self {
            dir: dir.to_owned(),
            tmp,
            max_bytes,
            next_tmp: AtomicU64::new(0),
            lock: Mutex::new(()),
        };
        for hash in store.list()? {
            if store.blob(&hash).is_none() || store.path(&hash).is_some() {
                continue;
            }
            tracing::info!(bundle = %hash, "unpacking a bundle whose unpacking was interrupted");
            if let Err(error) = store.unpack_blob(&hash) {
                tracing::warn!(bundle = %hash, %error, "could not unpack a stored bundle");
            }
        }
        Ok(store)
    }

    /// The largest bundle accepted, in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The unpacked tree of bundle `hash`, if this node has it.
    pub fn path(&self, hash: &BundleHash) -> Option<PathBuf> {
        let path = self.dir.join(hash.as_str());
        fs::symlink_metadata(&path)
            .is_ok_and(|meta| meta.is_dir())
            .then_some(path)
    }

    /// The tar of bundle `hash` as it was received (what a peer is served), if this node has
    /// it.
    pub fn blob(&self, hash: &BundleHash) -> Option<PathBuf> {
        let path = self.blob_path(hash);
        fs::symlink_metadata(&path)
            .is_ok_and(|meta| meta.is_file())
            .then_some(path)
    }

    /// True when this node has bundle `hash`; it is then safe from collection for
    /// [`GC_GRACE`] (a deploy naming it is on its way).
    pub fn keep(&self, hash: &BundleHash) -> bool {
        let _guard = lock(&self.lock);
        if self.path(hash).is_none() {
            return false;
        }
        let touched = File::options()
            .write(true)
            .open(self.blob_path(hash))
            .and_then(|blob| blob.set_modified(SystemTime::now()));
        if let Err(error) = touched {
            tracing::warn!(bundle = %hash, %error, "could not mark a bundle as used");
        }
        true
    }

    /// Starts receiving the bytes of bundle `expected` into a temporary file: the upload of
    /// the API, or (later) a fetch from a peer. Finish with [`BundleStore::put_verified`].
    ///
    /// # Errors
    /// [`BundleError::Io`] when the temporary file cannot be created.
    pub fn receive(&self, expected: BundleHash) -> Result<Incoming, BundleError> {
        let path = self.tmp_path(&expected, "tar");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(BundleError::io("creating", &path))?;
        Ok(Incoming {
            expected,
            file,
            path,
            stored: false,
            hasher: sha2::Sha256::new(),
            len: 0,
            max_bytes: self.max_bytes,
        })
    }

    /// Checks the hash of everything received, stores the blob and unpacks it (see
    /// [`super::unpack`]); returns the unpacked tree. A bundle the node already has is kept
    /// as it is.
    ///
    /// # Errors
    /// [`BundleError::HashMismatch`] when the bytes are not what they were sent as; the
    /// unpacking's refusals ([`BundleError::UnsafeEntry`] and others: the bundle is then not
    /// kept); [`BundleError::Io`] when the files cannot be written.
    pub fn put_verified(&self, mut incoming: Incoming) -> Result<PathBuf, BundleError> {
        let actual = BundleHash::from_digest(&incoming.hasher.finalize_reset());
        let hash = incoming.expected.clone();
        if actual != hash {
            return Err(BundleError::HashMismatch {
                expected: hash,
                actual,
            });
        }
        incoming
            .file
            .sync_all()
            .map_err(BundleError::io("writing", &incoming.path))?;
        let guard = lock(&self.lock);
        if let Some(tree) = self.path(&hash) {
            drop(guard);
            self.keep(&hash);
            return Ok(tree);
        }
        let blob = self.blob_path(&hash);
        fs::rename(&incoming.path, &blob).map_err(BundleError::io("storing", &blob))?;
        incoming.stored = true;
        drop(guard);
        self.unpack_blob(&hash)
    }

    /// Removes the bundles that are not in `in_use` and were neither received nor kept in
    /// the last [`GC_GRACE`]; returns their hashes.
    ///
    /// # Errors
    /// [`BundleError::Io`] when the directory cannot be listed or a bundle cannot be removed.
    pub fn collect_garbage(
        &self,
        in_use: &HashSet<BundleHash>,
    ) -> Result<Vec<BundleHash>, BundleError> {
        let mut removed = Vec::new();
        let mut trees = Vec::new();
        {
            let _guard = lock(&self.lock);
            let now = SystemTime::now();
            for hash in self.list()? {
                if in_use.contains(&hash) {
                    continue;
                }
                let blob = self.blob_path(&hash);
                let used_lately = fs::metadata(&blob)
                    .and_then(|meta| meta.modified())
                    .is_ok_and(|at| now.duration_since(at).unwrap_or_default() < GC_GRACE);
                if used_lately {
                    continue;
                }
                if let Some(tree) = self.path(&hash) {
                    let doomed = self.tmp_path(&hash, "gc");
                    fs::rename(&tree, &doomed).map_err(BundleError::io("removing", &tree))?;
                    trees.push(doomed);
                }
                match fs::remove_file(&blob) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(BundleError::io("removing", &blob)(e));
                    }
                    _ => removed.push(hash),
                }
            }
        }
        for tree in trees {
            fs::remove_dir_all(&tree).map_err(BundleError::io("removing", &tree))?;
        }
        Ok(removed)
    }

    /// The hashes of the blobs and trees in the store.
    fn list(&self) -> Result<BTreeSet<BundleHash>, BundleError> {
        let mut hashes = BTreeSet::new();
        for entry in fs::read_dir(&self.dir).map_err(BundleError::io("listing", &self.dir))? {
            let entry = entry.map_err(BundleError::io("listing", &self.dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let hash = name.strip_suffix(".tar").unwrap_or(&name);
            if let Ok(hash) = hash.parse() {
                hashes.insert(hash);
            }
        }
        Ok(hashes)
    }

    /// Unpacks the stored blob of `hash` into a temporary tree, flushes it to disk and renames
    /// it into place; a blob that does not unpack is removed.
    fn unpack_blob(&self, hash: &BundleHash) -> Result<PathBuf, BundleError> {
        let blob = self.blob_path(hash);
        let staging = self.tmp_path(hash, "tree");
        let unpacked = fs::create_dir(&staging)
            .and_then(|()| fs::set_permissions(&staging, Permissions::from_mode(0o755)))
            .map_err(BundleError::io("creating", &staging))
            .and_then(|()| File::open(&blob).map_err(BundleError::io("reading", &blob)))
            .and_then(|file| unpack(std::io::BufReader::new(file), &staging))
            .and_then(|_| syncfs(&staging));
        if let Err(error) = unpacked {
            let _guard = lock(&self.lock);
            let _ = fs::remove_dir_all(&staging);
            if error.is_client_error() {
                let _ = fs::remove_file(&blob);
            }
            return Err(error);
        }
        let _guard = lock(&self.lock);
        let tree = self.dir.join(hash.as_str());
        if self.path(hash).is_some() {
            // Unpacked meanwhile by a concurrent upload of the same bundle.
            let _ = fs::remove_dir_all(&staging);
        } else {
            fs::rename(&staging, &tree).map_err(BundleError::io("storing", &tree))?;
        }
        Ok(tree)
    }

    fn blob_path(&self, hash: &BundleHash) -> PathBuf {
        self.dir.join(format!("{hash}.tar"))
    }

    /// A fresh name under `tmp/`.
    fn tmp_path(&self, hash: &BundleHash, what: &str) -> PathBuf {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        self.tmp
            .join(format!("{hash}.{what}.{}.{n}", std::process::id()))
    }
}

/// A bundle being received: its bytes go to a temporary file, counted against the limit and
/// hashed on the way. Dropped without [`BundleStore::put_verified`], the file is removed.
#[derive(Debug)]
pub struct Incoming {
    expected: BundleHash,
    file: File,
    /// The temporary file.
    path: PathBuf,
    /// Renamed into the store: nothing to remove on drop.
    stored: bool,
    hasher: sha2::Sha256,
    len: u64,
    max_bytes: u64,
}

impl Incoming {
    /// Appends `chunk`.
    ///
    /// # Errors
    /// [`BundleError::TooLarge`] once more than the store's limit arrived;
    /// [`BundleError::Io`] when the file cannot be written.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), BundleError> {
        self.len += chunk.len() as u64;
        if self.len > self.max_bytes {
            return Err(BundleError::TooLarge {
                limit: self.max_bytes,
            });
        }
        self.hasher.update(chunk);
        self.file
            .write_all(chunk)
            .map_err(BundleError::io("writing", &self.path))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.stored {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Who uses bundles: what they name is never collected.
pub trait BundleUsers: Send + Sync {
    /// The bundles in use now.
    fn bundles_in_use(&self) -> HashSet<BundleHash>;
}

impl BundleUsers for ControlPlane {
    /// The bundles of the deployed apps.
    fn bundles_in_use(&self) -> HashSet<BundleHash> {
        self.deployed_services()
            .iter()
            .filter_map(|service| service.bundle.as_deref()?.parse().ok())
            .collect()
    }
}

/// Removes unused bundles ([`BundleStore::collect_garbage`]) after every revision of the
/// desired state (`revisions`: [`ControlPlane::subscribe`]) and every 10 minutes, until
/// `shutdown`.
pub async fn collect_unused(
    store: Arc<BundleStore>,
    users: Arc<dyn BundleUsers>,
    mut revisions: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(GC_INTERVAL);
    loop {
        tokio::select! {
            changed = revisions.changed() => if changed.is_err() { break },
            _ = every.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
        let in_use = users.bundles_in_use();
        let store = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || store.collect_garbage(&in_use)).await {
            Ok(Ok(removed)) => {
                for hash in removed {
                    tracing::info!(bundle = %hash, "removed an app code bundle no app uses");
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not remove unused app code bundles");
            }
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
}

/// Flushes the filesystem holding `path` to disk, so a tree renamed into place afterwards is
/// complete also after a power loss.
fn syncfs(path: &Path) -> Result<(), BundleError> {
    let dir = File::open(path).map_err(BundleError::io("flushing", path))?;
    // SAFETY: syncfs only reads the descriptor, which `dir` keeps open.
    let result = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) };
    if result == 0 {
        Ok(())
    } else {
        Err(BundleError::io("flushing", path)(
            std::io::Error::last_os_error(),
        ))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
