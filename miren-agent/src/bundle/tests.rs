use std::{
    collections::HashSet,
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, SystemTime},
};

use super::*;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("miren-bundle-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn write(dir: &Path, rel: &str, text: &str) {
    let path = dir.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// An app directory: nested files, an executable, an empty directory, an inside symlink.
fn sample_app(dir: &Path) {
    write(dir, ".miren/app.toml", "name = \"shop\"\n");
    write(dir, "web.py", "print('hi')\n");
    write(dir, "static/css/site.css", "body {}\n");
    write(dir, "bin/run", "#!/bin/sh\nexec python3 web.py\n");
    fs::set_permissions(dir.join("bin/run"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::create_dir_all(dir.join("empty")).unwrap();
    symlink("static/css", dir.join("css")).unwrap();
    symlink("../web.py", dir.join("bin/web.py")).unwrap();
}

/// What is left in the store's `tmp/` (nothing, once every write ended).
fn leftovers(dir: &Path) -> usize {
    fs::read_dir(dir.join("bundles/tmp")).unwrap().count()
}

/// [`sample_app`] in `DIR/app`, and its bundle.
fn sample_bundle(dir: &Path) -> (PathBuf, Packed) {
    let app = dir.join("app");
    sample_app(&app);
    let packed = pack(&app, DEFAULT_MAX_BUNDLE_BYTES).unwrap();
    (app, packed)
}

fn store(dir: &Path, max_bytes: u64) -> BundleStore {
    BundleStore::open(&dir.join("bundles"), max_bytes).unwrap()
}

/// Receives `bytes` as the bundle they hash to.
fn put(store: &BundleStore, bytes: &[u8]) -> Result<PathBuf, BundleError> {
    put_as(store, &BundleHash::of(bytes), bytes)
}

fn put_as(store: &BundleStore, hash: &BundleHash, bytes: &[u8]) -> Result<PathBuf, BundleError> {
    let mut incoming = store.receive(hash.clone())?;
    for chunk in bytes.chunks(1000) {
        incoming.write(chunk)?;
    }
    store.put_verified(incoming)
}

fn entry_names(tar: &[u8]) -> Vec<String> {
    tar::Archive::new(tar)
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect()
}

#[test]
fn hashes_parse_in_either_case_and_nothing_else() {
    let hash = BundleHash::of(b"abc");
    assert_eq!(
        hash.as_str(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(hash.short(), "ba7816bf8f01");
    let upper: BundleHash = hash.as_str().to_ascii_uppercase().parse().unwrap();
    assert_eq!(upper, hash);
    for bad in [
        "",
        "abc",
        &format!("{hash}0"),
        &hash.as_str().replace('a', "g"),
    ] {
        let err = bad.parse::<BundleHash>().unwrap_err();
        assert!(err.to_string().contains("64 hex digits"), "{err}");
    }
}

#[test]
fn sizes_are_shown_in_binary_units() {
    assert_eq!(format_size(300), "300 B");
    assert_eq!(format_size(1536), "1.5 KiB");
    assert_eq!(format_size(256 << 20), "256 MiB");
    assert_eq!(format_size(1 << 30), "1 GiB");
}

#[test]
fn packing_is_deterministic_and_ignores_times_owners_and_copies() {
    let a = TempDir::new("det-a");
    let b = TempDir::new("det-b");
    sample_app(a.path());
    // Written in another order, other times and non-exec modes: the same bundle.
    symlink("../web.py", {
        fs::create_dir_all(b.path().join("bin")).unwrap();
        b.path().join("bin/web.py")
    })
    .unwrap();
    write(b.path(), "bin/run", "#!/bin/sh\nexec python3 web.py\n");
    fs::set_permissions(b.path().join("bin/run"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::create_dir_all(b.path().join("empty")).unwrap();
    write(b.path(), "static/css/site.css", "body {}\n");
    symlink("static/css", b.path().join("css")).unwrap();
    write(b.path(), "web.py", "print('hi')\n");
    fs::set_permissions(b.path().join("web.py"), fs::Permissions::from_mode(0o600)).unwrap();
    write(b.path(), ".miren/app.toml", "name = \"shop\"\n");
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    fs::File::options()
        .write(true)
        .open(b.path().join("web.py"))
        .unwrap()
        .set_modified(old)
        .unwrap();

    let first = pack(a.path(), DEFAULT_MAX_BUNDLE_BYTES).unwrap();
    let again = pack(a.path(), DEFAULT_MAX_BUNDLE_BYTES).unwrap();
    let copy = pack(b.path(), DEFAULT_MAX_BUNDLE_BYTES).unwrap();
    assert_eq!(first.hash, again.hash);
    assert_eq!(first.tar, copy.tar);
    assert_eq!(first.hash, BundleHash::of(&first.tar));
    assert_eq!(first.entries, 10);
    assert!(first.skipped.is_empty());
    assert_eq!(
        entry_names(&first.tar),
        [
            ".miren",
            "bin",
            "bin/run",
            "bin/web.py",
            "css",
            "empty",
            "static",
            "static/css",
            "static/css/site.css",
            "web.py"
        ]
    );
    for entry in tar::Archive::new(&first.tar[..]).entries().unwrap() {
        let entry = entry.unwrap();
        let header = entry.header();
        assert_eq!(header.mtime().unwrap(), 0);
        assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (0, 0));
    }

    // The app's config is not code: it travels with the deploy.
    write(
        a.path(),
        ".miren/app.toml",
        "name = \"shop\"\n[services.web]\n",
    );
    assert_eq!(
        pack(a.path(), DEFAULT_MAX_BUNDLE_BYTES).unwrap().hash,
        first.hash
    );
    // Content and the exec bit count.
    write(a.path(), "web.py", "print('bye')\n");
    assert_ne!(
        pack(a.path(), DEFAULT_MAX_BUNDLE_BYTES).unwrap().hash,
        first.hash
    );
    write(a.path(), "web.py", "print('hi')\n");
    fs::set_permissions(a.path().join("web.py"), fs::Permissions::from_mode(0o755)).unwrap();
    assert_ne!(
        pack(a.path(), DEFAULT_MAX_BUNDLE_BYTES).unwrap().hash,
        first.hash
    );
}

#[test]
fn git_directories_are_left_out_at_any_depth() {
    let dir = TempDir::new("git");
    write(dir.path(), "app.py", "x = 1\n");
    let without = pack(dir.path(), DEFAULT_MAX_BUNDLE_BYTES).unwrap();
    write(dir.path(), ".git/HEAD", "ref: refs/heads/main\n");
    write(dir.path(), ".git/objects/ab/cdef", "blob");
    // A submodule's `.git` is a file.
    write(
        dir.path(),
        "vendor/lib/.git",
        "gitdir: ../../.git/modules/lib\n",
    );
    write(dir.path(), "vendor/lib/lib.py", "y = 2\n");
    write(dir.path(), ".gitignore", "*.pyc\n");
    let packed = pack(dir.path(), DEFAULT_MAX_BUNDLE_BYTES).unwrap();
    assert_eq!(
        entry_names(&packed.tar),
        [
            ".gitignore",
            "app.py",
            "vendor",
            "vendor/lib",
            "vendor/lib/lib.py"
        ]
    );
    fs::remove_file(dir.path().join(".gitignore")).unwrap();
    fs::remove_dir_all(dir.path().join("vendor")).unwrap();
    assert_eq!(
        pack(dir.path(), DEFAULT_MAX_BUNDLE_BYTES).unwrap().hash,
        without.hash
    );
}

#[test]
fn a_directory_over_the_limit_is_refused_naming_the_limit_and_the_biggest_files() {
    let dir = TempDir::new("big");
    for (name, size) in [
        ("a.bin", 40_000),
        ("b.bin", 90_000),
        ("data/c.bin", 70_000),
        ("d.bin", 10_000),
        ("e.bin", 60_000),
        ("tiny.txt", 10),
    ] {
        write(dir.path(), name, &"x".repeat(size));
    }
    let err = pack(dir.path(), 200 << 10).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(&err, BundleError::DirectoryTooLarge { limit, biggest, .. }
            if *limit == 200 << 10 && biggest.len() == 5),
        "{err:?}"
    );
    assert!(text.contains("over the limit of 200 KiB"), "{text}");
    let order: Vec<usize> = ["b.bin", "data/c.bin", "e.bin", "a.bin", "d.bin"]
        .iter()
        .map(|name| text.find(&format!("  {name}")).expect(name))
        .collect();
    assert!(order.is_sorted(), "{text}");
    assert!(text.contains("88 KiB  b.bin"), "{text}");
    assert!(!text.contains("tiny.txt"), "{text}");
    // A large sparse file is refused before it is read.
    let sparse = TempDir::new("sparse");
    let file = fs::File::create(sparse.path().join("disk.img")).unwrap();
    file.set_len(1 << 36).unwrap();
    let err = pack(sparse.path(), DEFAULT_MAX_BUNDLE_BYTES).unwrap_err();
    assert!(err.to_string().contains("64 GiB  disk.img"), "{err}");
    assert!(pack(dir.path(), 300 << 10).is_ok());
}

#[test]
fn symlinks_leaving_the_directory_are_refused() {
    let dir = TempDir::new("links");
    write(dir.path(), "sub/file", "x");
    symlink("file", dir.path().join("sub/ok")).unwrap();
    symlink("..", dir.path().join("sub/root")).unwrap();
    symlink("../sub/./file", dir.path().join("sub/ok2")).unwrap();
    assert!(pack(dir.path(), DEFAULT_MAX_BUNDLE_BYTES).is_ok());
    symlink("../../etc", dir.path().join("sub/escape")).unwrap();
    symlink("/etc/passwd", dir.path().join("abs")).unwrap();
    let err = pack(dir.path(), DEFAULT_MAX_BUNDLE_BYTES).unwrap_err();
    assert!(
        matches!(&err, BundleError::EscapingSymlinks { count: 2, .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("  sub/escape -> ../../etc\n"), "{text}");
    assert!(text.contains("  abs -> /etc/passwd\n"), "{text}");
    assert!(text.contains("nothing was uploaded"), "{text}");
}

#[test]
fn special_files_are_skipped_and_named() {
    let dir = TempDir::new("fifo");
    write(dir.path(), "app.py", "x = 1\n");
    nix::unistd::mkfifo(&dir.path().join("queue"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let packed = pack(dir.path(), DEFAULT_MAX_BUNDLE_BYTES).unwrap();
    assert_eq!(packed.skipped, [PathBuf::from("queue")]);
    assert_eq!(entry_names(&packed.tar), ["app.py"]);
}

#[test]
fn a_packed_directory_unpacks_with_normalized_modes() {
    let dir = TempDir::new("roundtrip");
    let app = dir.path().join("app");
    sample_app(&app);
    fs::set_permissions(app.join("web.py"), fs::Permissions::from_mode(0o600)).unwrap();
    let packed = pack(&app, DEFAULT_MAX_BUNDLE_BYTES).unwrap();
    let store = store(dir.path(), DEFAULT_MAX_BUNDLE_BYTES);
    assert_eq!(store.path(&packed.hash), None);
    assert!(!store.keep(&packed.hash));
    let tree = put(&store, &packed.tar).unwrap();
    assert_eq!(store.path(&packed.hash), Some(tree.clone()));
    assert!(store.keep(&packed.hash));
    let blob = store.blob(&packed.hash).unwrap();
    assert_eq!(fs::read(&blob).unwrap(), packed.tar);
    assert_eq!(mode(&blob), 0o600);
    assert_eq!(mode(&dir.path().join("bundles")), 0o700);
    assert_eq!(
        fs::read_to_string(tree.join("web.py")).unwrap(),
        "print('hi')\n"
    );
    assert_eq!(
        fs::read_to_string(tree.join("static/css/site.css")).unwrap(),
        "body {}\n"
    );
    for (path, want) in [
        ("", 0o755),
        ("bin", 0o755),
        ("empty", 0o755),
        ("static/css", 0o755),
        ("bin/run", 0o755),
        ("web.py", 0o644),
        (".miren", 0o755),
    ] {
        assert_eq!(mode(&tree.join(path)), want, "{path}");
    }
    assert_eq!(
        fs::read_link(tree.join("css")).unwrap(),
        PathBuf::from("static/css")
    );
    assert_eq!(
        fs::read_to_string(tree.join("bin/web.py")).unwrap(),
        "print('hi')\n"
    );
    // Receiving it again changes nothing.
    assert_eq!(put(&store, &packed.tar).unwrap(), tree);
    assert_eq!(leftovers(dir.path()), 0);
}

#[test]
fn bytes_that_do_not_match_their_hash_or_the_limit_are_refused() {
    let dir = TempDir::new("verify");
    let (_, packed) = sample_bundle(dir.path());
    let mut cut = packed.tar.clone();
    cut.truncate(cut.len() - 512);
    let err = put_as(
        &store(dir.path(), DEFAULT_MAX_BUNDLE_BYTES),
        &packed.hash,
        &cut,
    )
    .unwrap_err();
    assert!(
        matches!(&err, BundleError::HashMismatch { expected, .. } if *expected == packed.hash),
        "{err:?}"
    );
    assert!(err.to_string().contains("upload it again"), "{err}");
    let store = store(dir.path(), 4096);
    let err = put(&store, &packed.tar).unwrap_err();
    assert!(
        matches!(err, BundleError::TooLarge { limit: 4096 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("limit of 4 KiB"), "{err}");
    assert_eq!(store.path(&packed.hash), None);
    assert_eq!(store.blob(&packed.hash), None);
    assert_eq!(leftovers(dir.path()), 0);
}

/// Appends a tar entry written field by field, so nothing is refused on the way.
fn raw_entry(tar: &mut Vec<u8>, path: &str, kind: tar::EntryType, mode: u32, data: &[u8]) {
    raw_link(tar, path, kind, mode, data, "");
}

fn raw_link(
    tar: &mut Vec<u8>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    data: &[u8],
    link: &str,
) {
    let mut header = tar::Header::new_gnu();
    let old = header.as_old_mut();
    old.name[..path.len()].copy_from_slice(path.as_bytes());
    old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(data.len() as u64);
    header.set_cksum();
    tar.extend_from_slice(header.as_bytes());
    tar.extend_from_slice(data);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
}

fn end(mut tar: Vec<u8>) -> Vec<u8> {
    tar.extend_from_slice(&[0; 1024]);
    tar
}

/// The reason `tar` is refused with, after checking that nothing of it was kept.
fn refused(tar: &[u8]) -> String {
    let dir = TempDir::new("hostile");
    let store = store(dir.path(), DEFAULT_MAX_BUNDLE_BYTES);
    let err = put(&store, tar).unwrap_err();
    let hash = BundleHash::of(tar);
    assert_eq!(store.path(&hash), None);
    assert_eq!(store.blob(&hash), None);
    assert_eq!(leftovers(dir.path()), 0);
    assert!(err.is_client_error(), "{err:?}");
    err.to_string()
}

#[test]
fn hostile_entries_are_refused() {
    use tar::EntryType as T;
    let one = |path: &str, kind, link: &str| {
        let mut tar = Vec::new();
        raw_entry(&mut tar, "ok.txt", T::Regular, 0o644, b"fine");
        raw_link(&mut tar, path, kind, 0o644, b"", link);
        end(tar)
    };
    let cases: [(Vec<u8>, &str); 10] = [
        (one("../evil", T::Regular, ""), "a `..` in its path"),
        (one("a/../../evil", T::Directory, ""), "a `..` in its path"),
        (one("/etc/cron.d/evil", T::Regular, ""), "an absolute path"),
        (one("passwd", T::Link, "/etc/passwd"), "a hard link"),
        (one("tty", T::Char, ""), "a device file"),
        (one("disk", T::Block, ""), "a device file"),
        (one("pipe", T::Fifo, ""), "a fifo"),
        (one("up", T::Symlink, "../.."), "a symlink pointing outside"),
        (one("abs", T::Symlink, "/etc"), "a symlink pointing outside"),
        (
            one("ok.txt", T::Regular, ""),
            "a second entry with the same path",
        ),
    ];
    for (tar, reason) in cases {
        let text = refused(&tar);
        assert!(text.contains(reason), "{reason}: {text}");
    }
}

#[test]
fn nothing_is_written_through_a_symlink() {
    use tar::EntryType as T;
    let mut tar = Vec::new();
    raw_entry(&mut tar, "sub/", T::Directory, 0o755, b"");
    raw_link(&mut tar, "link", T::Symlink, 0o777, b"", "sub");
    raw_entry(&mut tar, "link/file", T::Regular, 0o644, b"x");
    let text = refused(&end(tar));
    assert!(text.contains("\"link/file\""), "{text}");
    assert!(text.contains("through a symlink"), "{text}");
    // A file over an existing symlink.
    let mut tar = Vec::new();
    raw_link(&mut tar, "link", T::Symlink, 0o777, b"", "target");
    raw_entry(&mut tar, "link", T::Regular, 0o644, b"x");
    assert!(refused(&end(tar)).contains("a second entry with the same path"));
}

#[test]
fn a_pax_path_is_checked_like_any_path() {
    let mut tar = Vec::new();
    let record = b"16 path=../evil\n";
    raw_entry(
        &mut tar,
        "PaxHeaders/x",
        tar::EntryType::XHeader,
        0o644,
        record,
    );
    raw_entry(&mut tar, "harmless", tar::EntryType::Regular, 0o644, b"x");
    let text = refused(&end(tar));
    assert!(
        text.contains("\"../evil\"") && text.contains("`..`"),
        "{text}"
    );
}

#[test]
fn special_mode_bits_and_owners_are_not_unpacked() {
    use tar::EntryType as T;
    let dir = TempDir::new("modes");
    let mut tar = Vec::new();
    raw_entry(&mut tar, "./", T::Directory, 0o777, b"");
    raw_entry(&mut tar, "open/", T::Directory, 0o777, b"");
    raw_entry(&mut tar, "open/setuid", T::Regular, 0o4755, b"#!/bin/sh\n");
    raw_entry(&mut tar, "setgid", T::Regular, 0o2644, b"x");
    raw_entry(&mut tar, "sticky/", T::Directory, 0o1777, b"");
    raw_entry(&mut tar, "world", T::Regular, 0o666, b"x");
    raw_entry(&mut tar, "implicit/parent/file", T::Regular, 0o600, b"x");
    let tar = end(tar);
    let store = store(dir.path(), DEFAULT_MAX_BUNDLE_BYTES);
    let tree = put(&store, &tar).unwrap();
    for (path, want) in [
        ("", 0o755),
        ("open", 0o755),
        ("open/setuid", 0o755),
        ("setgid", 0o644),
        ("sticky", 0o755),
        ("world", 0o644),
        ("implicit", 0o755),
        ("implicit/parent", 0o755),
        ("implicit/parent/file", 0o644),
    ] {
        assert_eq!(mode(&tree.join(path)), want, "{path}");
    }
}

#[test]
fn unused_bundles_are_collected_after_the_grace() {
    let dir = TempDir::new("gc");
    let store = store(dir.path(), DEFAULT_MAX_BUNDLE_BYTES);
    let bundles: Vec<BundleHash> = (0..3)
        .map(|i| {
            let app = dir.path().join(format!("app{i}"));
            write(&app, "file", &format!("version {i}"));
            let packed = pack(&app, DEFAULT_MAX_BUNDLE_BYTES).unwrap();
            put(&store, &packed.tar).unwrap();
            packed.hash
        })
        .collect();
    let age = |hash: &BundleHash, ago: Duration| {
        fs::File::options()
            .write(true)
            .open(store.blob(hash).unwrap())
            .unwrap()
            .set_modified(SystemTime::now() - ago)
            .unwrap();
    };
    let in_use = HashSet::from([bundles[0].clone()]);
    // All received just now: nothing goes.
    assert_eq!(store.collect_garbage(&in_use).unwrap(), []);
    for hash in &bundles {
        age(hash, GC_GRACE + Duration::from_secs(60));
    }
    // Bundle 2 is about to be deployed.
    assert!(store.keep(&bundles[2]));
    assert_eq!(
        store.collect_garbage(&in_use).unwrap(),
        [bundles[1].clone()]
    );
    assert!(store.path(&bundles[0]).is_some() && store.path(&bundles[2]).is_some());
    assert_eq!(store.path(&bundles[1]), None);
    assert_eq!(store.blob(&bundles[1]), None);
    assert_eq!(leftovers(dir.path()), 0);
}

#[test]
fn opening_finishes_an_interrupted_unpacking_and_clears_leftovers() {
    let dir = TempDir::new("reopen");
    let (_, packed) = sample_bundle(dir.path());
    let tree = put(&store(dir.path(), DEFAULT_MAX_BUNDLE_BYTES), &packed.tar).unwrap();
    // As if the agent died after storing the blob, amid unpacking.
    fs::remove_dir_all(&tree).unwrap();
    write(dir.path(), "bundles/tmp/half.tree/web.py", "print(");
    let store = store(dir.path(), DEFAULT_MAX_BUNDLE_BYTES);
    assert_eq!(store.path(&packed.hash), Some(tree.clone()));
    assert_eq!(
        fs::read_to_string(tree.join("web.py")).unwrap(),
        "print('hi')\n"
    );
    assert_eq!(leftovers(dir.path()), 0);
}

#[test]
fn symlink_targets_are_resolved_lexically() {
    for (link, target, inside) in [
        ("a", "b", true),
        ("a", ".", true),
        ("d/a", "..", true),
        ("d/a", "../x/../y", true),
        ("a", "..", false),
        ("d/a", "../..", false),
        ("d/a", "x/../../..", false),
        ("a", "/", false),
        ("a", "", false),
    ] {
        assert_eq!(
            target_stays_inside(Path::new(link), Path::new(target)),
            inside,
            "{link} -> {target}"
        );
    }
}
