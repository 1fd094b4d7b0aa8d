//! Faulty dynamic plugins and the `legora` binary: each runs in a worker process
//! (`legora plugin-worker <library>`), so a plugin that aborts, segfaults, panics
//! under `panic = "abort"`, loops forever, answers garbage or is a truncated file is
//! reported by name while `legora` itself goes on (or fails with an `error:` line).
//!
//! The plugins are the test plugins of legora-plugin-host (`tests/bad-plugins/`),
//! built as libraries by running cargo from the test, with the same package list and
//! flags, into the same folder as legora-plugin-host's tests (keep the two in step).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use super::common;
use common::workspace_root;

const PACKAGES: &[&str] = &[
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

/// Builds the plugin libraries once per test process; returns their folder.
fn built_plugins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        legora_testing::build_plugins(Path::new(env!("CARGO_TARGET_TMPDIR")), PACKAGES)
    })
}

fn lib_file(lib_name: &str) -> String {
    format!(
        "{}{lib_name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-plugin-faults-{tag}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A plugin folder: `good` plugins under their own names, the faulty test plugins
/// named as plugin folders are searched for (`liblegora_plugin_<fault>.so`), and
/// with `truncated`, the medical plugin cut in half.
fn plugin_folder(tag: &str, good: &[&str], faulty: &[&str], truncated: bool) -> PathBuf {
    let dir = temp_dir(tag);
    let built = built_plugins();
    for name in good {
        let lib = format!("legora_plugin_{name}");
        std::fs::copy(built.join(lib_file(&lib)), dir.join(lib_file(&lib))).unwrap();
    }
    for name in faulty {
        std::fs::copy(
            built.join(lib_file(&format!("legora_test_plugin_{name}"))),
            dir.join(lib_file(&format!("legora_plugin_{name}"))),
        )
        .unwrap();
    }
    if truncated {
        let bytes = std::fs::read(built.join(lib_file("legora_plugin_medical"))).unwrap();
        std::fs::write(
            dir.join(lib_file("legora_plugin_truncated")),
            &bytes[..bytes.len() / 2],
        )
        .unwrap();
    }
    dir
}

const FAULTY: [&str; 5] = ["abort", "segfault", "panic_abort", "hang", "garbage"];

/// Runs `legora` in `cwd` with extra environment variables.
fn legora(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Output {
    let mut cmd = common::legora_cmd();
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("LEGORA_PLUGIN_PATH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    // A host that crashes on purpose (in-process loading) leaves no core file.
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let zero = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &zero);
                Ok(())
            });
        }
    }
    cmd.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Names of the plugins `legora plugins --json` listed.
fn listed(out: &Output) -> Vec<String> {
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

/// No file whose name starts with `core` in `dir`.
fn no_core_files(dir: &Path) {
    let cores: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("core"))
        .collect();
    assert!(cores.is_empty(), "core files: {cores:?}");
}

#[test]
fn plugins_lists_the_good_ones_and_reports_the_bad_ones() {
    let dir = plugin_folder("list", &["medical", "minimal"], &FAULTY, true);
    let d = dir.to_str().unwrap();
    let cwd = temp_dir("list-cwd");
    let args = ["plugins", "--plugin-dir", d, "--no-default-dirs", "--json"];

    // Every faulty plugin faults while loading (in a constructor or in `manifest`).
    let out = legora(
        &args,
        &[
            ("LEGORA_TEST_FAULT_AT", "load"),
            ("LEGORA_PLUGIN_TIMEOUT", "2"),
        ],
        &cwd,
    );
    assert_eq!(listed(&out), ["medical", "minimal"]);
    let stderr = text(&out.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: skipped "))
        .collect();
    assert_eq!(warnings.len(), 6, "{stderr}");
    let warning = |name: &str| {
        let file = dir.join(lib_file(&format!("legora_plugin_{name}")));
        let head = format!("warning: skipped {}: ", file.display());
        warnings
            .iter()
            .find(|w| w.starts_with(&head))
            .unwrap_or_else(|| panic!("no warning for {name}: {stderr}"))
            .to_string()
    };
    assert!(warning("abort").contains("killed by signal 6 (SIGABRT)"));
    assert!(warning("panic_abort").contains("(SIGABRT)"));
    assert!(warning("segfault").contains("(SIGSEGV)"));
    assert!(warning("hang").contains("did not answer `manifest` within 2.0 s"));
    assert!(warning("garbage").contains("malformed response to `manifest`"));
    assert!(warning("truncated").contains("truncated: "));
    no_core_files(&cwd);

    // Faulting only when called, they load and are listed; the truncated file is not.
    let out = legora(&args, &[("LEGORA_PLUGIN_TIMEOUT", "2")], &cwd);
    assert_eq!(
        listed(&out),
        [
            "abort",
            "garbage",
            "hang",
            "medical",
            "minimal",
            "panic-abort",
            "segfault"
        ]
    );
    assert_eq!(text(&out.stderr).matches("warning: skipped").count(), 1);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&cwd);
}

#[test]
fn in_process_a_crashing_plugin_takes_legora_down() {
    // What isolation protects against: with --plugins-in-process the abort in the
    // plugin's manifest ends legora itself.
    let dir = plugin_folder("in-process", &["medical"], &["abort"], false);
    let d = dir.to_str().unwrap();
    let cwd = temp_dir("in-process-cwd");
    let args = ["plugins", "--plugin-dir", d, "--no-default-dirs", "--json"];
    let out = legora(&args, &[("LEGORA_TEST_FAULT_AT", "manifest")], &cwd);
    assert_eq!(listed(&out), ["medical"], "isolated: legora goes on");
    let mut in_process = vec!["--plugins-in-process"];
    in_process.extend_from_slice(&args);
    let out = legora(&in_process, &[("LEGORA_TEST_FAULT_AT", "manifest")], &cwd);
    assert!(!out.status.success());
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "{}",
            text(&out.stderr)
        );
    }
    // and without the fault, in process lists both
    let out = legora(&in_process, &[], &cwd);
    assert_eq!(listed(&out), ["abort", "medical"]);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&cwd);
}

#[test]
fn train_with_a_faulty_format_fails_naming_the_plugin() {
    let dir = plugin_folder("train", &[], &["abort", "segfault", "hang"], false);
    let run_dir = temp_dir("train-run");
    std::fs::write(run_dir.join("train.txt"), "a line\nanother line\n").unwrap();
    let model = workspace_root().join("tests/fixtures/models/llama");
    let cases = [
        (
            "abort",
            "plugin `abort` crashed during `parse`: its worker process was killed by signal 6 (SIGABRT)",
        ),
        (
            "segfault",
            "plugin `segfault` crashed during `parse`: its worker process was killed by signal 11 (SIGSEGV)",
        ),
        ("hang", "plugin `hang` did not answer `parse` within 2.0 s"),
    ];
    for (plugin, needle) in cases {
        let run = run_dir.join(format!("{plugin}.toml"));
        std::fs::write(
            &run,
            format!(
                "seed = 1\noutput_dir = \"out-{plugin}\"\n\n[model]\npath = {model:?}\n\
                 template = \"chatml\"\n\n[[tasks]]\nname = \"t\"\nformat = \"{plugin}/lines\"\n\
                 train = \"train.txt\"\n\n[moe]\ntop_k = 1\n"
            ),
        )
        .unwrap();
        let out = legora(
            &[
                "train",
                "--config",
                run.to_str().unwrap(),
                "--plugin-dir",
                dir.to_str().unwrap(),
            ],
            &[("LEGORA_PLUGIN_TIMEOUT", "2")],
            &run_dir,
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{plugin}: {stderr}");
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("{plugin}: no error line: {stderr}"));
        assert!(error.contains(needle), "{plugin}: {error}");
    }
    no_core_files(&run_dir);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&run_dir);
}
