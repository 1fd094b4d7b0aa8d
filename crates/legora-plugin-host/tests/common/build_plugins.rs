//! Builds plugin crates as dynamic libraries by running cargo from a test. Shared by the
//! plugin-host tests and legora-cli's (which include this file by path), so that every
//! test binary builds with the same flags into the same folder.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds `packages` as libraries into their own target directory under
/// `CARGO_TARGET_TMPDIR` (so the outer `cargo test` lock is never waited on); returns the
/// folder holding the libraries. Unoptimized, without debug info: the plugins only run
/// tiny inputs in tests, and this keeps the cold build short on small CI machines.
pub fn build_plugins(packages: &[&str]) -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-test");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .args(["--config", "profile.dev.opt-level=0"])
        .args(["--config", r#"profile.dev.package."*".opt-level=0"#])
        .args(["--config", "profile.dev.debug=0"])
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("CARGO_BUILD_TARGET");
    for p in packages {
        cmd.args(["-p", p]);
    }
    let status = cmd.status().expect("cargo can be run");
    assert!(status.success(), "building the plugins failed: {status}");
    target.join("debug")
}
