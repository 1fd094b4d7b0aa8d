//! Helpers shared by the CLI tests that need plugin libraries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds `packages` as libraries (unoptimized) by running cargo from the test, into one
/// folder shared by every CLI test binary; returns the folder holding the libraries.
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

/// The three bundled plugins (medical, finance, game NPCs), built once per test process;
/// returns their folder.
#[allow(dead_code)] // not every test binary that includes this module needs it
pub fn bundled_plugins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        build_plugins(&[
            "legora-plugin-medical",
            "legora-plugin-finance",
            "legora-plugin-game-npc",
        ])
    })
}
