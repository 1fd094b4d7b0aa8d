//! Shared by the plugin-host test files: builds the plugin libraries once per
//! test process and finds them and the worker program.
//!
//! The plugins (the three domain plugins, the `examples/plugin-minimal`
//! example and the broken test plugins under `tests/bad-plugins/`) are built
//! as dynamic libraries by running cargo from the test, into their own target
//! directory under `CARGO_TARGET_TMPDIR` (so the outer `cargo test` lock is
//! never waited on). legora-cli's plugin tests build the same list with the
//! same flags into the same folder: keep the two in step.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

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

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds every plugin cdylib once per test process; returns the folder
/// holding the libraries.
pub fn plugin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-test");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.arg("build")
            .arg("--manifest-path")
            .arg(workspace_root().join("Cargo.toml"))
            // Unoptimized, without debug info: the plugins only run tiny
            // inputs here, and this keeps the cold build short on small CI machines.
            .args(["--config", "profile.dev.opt-level=0"])
            .args(["--config", r#"profile.dev.package."*".opt-level=0"#])
            .args(["--config", "profile.dev.debug=0"])
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("CARGO_BUILD_TARGET");
        for p in PACKAGES {
            cmd.args(["-p", p]);
        }
        let status = cmd.status().expect("cargo can be run");
        assert!(status.success(), "building the plugins failed: {status}");
        target.join("debug")
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
