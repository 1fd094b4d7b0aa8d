//! Short real runs of the `legora` binary on the demo base `demo/base` with the bundled
//! plugins: experts of different rank and targets from two plugin presets, composing the
//! experts plugins ship, progress lines off a terminal, run-file errors before any work.
//!
//! The plugins are built as libraries by running cargo from the test (unoptimized, into
//! the same folder as the faulty-plugin tests of `plugin_faults.rs`).

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use super::common;
use common::workspace_root;

/// The bundled plugins' folder.
fn built_plugins() -> &'static Path {
    common::bundled_plugins()
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-runs-{tag}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn legora(args: &[&str], cwd: &Path) -> Output {
    common::legora_cmd()
        .args(args)
        .current_dir(cwd)
        .env_remove("LEGORA_PLUGIN_PATH")
        .output()
        .expect("legora runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// `legora train --config run` in `dir` with stdout and stderr into one file, as
/// `legora train … > log.txt 2>&1`, a progress line every `progress_secs`; the log, once
/// the run succeeded.
fn piped_train(run: &Path, plugins: &Path, dir: &Path, progress_secs: &str) -> String {
    let log = dir.join("log.txt");
    let file = std::fs::File::create(&log).unwrap();
    let status = common::legora_cmd()
        .args([
            "train",
            "--config",
            &path(run),
            "--plugin-dir",
            &path(plugins),
        ])
        .current_dir(dir)
        .env("LEGORA_PROGRESS_SECS", progress_secs)
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .status()
        .unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{log}");
    log
}

/// The run-file head shared by the runs: the demo base, chatml, short rows.
fn head(output_dir: &str) -> String {
    let root = workspace_root();
    format!(
        "seed = 3\noutput_dir = {output_dir:?}\n\n[model]\npath = {:?}\ntemplate = \"chatml\"\n\
         max_seq_len = 256\n\n[data]\nval_fraction = 0.2\npad_per_task = true\n\n",
        path(&root.join("demo/base"))
    )
}

fn data(rel: &str) -> String {
    path(&workspace_root().join("plugins").join(rel))
}

fn adapter_config(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn targets(cfg: &serde_json::Value) -> Vec<String> {
    let mut t: Vec<String> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    t.sort();
    t
}

#[test]
fn experts_from_two_presets_differ_in_rank_and_targets_and_reload() {
    let plugins = built_plugins();
    let dir = temp_dir("presets");
    let run = dir.join("presets.toml");
    std::fs::write(
        &run,
        format!(
            "{}[[tasks]]\nname = \"finance\"\nformat = \"finance/alpaca\"\n\
             preset = \"finance/compliance\"\nlearning_rate = 5e-3\ntrain = {:?}\nmax_samples = 24\n\n\
             [[tasks]]\nname = \"npc\"\nformat = \"game-npc/dialogue\"\npreset = \"game-npc/persona\"\n\
             train = {:?}\nmax_samples = 24\n\n\
             [stages.experts]\nmax_steps = 3\nbatch_size = 2\n\n[stages.router]\nenabled = false\n\n\
             [stages.eval]\nenabled = false\n",
            // and each decoder layer recomputed in the backward
            head("out").replace("max_seq_len = 256", "max_seq_len = 256\ngradient_checkpointing = true"),
            data("finance/data/alpaca/train.json"),
            data("game-npc/data/dialogues/train.jsonl"),
        ),
    )
    .unwrap();
    let log = piped_train(&run, plugins, &dir, "0");
    // Progress lines, written while the stage ran: before the report, which comes last.
    let report_at = log.find("# legora report").expect("the report is printed");
    for step in 1..=3 {
        let line = format!("experts: step {step}/3  loss ");
        let at = log
            .find(&line)
            .unwrap_or_else(|| panic!("no `{line}` in {log}"));
        assert!(at < report_at, "{log}");
    }
    assert!(log.contains("eta "), "{log}");

    // Two PEFT folders, each with its preset's rank and targets.
    let experts = dir.join("out/experts");
    let fin = adapter_config(&experts.join("finance"));
    let npc = adapter_config(&experts.join("npc"));
    assert_eq!(fin["r"], 8);
    assert_eq!(fin["lora_alpha"], 16.0);
    assert_eq!(targets(&fin), ["k_proj", "o_proj", "q_proj", "v_proj"]);
    assert_eq!(npc["r"], 16);
    assert_eq!(
        targets(&npc),
        [
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ]
    );
    // Both reload: inspect reads the tensors, score runs the base with each adapter.
    let base = path(&workspace_root().join("demo/base"));
    let text_file = dir.join("text.txt");
    std::fs::write(&text_file, "The market rose after the report.\n").unwrap();
    for (name, rank) in [("finance", 8), ("npc", 16)] {
        let folder = path(&experts.join(name));
        let shown = ok(&legora(&["inspect", &folder, "--json"], &dir));
        assert!(shown.contains(&format!("\"r\": {rank}")), "{shown}");
        let scored = ok(&legora(
            &[
                "score",
                "--model",
                &base,
                "--adapter",
                &folder,
                "--text",
                &path(&text_file),
            ],
            &dir,
        ));
        let v: serde_json::Value = serde_json::from_str(&scored).unwrap();
        assert!(v["mean_nll"].as_f64().unwrap().is_finite(), "{scored}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compose_uses_the_experts_plugins_ship() {
    let plugins = built_plugins();
    let dir = temp_dir("shipped");
    let run = dir.join("compose.toml");
    std::fs::write(
        &run,
        format!(
            "{}[[tasks]]\nname = \"medical\"\nformat = \"medical/alpaca\"\npreset = \"medical/clinical\"\n\
             train = {:?}\nmax_samples = 16\n\n\
             [[tasks]]\nname = \"finance\"\nformat = \"finance/alpaca\"\npreset = \"finance/compliance\"\n\
             train = {:?}\nmax_samples = 16\n\n\
             [stages.router]\nmax_steps = 2\nbatch_size = 2\n\n\
             [stages.eval]\nbaselines = [\"base\", \"mixture\", \"oracle\"]\nmax_samples = 2\n\
             max_new_tokens = 4\n",
            head("out"),
            data("medical/data/alpaca/train.json"),
            data("finance/data/alpaca/train.json"),
        ),
    )
    .unwrap();
    let shown = ok(&legora(
        &[
            "plugins",
            "--plugin-dir",
            &path(plugins),
            "--no-default-dirs",
            "--json",
        ],
        &dir,
    ));
    assert!(shown.contains("medical/demo-specialty"), "{shown}");
    assert!(shown.contains("finance/demo-sentiment"), "{shown}");
    let out = legora(
        &[
            "compose",
            "--experts",
            "medical/demo-specialty",
            "finance/demo-sentiment",
            "--config",
            &path(&run),
            "--plugin-dir",
            &path(plugins),
        ],
        &dir,
    );
    let report = ok(&out);
    assert!(report.contains("oracle"), "{report}");
    let shipped = dir.join("out/plugin-experts/medical/demo-specialty");
    assert_eq!(adapter_config(&shipped)["r"], 16);
    let moe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/moe_config.json")).unwrap())
            .unwrap();
    assert_eq!(moe["experts"], serde_json::json!(["medical", "finance"]));

    // A name that is neither a folder nor a shipped expert: refused before any work.
    let out = legora(
        &[
            "compose",
            "--experts",
            "medical/no-such-expert",
            "finance/demo-sentiment",
            "--config",
            &path(&run),
            "--plugin-dir",
            &path(plugins),
        ],
        &dir,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("medical/no-such-expert") && stderr.contains("medical/demo-specialty"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_error_in_the_eval_section_fails_at_once_with_line_and_column() {
    let dir = temp_dir("eval-error");
    let run = dir.join("bad.toml");
    // Valid up to the last table; no plugin is even loadable from here.
    std::fs::write(
        &run,
        format!(
            "{}[[tasks]]\nname = \"medical\"\nformat = \"medical/alpaca\"\ntrain = {:?}\n\n\
             [[tasks]]\nname = \"finance\"\nformat = \"finance/alpaca\"\ntrain = {:?}\n\n\
             [stages.eval]\nmax_samples = 2\nbaselines = [\"base\", \"oracel\"]\n",
            head("out"),
            data("medical/data/alpaca/train.json"),
            data("finance/data/alpaca/train.json")
        ),
    )
    .unwrap();
    let r = path(&run);
    for sub in ["train", "eval"] {
        let t = Instant::now();
        let out = legora(&[sub, "--config", &r], &dir);
        let elapsed = t.elapsed();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&format!("{r}:25:")), "{stderr}");
        assert!(stderr.contains("oracel"), "{stderr}");
        assert!(elapsed < Duration::from_secs(1), "{sub} took {elapsed:?}");
    }
    assert!(!dir.join("out").exists(), "nothing is written");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    let plugins = built_plugins();
    let mut child = common::legora_cmd()
        .args([
            "plugins",
            "--plugin-dir",
            &path(plugins),
            "--no-default-dirs",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -0`: the reader is gone before legora writes its table.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
}

/// A format's attachment option is a parameter the run file may set: `params.cards` of
/// `game-npc/dialogue`, a folder relative to the run file (not to the working folder),
/// where the dialogue file has no `../cards` beside it; a value that is not a path is
/// refused naming the key.
#[test]
fn attachment_options_are_run_file_params() {
    let plugins = built_plugins();
    let dir = temp_dir("attachments");
    let src = workspace_root().join("plugins/game-npc/data");
    std::fs::create_dir_all(dir.join("d")).unwrap();
    std::fs::copy(src.join("dialogues/train.jsonl"), dir.join("d/train.jsonl")).unwrap();
    std::fs::create_dir_all(dir.join("my-cards")).unwrap();
    for e in std::fs::read_dir(src.join("cards")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join("my-cards").join(p.file_name().unwrap())).unwrap();
    }
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let run = |cards: &str| {
        let file = dir.join("cards.toml");
        std::fs::write(
            &file,
            format!(
                "{}[[tasks]]\nname = \"npc\"\nformat = \"game-npc/dialogue\"\n\
                 train = \"d/train.jsonl\"\nmax_samples = 12\nparams = {{ cards = {cards} }}\n\n\
                 [moe]\ntop_k = 1\n\n[stages.experts]\nmax_steps = 1\nbatch_size = 2\n\n\
                 [stages.router]\nenabled = false\n\n[stages.eval]\nenabled = false\n",
                head("out")
            ),
        )
        .unwrap();
        let args = [
            "train",
            "--config",
            &path(&file),
            "--plugin-dir",
            &path(plugins),
        ];
        legora(&args, &elsewhere)
    };
    ok(&run("\"my-cards\""));
    assert!(dir.join("out/experts/npc/adapter_config.json").is_file());
    let out = run("3");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tasks[0].params.cards"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Off a terminal the evaluation prints where it is: a line when each variant starts on
/// each task and when it ends (and every `LEGORA_PROGRESS_SECS` between), for the scored
/// (choices) and the generated (dialogue) tasks, before the report.
#[test]
fn evaluation_prints_progress_lines_off_a_terminal() {
    let plugins = built_plugins();
    let dir = temp_dir("eval-progress");
    let run = dir.join("eval.toml");
    std::fs::write(
        &run,
        format!(
            "{}[[tasks]]\nname = \"finance\"\nformat = \"finance/alpaca\"\ntrain = {:?}\n\
             max_samples = 20\nparams = {{ choices = [\"positive\", \"negative\", \"neutral\"] }}\n\n\
             [[tasks]]\nname = \"npc\"\nformat = \"game-npc/dialogue\"\ntrain = {:?}\nmax_samples = 20\n\n\
             [moe]\ntop_k = 1\n\n[stages.experts]\nmax_steps = 1\nbatch_size = 2\n\n\
             [stages.router]\nmax_steps = 1\nbatch_size = 2\n\n\
             [stages.eval]\nmax_samples = 3\nmax_new_tokens = 4\nbatch_size = 2\n",
            head("out"),
            data("finance/data/alpaca/train.json"),
            data("game-npc/data/dialogues/train.jsonl"),
        ),
    )
    .unwrap();
    let log = piped_train(&run, plugins, &dir, "30");
    let report_at = log.find("# legora report").expect("the report is printed");
    let mut pair = 0;
    for task in ["finance", "npc"] {
        for variant in ["base", "single_lora", "mixture", "oracle"] {
            pair += 1;
            for done in [0, 3] {
                let line = format!("eval {pair}/8: {variant} on {task}  {done}/3 samples");
                let at = log
                    .find(&line)
                    .unwrap_or_else(|| panic!("no `{line}` in {log}"));
                assert!(at < report_at, "{log}");
            }
        }
    }
}

/// `legora demo --model` runs the three-domain demo over another base — here the demo's
/// base as a Hugging Face repo id in a cache (`HF_HOME`) — with its budget scaled by flags,
/// writing the usual report into --output-dir. A `.gguf` base whose context cannot hold the
/// dialogues is refused naming max_seq_len, and a base that does not exist naming it.
#[test]
fn the_demo_runs_over_another_base() {
    let plugins = built_plugins();
    let root = workspace_root();
    let out = temp_dir("demo-model");
    let snap = out.join("hf/hub/models--tiny-org--demo-base/snapshots/5eed");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(out.join("hf/hub/models--tiny-org--demo-base/refs")).unwrap();
    std::fs::write(
        out.join("hf/hub/models--tiny-org--demo-base/refs/main"),
        "5eed",
    )
    .unwrap();
    for e in std::fs::read_dir(root.join("demo/base")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, snap.join(p.file_name().unwrap())).unwrap();
    }
    let demo = |model: &str, seq: &str| {
        let config = path(&root.join("demo/demo.toml"));
        common::legora_cmd()
            .args(["demo", "--config", &config, "--plugin-dir", &path(plugins)])
            .args(["--model", model, "--steps", "2", "--router-steps", "1"])
            .args([
                "--max-seq-len",
                seq,
                "--eval-samples",
                "4",
                "--output-dir",
                &path(&out.join("run")),
            ])
            .current_dir(&out)
            .env("HF_HOME", out.join("hf"))
            .env_remove("HF_HUB_CACHE")
            .env_remove("LEGORA_PLUGIN_PATH")
            .output()
            .unwrap()
    };
    let stdout = ok(&demo("tiny-org/demo-base", "200"));
    assert!(stdout.contains("# legora report"), "{stdout}");
    let report = std::fs::read_to_string(out.join("run/report.md")).unwrap();
    assert!(report.contains("| experts | 2/2 |"), "{report}");
    for task in ["medical", "finance", "npc"] {
        assert!(out
            .join("run/experts")
            .join(task)
            .join("adapter_config.json")
            .is_file());
    }
    let gguf = path(&root.join("tests/fixtures/gguf/qwen3-q8_0.gguf"));
    for (model, needles) in [
        (gguf.as_str(), &["max_seq_len", "npc"][..]),
        (
            "no-such-org/no-such-model",
            &["no-such-org/no-such-model"][..],
        ),
    ] {
        let bad = demo(model, "128");
        let stderr = text(&bad.stderr);
        assert_eq!(bad.status.code(), Some(1), "{stderr}");
        for n in needles {
            assert!(stderr.contains(n), "`{n}`: {stderr}");
        }
    }
}
