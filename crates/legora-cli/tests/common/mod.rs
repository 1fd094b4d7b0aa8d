//! Helpers shared by the CLI tests: the `legora` binary of this build, its output as text,
//! the bundled plugins built as dynamic libraries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The `legora` binary of this build, to be given arguments and run by the caller.
pub fn legora_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_legora"))
}

/// A finished `legora` run, its output as text.
pub struct Out {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Out {
    fn from(out: Output) -> Self {
        Out {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

pub use legora_testing::workspace_root;

/// The three bundled plugins (medical, finance, game NPCs), built once per test process;
/// returns their folder.
pub fn bundled_plugins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        legora_testing::build_plugins(
            tmp,
            &[
                "legora-plugin-medical",
                "legora-plugin-finance",
                "legora-plugin-game-npc",
            ],
        )
    })
}
