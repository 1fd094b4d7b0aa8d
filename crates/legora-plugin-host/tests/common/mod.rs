//! Shared by the plugin-host test files: builds the plugin libraries once per
//! test process and finds them and the worker program.
//!
//! The plugins (the three domain plugins, the `examples/plugin-minimal`
//! example and the broken test plugins under `tests/bad-plugins/`) are built
//! as dynamic libraries by running cargo from the test, into their own target
//! directory under `CARGO_TARGET_TMPDIR` (so the outer `cargo test` lock is
//! never waited on), by [`legora_testing::build_plugins`], which legora-cli's tests
//! use too.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[allow(unused_imports)] // not every test file uses it
pub use legora_testing::workspace_root;

use legora_plugin_host::{Isolation, PluginHost};

pub const PACKAGES: &[&str] = &[
    "legora-plugin-medical",
    "legora-plugin-finance",
    "legora-plugin-game-npc",
    "legora-plugin-minimal",
    "legora-test-plugin-abi-mismatch",
    "legora-test-plugin-no-entry",
    "legora-test-plugin-panics",
    "legora-test-plugin-bad-json",
    "legora-test-plugin-abort",
    "legora-test-plugin-segfault",
    "legora-test-plugin-panic-abort",
    "legora-test-plugin-hang",
    "legora-test-plugin-garbage",
];

/// Builds every plugin cdylib once per test process; returns the folder
/// holding the libraries.
pub fn plugin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        legora_testing::build_plugins(Path::new(env!("CARGO_TARGET_TMPDIR")), PACKAGES)
    })
}

/// The library file of a crate's lib name (`legora_plugin_medical`).
pub fn lib_path(lib_name: &str) -> PathBuf {
    plugin_dir().join(lib_file(lib_name))
}

/// `lib<name>.so` (or the platform's spelling).
pub fn lib_file(lib_name: &str) -> String {
    format!(
        "{}{lib_name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// The worker program this crate ships.
pub fn worker_program() -> &'static str {
    env!("CARGO_BIN_EXE_legora-plugin-worker")
}

/// A host that searches only the plugin folder, with `isolation` and, when
/// isolated, this crate's worker program.
pub fn bare_host(isolation: Isolation) -> PluginHost {
    let mut host = PluginHost::new();
    host.use_env_path(false).use_exe_dir(false);
    host.add_search_dir(plugin_dir());
    host.set_isolation(isolation);
    host.set_worker_command(worker_program(), ["plugin-worker"]);
    host
}
