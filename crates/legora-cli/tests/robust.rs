//! Hostile and careless input through the real `legora` binary: every case ends with a
//! typed error naming the key / tensor / path (exit 1) or a usage error naming the flag
//! (exit 2) — never a panic, an abort, a hang or a silent success — and writes or
//! deletes nothing.
//!
//! Inputs are the fixtures of tests/fixtures/models (tests/fixtures/make_model_fixtures.py)
//! copied to a temporary folder and damaged one way each.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::common;

/// A way to damage a checkpoint: its name, what it does to the folder, the error expected.
type Damage<'a> = (&'a str, Box<dyn Fn(&Path)>, &'a str);

use legora_testing::model_fixtures as fixtures;

use common::Out;

fn legora(args: &[&str]) -> Out {
    // the bundled plugins are found through LEGORA_PLUGIN_PATH, as an operator's would be
    common::legora_cmd()
        .args(args)
        .env("LEGORA_PLUGIN_PATH", common::bundled_plugins())
        .output()
        .unwrap()
        .into()
}

/// Exit `code` (1: an `error:` line, 2: clap's usage error) with every needle in
/// stderr, no panic, and no message printed twice in the error line.
fn fails(o: &Out, code: i32, needles: &[&str]) {
    assert_eq!(
        o.code,
        Some(code),
        "stdout: {}\nstderr: {}",
        o.stdout,
        o.stderr
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    for n in needles {
        assert!(o.stderr.contains(n), "stderr lacks `{n}`: {}", o.stderr);
    }
    if code == 1 {
        let line = o
            .stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line: {}", o.stderr));
        let parts: Vec<&str> = line.split(": ").collect();
        for w in parts.windows(2) {
            assert_ne!(w[0], w[1], "printed twice: {line}");
        }
    }
}

/// A scratch folder removed on drop.
struct Tmp(PathBuf);

impl Tmp {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("legora-robust-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }

    /// A copy of fixture `name` under this folder.
    fn copy(&self, name: &str) -> PathBuf {
        let to = self.0.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(fixtures().join(name)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
        to
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `dir` with its length and modification time.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), m.len(), m.modified().unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Set element 0 of tensor `name` in a safetensors file to `value`.
fn poison(file: &Path, name: &str, value: f32) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let t = tensors.iter_mut().find(|t| t.0 == name).unwrap();
    t.2[..4].copy_from_slice(&value.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, data)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(file, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn text_file() -> String {
    s(&fixtures().join("score.txt")).to_string()
}

// ---- class 1: untrusted sizes ------------------------------------------------------

#[test]
fn sizes_from_config_json_past_their_bounds_are_refused() {
    let tmp = Tmp::new("sizes");
    let model = tmp.copy("mistral");
    for (key, value) in [
        ("num_hidden_layers", serde_json::json!(1_000_000_000u64)),
        ("head_dim", serde_json::json!(1u64 << 40)),
        ("max_position_embeddings", serde_json::json!(1u64 << 62)),
    ] {
        let cfg = model.join("config.json");
        let original = std::fs::read_to_string(&cfg).unwrap();
        edit_json(&cfg, |v| v[key] = value);
        let o = legora(&["score", "--model", s(&model), "--text", &text_file()]);
        fails(&o, 1, &[key, "config.json"]);
        std::fs::write(&cfg, original).unwrap();
    }
}

#[test]
fn lengths_past_the_context_are_refused() {
    let mistral = fixtures().join("mistral"); // max_position_embeddings = 64
    let o = legora(&[
        "score",
        "--model",
        s(&mistral),
        "--text",
        &text_file(),
        "--max-length",
        "100000",
    ]);
    fails(
        &o,
        1,
        &["max_length 100000", "max_position_embeddings = 64"],
    );
    let o = legora(&[
        "score",
        "--model",
        s(&mistral),
        "--text",
        &text_file(),
        "--max-length",
        "0",
    ]);
    fails(&o, 2, &["--max-length"]);
    // a prompt longer than the context
    let long = "the router picks the experts for every token ".repeat(40);
    let o = legora(&["generate", "--model", s(&mistral), "--prompt", &long]);
    fails(&o, 1, &["does not fit the model's context", "64"]);
    // generation stops at the context: a near-full prompt asks for many tokens
    let o = legora(&[
        "generate",
        "--model",
        s(&mistral),
        "--prompt",
        "the router",
        "--max-new-tokens",
        "100000",
    ]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
}

/// A tiny run file over the mistral fixture with `extra` appended.
fn run_file(tmp: &Tmp, extra: &str) -> String {
    let data = tmp.file(
        "rows.jsonl",
        "{\"instruction\": \"q\", \"input\": \"\", \"output\": \"a\"}\n",
    );
    tmp.file(
        "run.toml",
        &format!(
            "seed = 1\noutput_dir = \"{out}\"\n\n[model]\npath = \"{model}\"\nmax_seq_len = 32\n\n[[tasks]]\n\
             name = \"a\"\nformat = \"medical/alpaca\"\ntrain = \"{data}\"\n\n{extra}\n\
             [moe]\ntop_k = 1\n",
            out = s(&tmp.0.join("out")),
            model = s(&fixtures().join("mistral")),
        ),
    )
}

#[test]
fn sizes_in_a_run_file_are_refused_with_their_key() {
    let tmp = Tmp::new("runsizes");
    for (extra, key) in [
        ("[lora]\nr = 1000000000\n", "lora.r"),
        ("[lora]\nr = 1000\n", "lora.r"),
        ("[stages.experts]\nbatch_size = 1000000000\n", "batch_size"),
        ("[model]\n", "duplicate key"), // TOML's own error
    ] {
        let run = run_file(&tmp, extra);
        let o = legora(&["train", "--config", &run]);
        fails(&o, 1, &[key]);
        assert!(!tmp.0.join("out").exists(), "{extra}: wrote outputs");
    }
}

// ---- class 2: non-finite values ------------------------------------------------------

#[test]
fn non_finite_model_or_adapter_tensors_are_refused_naming_the_tensor() {
    let tmp = Tmp::new("nan");
    let model = tmp.copy("mistral");
    poison(
        &model.join("model.safetensors"),
        "model.layers.1.mlp.up_proj.weight",
        f32::NAN,
    );
    let o = legora(&["score", "--model", s(&model), "--text", &text_file()]);
    fails(&o, 1, &["model.layers.1.mlp.up_proj.weight", "non-finite"]);
    assert!(!o.stdout.contains("null"), "{}", o.stdout);

    let adapter = tmp.copy("mistral-lora-qv");
    let tensor = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight";
    poison(
        &adapter.join("adapter_model.safetensors"),
        tensor,
        f32::INFINITY,
    );
    let out = tmp.0.join("merged");
    let o = legora(&[
        "merge",
        "--model",
        s(&fixtures().join("mistral")),
        "--adapter",
        s(&adapter),
        "--out",
        s(&out),
    ]);
    fails(&o, 1, &[tensor, "non-finite"]);
    assert!(!out.exists(), "merge wrote {}", out.display());
}

#[test]
fn non_finite_or_absurd_float_flags_are_usage_errors() {
    let mistral = s(&fixtures().join("mistral")).to_string();
    let qv = s(&fixtures().join("mistral-lora-qv")).to_string();
    let all = s(&fixtures().join("mistral-lora-all")).to_string();
    for w in ["NaN", "inf", "1e30"] {
        let weights = format!("1,{w}");
        let adapters = format!("{qv},{all}");
        let o = legora(&[
            "generate",
            "--model",
            &mistral,
            "--prompt",
            "hi",
            "--adapters",
            &adapters,
            "--weights",
            &weights,
        ]);
        fails(&o, 2, &["--weights", w]);
    }
    for (flag, v) in [
        ("--temperature", "NaN"),
        ("--temperature", "-0.5"),
        ("--top-p", "0"),
        ("--top-p", "nan"),
        ("--repetition-penalty", "inf"),
    ] {
        let flag_value = format!("{flag}={v}");
        let o = legora(&[
            "generate",
            "--model",
            &mistral,
            "--prompt",
            "hi",
            &flag_value,
        ]);
        fails(&o, 2, &[flag]);
    }
}

// ---- class 3: templates that loop ---------------------------------------------------

#[test]
fn a_chat_template_that_loops_for_ever_is_an_error() {
    let tmp = Tmp::new("template");
    let model = tmp.copy("mistral");
    let cases: [(&str, &[&str]); 2] = [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
            &["chat template", "chat_template.jinja"],
        ),
        // output past the cap (few instructions, a huge string)
        (
            "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
            &["chat template"],
        ),
    ];
    for (template, needles) in cases {
        std::fs::write(model.join("chat_template.jinja"), template).unwrap();
        let o = legora(&[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "hi",
            "--chat-template",
        ]);
        fails(&o, 1, needles);
    }
}

// ---- class 4: special files ---------------------------------------------------------

#[cfg(unix)]
#[test]
fn fifos_and_devices_are_refused_as_inputs() {
    let tmp = Tmp::new("special");
    let model = tmp.copy("mistral");
    let weights = model.join("model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    let made = Command::new("mkfifo").arg(&weights).status().unwrap();
    assert!(made.success());
    let o = legora(&["score", "--model", s(&model), "--text", &text_file()]);
    fails(
        &o,
        1,
        &["model.safetensors", "expected a regular file, found a FIFO"],
    );

    let adapter = tmp.copy("mistral-lora-qv");
    let w = adapter.join("adapter_model.safetensors");
    std::fs::remove_file(&w).unwrap();
    std::os::unix::fs::symlink("/dev/urandom", &w).unwrap();
    let o = legora(&[
        "score",
        "--model",
        s(&fixtures().join("mistral")),
        "--adapter",
        s(&adapter),
        "--text",
        &text_file(),
    ]);
    fails(&o, 1, &["adapter_model.safetensors", "a device"]);

    // the text to score and a run file
    let fifo = tmp.0.join("text.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let o = legora(&["train", "--config", s(&fifo)]);
    fails(&o, 1, &["text.fifo", "expected a regular file"]);
}

// ---- class 6: output over input -----------------------------------------------------

#[test]
fn merge_refuses_an_output_inside_its_inputs() {
    let tmp = Tmp::new("outover");
    let model = tmp.copy("mistral");
    let adapter = tmp.copy("mistral-lora-qv");
    let before = snapshot(&tmp.0);
    for out in [
        model.clone(),
        model.join("merged"),
        adapter.join("sub/merged"),
    ] {
        let o = legora(&[
            "merge",
            "--model",
            s(&model),
            "--adapter",
            s(&adapter),
            "--out",
            s(&out),
        ]);
        fails(&o, 1, &["--out", "inside"]);
    }
    assert_eq!(snapshot(&tmp.0), before, "a refused merge changed files");
}

#[test]
fn train_and_compose_refuse_an_output_inside_their_inputs() {
    let tmp = Tmp::new("runover");
    let model = tmp.copy("mistral");
    let expert = tmp.copy("mistral-lora-qv");
    let (run, _) = tiny_run(&tmp, "o", 2);
    let text = std::fs::read_to_string(&run)
        .unwrap()
        .replace(s(&fixtures().join("mistral")), s(&model));
    let before = snapshot(&tmp.0);
    let with_output = |out: &Path| {
        let file = tmp.0.join("over.toml");
        let body = text
            .lines()
            .map(|l| match l.starts_with("output_dir") {
                true => format!("output_dir = \"{}\"", s(out)),
                false => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&file, body).unwrap();
        file.to_str().unwrap().to_string()
    };
    for out in [model.clone(), model.join("run")] {
        let o = legora(&["train", "--config", &with_output(&out)]);
        fails(&o, 1, &["output_dir", "outside the base model's folder"]);
    }
    let experts = [s(&expert), s(&expert)];
    for (out, what) in [
        (model.join("run"), "the base model's folder"),
        (expert.join("mixture"), "an expert folder"),
    ] {
        let run = with_output(&out);
        let mut args = vec!["compose", "--config", &run, "--experts"];
        args.extend(experts);
        let o = legora(&args);
        fails(&o, 1, &["output_dir", what]);
    }
    std::fs::remove_file(tmp.0.join("over.toml")).unwrap();
    assert_eq!(snapshot(&tmp.0), before, "a refused run changed files");
}

// ---- class 8: errors read well ------------------------------------------------------

#[test]
fn errors_name_the_key_and_print_each_message_once() {
    let tmp = Tmp::new("keys");
    // a run file without [[tasks]]: the key is `tasks`, not `<first key>.tasks`
    let run = tmp.file(
        "run.toml",
        &format!(
            "name = \"x\"\n[model]\npath = \"{}\"\n",
            s(&fixtures().join("mistral"))
        ),
    );
    let o = legora(&["train", "--config", &run]);
    fails(&o, 1, &["tasks"]);
    assert!(!o.stderr.contains("name.tasks"), "{}", o.stderr);
    // io errors carry their source once
    let o = legora(&[
        "score",
        "--model",
        "/nonexistent/model",
        "--text",
        &text_file(),
    ]);
    fails(&o, 1, &["/nonexistent/model"]);
    let o = legora(&[
        "score",
        "--model",
        s(&fixtures().join("mistral")),
        "--text",
        "/nonexistent/text.txt",
    ]);
    fails(&o, 1, &["/nonexistent/text.txt"]);
}

// ---- class 7: loaded as PEFT would --------------------------------------------------

/// Remove every tensor whose key does not contain `keep` from a safetensors file.
fn keep_only(file: &Path, keep: &str) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n.contains(keep))
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(file, out).unwrap();
}

#[test]
fn only_the_modules_target_modules_selects_are_loaded() {
    // PEFT 0.21 (checked with PeftModel.from_pretrained on this fixture) injects LoRA
    // into q_proj only and silently skips the file's other six projections.
    let tmp = Tmp::new("peftlike");
    let all = tmp.copy("mistral-lora-all");
    edit_json(&all.join("adapter_config.json"), |v| {
        v["target_modules"] = serde_json::json!(["q_proj"]);
        v["rank_pattern"] = serde_json::json!({});
        v["alpha_pattern"] = serde_json::json!({});
    });
    let q_only = tmp.0.join("q-only");
    std::fs::create_dir_all(&q_only).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(all.join(f), q_only.join(f)).unwrap();
    }
    keep_only(&q_only.join("adapter_model.safetensors"), ".q_proj.");
    let model = s(&fixtures().join("mistral")).to_string();
    let score = |adapter: &Path| {
        let o = legora(&[
            "score",
            "--model",
            &model,
            "--adapter",
            s(adapter),
            "--text",
            &text_file(),
        ]);
        assert_eq!(o.code, Some(0), "{}", o.stderr);
        (o.stdout, o.stderr)
    };
    let (with_extra, warning) = score(&all);
    let (reference, _) = score(&q_only);
    assert_eq!(with_extra, reference);
    assert!(
        warning.contains("not loaded") && warning.contains("v_proj"),
        "{warning}"
    );
}

#[test]
fn rank_mismatch_is_reported_by_inspect_and_refused_on_load() {
    let tmp = Tmp::new("rank");
    let qv = tmp.copy("mistral-lora-qv"); // tensors of rank 4
    edit_json(&qv.join("adapter_config.json"), |v| {
        v["r"] = serde_json::json!(2)
    });
    let o = legora(&["inspect", s(&qv), "--json"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["r"], 2);
    assert_eq!(v["rank_mismatches"][0]["tensor_rank"], 4);
    assert_eq!(v["rank_mismatches"][0]["config_r"], 2);
    let o = legora(&[
        "score",
        "--model",
        s(&fixtures().join("mistral")),
        "--adapter",
        s(&qv),
        "--text",
        &text_file(),
    ]);
    fails(&o, 1, &["lora_A.weight", "expected [2, 64]"]);
}

#[test]
fn token_ids_past_the_vocabulary_and_empty_choices_are_refused() {
    let tmp = Tmp::new("ids");
    let model = tmp.copy("mistral");
    edit_json(&model.join("config.json"), |v| {
        v["eos_token_id"] = serde_json::json!(100000)
    });
    let o = legora(&["score", "--model", s(&model), "--text", &text_file()]);
    fails(&o, 1, &["eos_token_id", "100000"]);
    let run = run_file(&tmp, "");
    let text = std::fs::read_to_string(&run)
        .unwrap()
        .replace("train = ", "params = { choices = [] }\ntrain = ");
    std::fs::write(&run, text).unwrap();
    let o = legora(&["train", "--config", &run]);
    fails(&o, 1, &["tasks[0].params.choices"]);
    assert!(!tmp.0.join("out").exists());
}

// ---- classes 5, 9, 11: checkpoints, resume, determinism, kills ----------------------

/// A tiny task-routed mixture over the mistral fixture: two experts (medical and
/// finance Alpaca rows from the bundled plugins' sample data), `steps` optimizer steps,
/// a checkpoint every 2, no router stage, no evaluation.
fn tiny_run(tmp: &Tmp, tag: &str, steps: usize) -> (String, PathBuf) {
    let out = tmp.0.join(format!("out-{tag}"));
    // short rows: the fixture's context is 64 tokens
    let rows = |words: [&str; 4]| -> String {
        let mut text = String::new();
        for (i, w) in words.iter().cycle().take(12).enumerate() {
            text.push_str(&format!(
                "{{\"instruction\": \"say {w}\", \"input\": \"{i}\", \"output\": \"{w}\"}}\n"
            ));
        }
        text
    };
    let med = tmp.file(
        &format!("{tag}-med.jsonl"),
        &rows(["heart", "skin", "lung", "bone"]),
    );
    let fin = tmp.file(
        &format!("{tag}-fin.jsonl"),
        &rows(["up", "down", "flat", "risk"]),
    );
    let run = tmp.file(
        &format!("{tag}.toml"),
        &format!(
            "seed = 3\noutput_dir = \"{out}\"\n\n[model]\npath = \"{model}\"\ntemplate = \"raw\"\n\
             max_seq_len = 64\n\n\
             [[tasks]]\nname = \"medical\"\nformat = \"medical/alpaca\"\ntrain = \"{med}\"\n\
             max_samples = 12\n\n\
             [[tasks]]\nname = \"finance\"\nformat = \"medical/alpaca\"\ntrain = \"{fin}\"\n\
             max_samples = 12\n\n\
             [lora]\nr = 2\nlora_alpha = 4\nlora_dropout = 0.1\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\n\
             [stages.experts]\nmax_steps = {steps}\nbatch_size = 2\nsave_steps = 2\nlearning_rate = 1e-2\n\n\
             [stages.router]\nenabled = false\n\n[stages.eval]\nenabled = false\n",
            out = s(&out),
            model = s(&fixtures().join("mistral")),
            med = med,
            fin = fin,
        ),
    );
    (run, out)
}

/// The folder holding `latest` under `out`.
fn checkpoints(out: &Path) -> PathBuf {
    let mut stack = vec![out.to_path_buf()];
    while let Some(d) = stack.pop() {
        if d.join("latest").is_file() {
            return d;
        }
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
    panic!("no checkpoints under {}", out.display());
}

/// Every `.safetensors` file under `out` outside the checkpoints, by relative path.
fn adapters(out: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = snapshot(out)
        .into_iter()
        .map(|(p, _, _)| p)
        .filter(|p| {
            p.extension().is_some_and(|e| e == "safetensors")
                && !p.components().any(|c| c.as_os_str() == "checkpoints")
                && !p.ends_with("best.safetensors")
        })
        .map(|p| {
            (
                p.strip_prefix(out).unwrap().to_path_buf(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no adapters under {}", out.display());
    files
}

/// Change checkpoint file `name` in `dir` with `f` and record its new length and
/// checksum in `state.json`, as a deliberate edit would.
fn resummed(dir: &Path, name: &str, f: impl FnOnce(&mut Vec<u8>)) {
    let p = dir.join(name);
    let mut b = std::fs::read(&p).unwrap();
    f(&mut b);
    let sum = legora::train::FileSum::of(&b);
    std::fs::write(&p, &b).unwrap();
    edit_json(&dir.join("state.json"), |v| {
        v["files"][name] = serde_json::to_value(sum).unwrap();
    });
}

#[test]
fn resume_validates_every_checkpoint_file_and_never_deletes_without_overwrite() {
    let tmp = Tmp::new("resume");
    let (run, out) = tiny_run(&tmp, "r", 6);
    let o = legora(&["train", "--config", &run, "--stop-after", "2"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let ckpt = checkpoints(&out);
    let step = ckpt.join(std::fs::read_to_string(ckpt.join("latest")).unwrap().trim());

    // a second `train` without --resume refuses and leaves everything in place
    let before = snapshot(&out);
    let o = legora(&["train", "--config", &run]);
    fails(&o, 1, &["output_dir", "--resume", "--overwrite"]);
    assert_eq!(snapshot(&out), before);

    // damaged checkpoint files: typed errors naming the file, nothing deleted
    let damage: [Damage; 6] = [
        (
            "optimizer.safetensors",
            Box::new(|d: &Path| std::fs::write(d.join("optimizer.safetensors"), [0u8; 8]).unwrap()),
            "optimizer.safetensors",
        ),
        // damaged as an attacker would: the sums in state.json match the damaged bytes,
        // so the bytes reach the optimizer-state reader, which checks every value
        (
            "optimizer.safetensors",
            Box::new(|d: &Path| {
                resummed(d, "optimizer.safetensors", |b| {
                    let header = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                    b[8 + header..12 + header].copy_from_slice(&f32::NAN.to_le_bytes());
                })
            }),
            "expected finite values",
        ),
        (
            "optimizer.safetensors",
            Box::new(|d: &Path| resummed(d, "optimizer.safetensors", |b| b.truncate(b.len() / 2))),
            "not a safetensors file",
        ),
        (
            "optimizer.safetensors",
            Box::new(|d: &Path| {
                let p = d.join("optimizer.safetensors");
                let mut b = std::fs::read(&p).unwrap();
                let n = b.len();
                b[n / 2] ^= 0xff;
                std::fs::write(p, b).unwrap()
            }),
            "checksum",
        ),
        (
            "state.json",
            Box::new(|d: &Path| {
                edit_json(&d.join("state.json"), |v| {
                    v["step"] = serde_json::json!(1_000_000_000_000u64)
                })
            }),
            "`step`",
        ),
        (
            "trainable.safetensors",
            Box::new(|d: &Path| {
                let p = d.join("trainable.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(p, &b[..b.len() - 3]).unwrap()
            }),
            "trainable.safetensors",
        ),
    ];
    for (file, hurt, needle) in &damage {
        let saved = std::fs::read(step.join(file)).unwrap();
        let state = std::fs::read(step.join("state.json")).unwrap();
        hurt(&step);
        let o = legora(&["train", "--config", &run, "--resume"]);
        fails(&o, 1, &[file, needle]);
        std::fs::write(step.join(file), saved).unwrap();
        std::fs::write(step.join("state.json"), state).unwrap();
    }
    // `latest` may only name a checkpoint folder of the run
    std::fs::write(ckpt.join("latest"), "../../../../etc").unwrap();
    let o = legora(&["train", "--config", &run, "--resume"]);
    fails(&o, 1, &["latest", "step-NNNNNN"]);
    std::fs::write(
        ckpt.join("latest"),
        step.file_name().unwrap().to_str().unwrap(),
    )
    .unwrap();

    // a metrics line torn by a kill does not stop the resume
    let metrics = snapshot(&out)
        .into_iter()
        .map(|(p, _, _)| p)
        .find(|p| p.ends_with("metrics.jsonl"))
        .expect("metrics.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"stage\": \"exp").unwrap();
    drop(f);
    let o = legora(&["train", "--config", &run, "--resume"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let o = legora(&["train", "--config", &run, "--overwrite"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
}

#[test]
fn the_same_seed_gives_bitwise_equal_adapters_in_two_processes() {
    let tmp = Tmp::new("determinism");
    let (run_a, out_a) = tiny_run(&tmp, "a", 4);
    let (run_b, out_b) = tiny_run(&tmp, "b", 4);
    for run in [&run_a, &run_b] {
        let o = legora(&["train", "--config", run]);
        assert_eq!(o.code, Some(0), "{}", o.stderr);
    }
    let (a, b) = (adapters(&out_a), adapters(&out_b));
    assert_eq!(a.len(), b.len());
    for ((pa, da), (pb, db)) in a.iter().zip(&b) {
        assert_eq!(pa, pb);
        assert!(da == db, "{} differs between two runs", pa.display());
    }
}

/// f32 values of every tensor of a safetensors file, by name.
fn tensors(bytes: &[u8]) -> Vec<(String, Vec<f32>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, vals)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(unix)]
#[test]
fn a_run_killed_five_times_and_resumed_ends_where_an_uninterrupted_run_does() {
    let tmp = Tmp::new("killloop");
    let steps = 10;
    let (run_ref, out_ref) = tiny_run(&tmp, "ref", steps);
    let t0 = std::time::Instant::now();
    let o = legora(&["train", "--config", &run_ref]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let span = t0.elapsed().as_millis() as u64;
    let (run, out) = tiny_run(&tmp, "killed", steps);
    // kill moments spread over the run's length (seeded: a failure reproduces)
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..5 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = span / 10 + (x >> 33) % (span * 8 / 10).max(1);
        let mut child = common::legora_cmd()
            .args(["train", "--config", &run, "--resume"])
            .env("LEGORA_PLUGIN_PATH", common::bundled_plugins())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(at));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
    let o = legora(&["train", "--config", &run, "--resume"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let (a, b) = (adapters(&out_ref), adapters(&out));
    assert_eq!(a.len(), b.len());
    for ((pa, da), (pb, db)) in a.iter().zip(&b) {
        assert_eq!(pa, pb);
        for ((na, va), (nb, vb)) in tensors(da).iter().zip(&tensors(db)) {
            assert_eq!(na, nb);
            let worst = va
                .iter()
                .zip(vb)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-6, "{}: `{na}` differs by {worst}", pa.display());
        }
    }
    let temps: Vec<_> = snapshot(&out)
        .into_iter()
        .filter(|(p, _, _)| p.to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
}
