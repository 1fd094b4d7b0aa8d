//! Helpers shared by the test suites of legora's crates (a dev-dependency only, never part
//! of a build users run): where the workspace and its fixtures are, the two ways the tests
//! compare floats, and building plugin crates as dynamic libraries from a test.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tests/fixtures/`: the reference fixtures and the Python scripts that made them.
pub fn fixtures() -> PathBuf {
    workspace_root().join("tests/fixtures")
}

/// `tests/fixtures/models/`: the tiny Llama, Qwen2 and Mistral models and their
/// transformers / PEFT references (made by `tests/fixtures/make_model_fixtures.py`).
pub fn model_fixtures() -> PathBuf {
    fixtures().join("models")
}

/// Asserts `|got[i] - want[i]| <= tol * scale` for every element, with `scale` the largest
/// `|want[i]|` but at least `floor` (a tolerance relative to the reference's magnitude).
/// A NaN anywhere fails.
///
/// # Panics
/// When the lengths differ or an element is out of tolerance, naming `what`, the element,
/// both values, the largest difference and the scale.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32, floor: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(floor, |m, v| m.max(v.abs()));
    let bound = tol * scale;
    let max_diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // written so that a NaN fails
        assert!(
            (g - w).abs() <= bound,
            "{what}: element {i}: {g} vs {w} (max diff {max_diff}, scale {scale}, tol {tol})"
        );
    }
}

/// Asserts `|got[i] - want[i]| / (1 + |want[i]|) <= tol` for every element: absolute near
/// zero, relative for large values. A NaN anywhere fails.
///
/// # Panics
/// When the lengths differ or an element is out of tolerance, naming `what`, the element
/// and the worst difference.
pub fn assert_close_rel(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let rel = |g: f32, w: f32| (g - w).abs() / (1.0 + w.abs());
    let worst = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (&g, &w)| m.max(rel(g, w)));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            rel(g, w) <= tol,
            "{what}: element {i}: {g} vs {w}: max relative difference {worst} > {tol}"
        );
    }
}

/// Held by a test for its whole run so that no other test of the same binary runs beside
/// it: for tests that seed the backend's process-wide random generator and depend on the
/// draws that follow (the trainer reseeds it at every step), or that share one device.
/// One lock per test process.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds `packages` as libraries into their own target directory under `tmp` (a test's
/// `CARGO_TARGET_TMPDIR`, so the outer `cargo test` lock is never waited on); returns the
/// folder holding the libraries. Unoptimized, without debug info: the plugins only run tiny
/// inputs in tests, and this keeps the cold build short on small CI machines.
///
/// # Panics
/// When cargo cannot be run or the build fails.
pub fn build_plugins(tmp: &Path, packages: &[&str]) -> PathBuf {
    let target = tmp.join("plugin-test");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assert_close_scales_by_the_reference_and_its_floor() {
        assert_close("same", &[1.0, -2.0], &[1.0, -2.0], 0.0, 1.0);
        // |diff| 5e-4 against scale 100: within 1e-5 relative
        assert_close("scaled", &[100.0, 0.0005], &[100.0, 0.0], 1e-5, 1e-6);
        // the floor: want all zero, scale = floor
        assert_close("floor", &[1e-7], &[0.0], 0.2, 1e-6);
    }

    #[test]
    #[should_panic(expected = "element 1")]
    fn assert_close_names_the_element_out_of_tolerance() {
        assert_close("x", &[1.0, 1.1], &[1.0, 1.0], 1e-3, 1.0);
    }

    #[test]
    #[should_panic(expected = "NaN")]
    fn assert_close_fails_on_nan() {
        assert_close("x", &[f32::NAN], &[1.0], 1e-3, 1.0);
    }

    #[test]
    fn assert_close_rel_is_absolute_near_zero_and_relative_far_from_it() {
        assert_close_rel("near zero", &[1e-5], &[0.0], 1e-4);
        assert_close_rel("large", &[1000.05], &[1000.0], 1e-4);
    }

    #[test]
    #[should_panic(expected = "max relative difference")]
    fn assert_close_rel_fails_out_of_tolerance() {
        assert_close_rel("x", &[1.0, 2.5], &[1.0, 2.0], 1e-4);
    }

    #[test]
    fn the_fixtures_are_where_the_tests_expect_them() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(model_fixtures().is_dir(), "{}", model_fixtures().display());
    }
}
