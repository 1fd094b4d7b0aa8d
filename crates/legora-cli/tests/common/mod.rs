//! Helpers shared by the CLI tests that need plugin libraries.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[path = "../../../legora-plugin-host/tests/common/build_plugins.rs"]
mod build_plugins;
#[allow(unused_imports)] // not every test binary that includes this module needs both
pub use build_plugins::{build_plugins, workspace_root};

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
