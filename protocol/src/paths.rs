//! Where Husk keeps what it builds outside the repository.

use std::path::PathBuf;

/// Environment variable that moves the build cache (kernel, snapshots).
pub const CACHE_ENV: &str = "HUSK_CACHE";
/// Environment variable naming the guest kernel to boot.
pub const KERNEL_ENV: &str = "HUSK_KERNEL";
/// Default cache root.
pub const DEFAULT_CACHE: &str = "/var/cache/husk";

/// The cache root: `$HUSK_CACHE`, else /var/cache/husk.
pub fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

/// The guest kernel: `$HUSK_KERNEL`, else the newest one
/// kernel-config/build-kernel.sh built (`<cache>/kernel/vmlinux`).
pub fn default_kernel() -> PathBuf {
    std::env::var_os(KERNEL_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("kernel").join("vmlinux"))
}
