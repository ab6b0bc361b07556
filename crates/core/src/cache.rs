//! Where Peregrine keeps what it writes once and reads at every start (compiled kernels, the
//! embedded model unpacked): `$PEREGRINE_CACHE_DIR`, else `$XDG_CACHE_HOME/peregrine`, else
//! `~/.cache/peregrine`, else (a service with none of them set) a directory of this user's own
//! under the temporary directory. A shared `/tmp/peregrine` that another local user created
//! first could hand the server their GPU code or model files, read from the cache as they are.

use std::path::{Path, PathBuf};

/// The cache's root directory.
pub fn root() -> PathBuf {
    std::env::var_os("PEREGRINE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|p| PathBuf::from(p).join("peregrine")))
        .or_else(|| std::env::var_os("HOME").map(|p| PathBuf::from(p).join(".cache/peregrine")))
        .unwrap_or_else(temp_root)
}

/// `root`'s last resort: this user's directory under the temporary directory.
pub fn temp_root() -> PathBuf {
    std::env::temp_dir().join(format!("peregrine-{}", own_uid()))
}

/// This process's user id (Linux: the owner of /proc/self).
fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

/// Whether the cache under `dir` may be read and written: anywhere the user chose; under the
/// last resort only where this user owns it and nobody else may write it.
pub fn trusted(dir: &Path) -> bool {
    trusted_under(dir, &temp_root())
}

/// `trusted`, for the last resort `root`.
pub fn trusted_under(dir: &Path, root: &Path) -> bool {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // (Not there yet: it will be made by this user.)
    let owned = |p: &Path| std::fs::metadata(p).map_or(true, |m| m.uid() == own_uid() && m.permissions().mode() & 0o022 == 0);
    !dir.starts_with(root) || dir.ancestors().take_while(|a| a.starts_with(root)).all(owned)
}

#[cfg(test)]
mod tests {
    /// The last resort is used only where this user owns it and nobody else may write it; a
    /// directory the user chose always is.
    #[test]
    fn a_shared_temporary_cache_is_not_trusted() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("peregrine-trust-{}", std::process::id()));
        let kernels = root.join("kernels");
        std::fs::create_dir_all(&kernels).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(super::trusted_under(&kernels, &root));
        assert!(super::trusted_under(&root.join("new"), &root), "not made yet: it will be ours");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(!super::trusted_under(&root, &root), "writable by others");
        assert!(!super::trusted_under(&kernels, &root), "under a directory writable by others");
        assert!(super::trusted_under(&kernels, &std::env::temp_dir().join("elsewhere")), "a directory the user chose");
        assert!(super::temp_root().file_name().unwrap().to_str().unwrap().starts_with("peregrine-"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
