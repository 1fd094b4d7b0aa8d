//! The `legora` binary's subcommands on the fixtures of tests/fixtures/models (made by
//! tests/fixtures/make_model_fixtures.py): outputs, exit codes and error messages.

use super::common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use legora_testing::model_fixtures as fixtures;

fn fx(name: &str) -> String {
    fixtures().join(name).to_str().unwrap().to_string()
}

use common::Out;

fn legora(args: &[&str]) -> Out {
    common::legora_cmd().args(args).output().unwrap().into()
}

/// A failure: exit code 1 (an `error:` line) or 2 (clap's usage error), never a panic.
fn fails(o: &Out, code: i32, needle: &str) {
    assert!(!o.ok, "expected a failure, got success: {}", o.stdout);
    assert_eq!(o.code, Some(code), "{}", o.stderr);
    assert!(
        o.stderr.contains(needle) && !o.stderr.contains("panicked"),
        "stderr lacks `{needle}`: {}",
        o.stderr
    );
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("legora-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn json(o: &Out) -> serde_json::Value {
    assert!(o.ok, "{}", o.stderr);
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", o.stdout))
}

/// `legora score` on the fixtures' score.txt with `args` (model, adapter, storage): the
/// mean NLL, in windows of the fixtures' context (max_position_embeddings).
fn score(args: &[&str]) -> f64 {
    let text = fx("score.txt");
    let mut a = vec!["score", "--text", &text, "--max-length", "64"];
    a.extend_from_slice(args);
    json(&legora(&a))["mean_nll"].as_f64().unwrap()
}

#[test]
fn inspect_model_folders() {
    // llama fixture: embed 300·64 + lm_head 300·64 + 2 layers × (q 64·64 + k,v 2·64·32
    // + o 64·64 + mlp 3·64·128 + 2 norms·64) + final norm 64 = 112,448.
    let o = legora(&["inspect", &fx("llama")]);
    assert!(o.ok, "{}", o.stderr);
    assert!(
        o.stdout.contains("parameters                112,448"),
        "{}",
        o.stdout
    );
    let v = json(&legora(&["inspect", &fx("llama"), "--json"]));
    assert_eq!(v["kind"], "model");
    assert_eq!(v["model_type"], "llama");
    assert_eq!(v["num_hidden_layers"], 2);
    assert_eq!(v["num_key_value_heads"], 2);
    assert_eq!(v["vocab_size"], 300);
    // qwen2 ties lm_head to embed_tokens (counted once, as transformers'
    // num_parameters()) and has q/k/v biases: 112,448 − 19,200 + 2 × (64 + 32 + 32).
    let v = json(&legora(&["inspect", &fx("qwen2"), "--json"]));
    assert_eq!(v["tie_word_embeddings"], true);
    assert_eq!(v["parameters"], 93_504);
}

#[test]
fn inspect_adapter_prints_peft_trainable_parameters() {
    // 2 layers × (q: 4·64 + 64·4, v: 4·64 + 32·4) = 1,792; all = 93,504 + 1,792.
    let o = legora(&["inspect", &fx("qwen2-lora-qv"), "--model", &fx("qwen2")]);
    assert!(o.ok, "{}", o.stderr);
    assert!(
        o.stdout
            .contains("trainable params: 1,792 || all params: 95,296 || trainable%: 1.8805"),
        "{}",
        o.stdout
    );
    assert!(o
        .stdout
        .contains("model.layers.1.self_attn.v_proj  4     64 -> 32"));
    let v = json(&legora(&["inspect", &fx("llama-lora-all"), "--json"]));
    assert_eq!(v["kind"], "adapter");
    assert_eq!(v["r"], 8);
    assert_eq!(v["modules"], 14);
    assert_eq!(v["module_ranks"].as_array().unwrap().len(), 14);
    // A base folder that is not there.
    fails(
        &legora(&[
            "inspect",
            &fx("qwen2-lora-qv"),
            "--model",
            "/nonexistent/base",
        ]),
        1,
        "config.json",
    );
}

#[test]
fn inspect_mixture_folder() {
    use legora::prelude::*;
    type B = legora::backend::Flex;
    let dev = Default::default();
    let base = PretrainedModel::<B>::from_pretrained(fixtures().join("llama"), &dev).unwrap();
    let mut m = PeftModel::from_pretrained(base, fixtures().join("llama-lora-qv")).unwrap();
    let mut cfg = LoraConfig::new(2, 4.0, &["q_proj", "v_proj"]);
    cfg.init_lora_weights = InitLoraWeights::Random;
    m.add_adapter("other", &cfg).unwrap();
    m.model_mut()
        .adapters_to_mixture(&["default", "other"], Some(&RouterConfig::new(2)))
        .unwrap();
    let dir = temp_dir("inspect-moe");
    save_mixture(m.model(), &dir, None, None).unwrap();
    let d = dir.to_str().unwrap();

    let o = legora(&["inspect", d, "--model", &fx("llama")]);
    assert!(o.ok, "{}", o.stderr);
    assert!(o.stdout.contains("2 experts"), "{}", o.stdout);
    assert!(o.stdout.contains("router: topk, top_k 2"), "{}", o.stdout);
    assert!(o.stdout.contains("layers with a router: 2 ([0, 1])"));
    let v = json(&legora(&["inspect", d, "--json"]));
    assert_eq!(v["kind"], "mixture");
    assert_eq!(v["experts"][0]["name"], "default");
    assert_eq!(v["experts"][1]["r"], 2);
    // routers: 2 layers × [2 experts, 64 hidden]
    assert_eq!(v["router_params"], 256);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inspect_reports_bad_input() {
    fails(&legora(&["inspect", "/nonexistent/x"]), 1, "no such folder");
    let empty = temp_dir("inspect-empty");
    fails(
        &legora(&["inspect", empty.to_str().unwrap()]),
        1,
        "not a model, adapter or mixture folder",
    );
    fails(
        &legora(&["inspect", &fx("llama"), "--model", &fx("llama")]),
        1,
        "--model only applies",
    );
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn merge_writes_a_folder_that_scores_like_the_adapter() {
    let out = temp_dir("merge");
    let o = legora(&[
        "merge",
        "--model",
        &fx("llama"),
        "--adapter",
        &fx("llama-lora-qv"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.ok, "{}", o.stderr);
    assert!(out.join("config.json").is_file() && out.join("model.safetensors").is_file());
    assert!(out.join("tokenizer.json").is_file());
    // The merged folder loads again (legora score) and gives the adapter's NLL.
    let merged = score(&["--model", out.to_str().unwrap()]);
    let adapted = score(&["--model", &fx("llama"), "--adapter", &fx("llama-lora-qv")]);
    assert!((merged - adapted).abs() < 1e-4, "{merged} vs {adapted}");
    let _ = std::fs::remove_dir_all(&out);
}

/// `--quantize` / `--dtype`: the frozen weights' storage, shown by inspect; a QLoRA
/// adapter merged over the nf4 base (dequantized) scores like the adapter over that base.
#[test]
fn storage_flags_quantize_the_base_for_every_command() {
    let v = json(&legora(&[
        "inspect",
        &fx("llama"),
        "--json",
        "--quantize",
        "nf4",
    ]));
    assert_eq!(v["storage"][0]["format"], "nf4", "{v}");
    assert_eq!(v["storage"][0]["matrices"], 14, "{v}");
    // the embeddings stay bf16 beside the 4-bit projections, with the untied lm_head
    assert_eq!(v["storage"][1]["format"], "bf16", "{v}");
    assert_eq!(v["storage"][1]["matrices"], 2, "{v}");
    // the elements are counted, not the 4-bit codes
    assert_eq!(v["parameters"], 112_448, "{v}");
    let v = json(&legora(&[
        "inspect",
        &fx("llama"),
        "--json",
        "--dtype",
        "bf16",
    ]));
    assert_eq!(v["storage"][0]["format"], "bf16", "{v}");
    fails(
        &legora(&["inspect", &fx("llama"), "--double-quant"]),
        2,
        "--quantize",
    );
    fails(
        &legora(&["inspect", &fx("llama"), "--quantize", "q3"]),
        2,
        "nf4",
    );
    let out = temp_dir("merge-nf4");
    let (model, adapter) = (fx("llama"), fx("llama-lora-qv"));
    let o = legora(&[
        "merge",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--quantize",
        "nf4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        o.ok && o.stdout.contains("over the nf4 base"),
        "{}",
        o.stderr
    );
    let merged = score(&["--model", out.to_str().unwrap()]);
    let over_nf4 = score(&[
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--quantize",
        "nf4",
    ]);
    let over_f32 = score(&["--model", &model, "--adapter", &adapter]);
    assert!((merged - over_nf4).abs() < 1e-4, "{merged} vs {over_nf4}");
    // 4-bit weights change the NLL, a little
    let rel = (over_nf4 - over_f32).abs() / over_f32;
    assert!(rel > 1e-6 && rel < 0.05, "{over_nf4} vs {over_f32}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn merge_reports_bad_input() {
    let out = temp_dir("merge-bad");
    let o = out.to_str().unwrap();
    fails(
        &legora(&[
            "merge",
            "--model",
            &fx("llama"),
            "--adapter",
            "/nonexistent/adapter",
            "--out",
            o,
        ]),
        1,
        "adapter_config.json",
    );
    fails(
        &legora(&[
            "merge",
            "--model",
            &fx("llama"),
            "--adapter",
            &fx("llama-lora-qv"),
            "--out",
            &fx("llama"),
        ]),
        1,
        "the model folder",
    );
    fails(
        &legora(&["merge", "--model", &fx("llama"), "--out", o]),
        2,
        "--adapter",
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn generate_prints_a_completion() {
    let gen = |extra: &[&str]| {
        let model = fx("llama");
        let mut a = vec![
            "generate",
            "--model",
            &model,
            "--prompt",
            "hello world",
            "--max-new-tokens",
            "6",
        ];
        a.extend_from_slice(extra);
        let o = legora(&a);
        assert!(o.ok, "{}", o.stderr);
        assert!(o.stdout.ends_with('\n'));
        // The timing line: prompt and new tokens (at most 6), and the speed.
        let timing = o.stderr.lines().last().unwrap_or_default();
        let words: Vec<&str> = timing.split(' ').collect();
        assert_eq!(
            words.get(1..3),
            Some(&["prompt", "tokens,"][..]),
            "{timing}"
        );
        let new: usize = words[3].parse().unwrap();
        assert!((1..=6).contains(&new), "{timing}");
        assert!(timing.ends_with(" tokens/s"), "{timing}");
        o.stdout
    };
    let greedy = gen(&[]);
    assert!(!greedy.trim().is_empty(), "no tokens printed");
    assert_eq!(greedy, gen(&[]), "greedy decoding is deterministic");
    // `cat` with weights 1, 0 is exactly the first adapter.
    let one = gen(&["--adapter", &fx("llama-lora-qv")]);
    let cat = gen(&[
        "--adapters",
        &format!("{},{}", fx("llama-lora-qv"), fx("llama-lora-all")),
        "--weights",
        "1,0",
    ]);
    assert_eq!(one, cat);
    // `svd` at a rank that holds the first adapter (r 4) with weights 1, 0 is that adapter
    // again (up to f32 rounding, which greedy decoding does not see here)
    let svd = gen(&[
        "--adapters",
        &format!("{},{}", fx("llama-lora-qv"), fx("llama-lora-all")),
        "--weights",
        "1,0",
        "--combination",
        "svd",
        "--svd-rank",
        "12",
    ]);
    assert_eq!(one, svd);
    let sampled = gen(&["--temperature", "0.8", "--top-k", "20", "--seed", "3"]);
    assert_eq!(
        sampled,
        gen(&["--temperature", "0.8", "--top-k", "20", "--seed", "3"])
    );
}

/// Generation that reaches the model's context (the fixture's max_position_embeddings is
/// 64) stops there and says so on stderr, before the timing line.
#[test]
fn generate_stops_at_the_context_and_says_so() {
    let model = fx("llama");
    let a = [
        "generate",
        "--model",
        &model,
        "--prompt",
        "hello world",
        "--max-new-tokens",
        "200",
    ];
    let o = legora(&a);
    assert!(o.ok, "{}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().collect();
    let note = lines[lines.len().saturating_sub(2)];
    assert!(
        note.starts_with("stopped after ")
            && note.contains("fill the model's context (max_position_embeddings = 64)"),
        "{}",
        o.stderr
    );
    let timing: Vec<&str> = lines[lines.len() - 1].split(' ').collect();
    let (prompt, new): (usize, usize) = (timing[0].parse().unwrap(), timing[3].parse().unwrap());
    assert_eq!(prompt + new, 64, "{}", o.stderr);
}

#[test]
fn generate_chat_reads_stdin_until_exit() {
    use std::io::Write;
    let mut child = common::legora_cmd()
        .args([
            "generate",
            "--model",
            &fx("llama"),
            "--chat",
            "--max-new-tokens",
            "4",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hi there\nhow are you\n/exit\nnever read\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("its chat template"), "{stderr}");
    // One reply line per message before /exit.
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
}

#[test]
fn generate_reports_bad_input() {
    let model = fx("llama");
    fails(
        &legora(&["generate", "--model", &model]),
        2,
        "--prompt <PROMPT>|--chat",
    );
    fails(
        &legora(&[
            "generate",
            "--model",
            &model,
            "--prompt",
            "x",
            "--adapter",
            "a",
            "--moe",
            "b",
        ]),
        2,
        "cannot be used with",
    );
    fails(
        &legora(&[
            "generate",
            "--model",
            &model,
            "--prompt",
            "x",
            "--adapters",
            &format!("{},{}", fx("llama-lora-qv"), fx("llama-lora-all")),
            "--weights",
            "1",
        ]),
        1,
        "2 folders but --weights has 1",
    );
    fails(
        &legora(&["generate", "--model", "/nonexistent/m", "--prompt", "x"]),
        1,
        "config.json",
    );
    // the merge flags: each a usage error before anything is loaded
    let pair = format!("{},{}", fx("llama-lora-qv"), fx("llama-lora-all"));
    let merge = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            "/nonexistent/m",
            "--prompt",
            "x",
            "--adapters",
            &pair,
            "--weights",
            "1,1",
        ];
        a.extend_from_slice(extra);
        legora(&a)
    };
    fails(&merge(&["--combination", "sum"]), 2, "combination_type");
    fails(
        &merge(&["--combination", "ties"]),
        2,
        "--combination ties needs --density",
    );
    fails(
        &merge(&["--combination", "ties", "--density", "1.5"]),
        2,
        "--density",
    );
    fails(
        &merge(&["--density", "0.5"]),
        2,
        "--density does not apply to --combination cat",
    );
    fails(
        &merge(&[
            "--combination",
            "ties",
            "--density",
            "0.5",
            "--svd-rank",
            "4",
        ]),
        2,
        "--svd-rank does not apply",
    );
    fails(
        &merge(&["--combination", "svd", "--svd-rank", "0"]),
        2,
        "--svd-rank",
    );
    fails(
        &merge(&[
            "--combination",
            "ties",
            "--density",
            "0.5",
            "--majority-sign-method",
            "most",
        ]),
        2,
        "majority_sign_method",
    );
    fails(
        &merge(&["--combination", "svd", "--majority-sign-method", "total"]),
        2,
        "--majority-sign-method does not apply",
    );
    fails(
        &legora(&[
            "generate",
            "--model",
            &model,
            "--prompt",
            "x",
            "--density",
            "0.5",
        ]),
        2,
        "--adapters",
    );
    // a valid flag set the adapters cannot take: ranks 4 and 8 for `ties`
    fails(
        &legora(&[
            "generate",
            "--model",
            &model,
            "--prompt",
            "x",
            "--adapters",
            &pair,
            "--weights",
            "1,1",
            "--combination",
            "ties",
            "--density",
            "0.5",
        ]),
        1,
        "adapters of equal rank for \"ties\"",
    );
    fails(
        &legora(&[
            "generate", "--model", &model, "--prompt", "x", "--top-p", "1.5",
        ]),
        2,
        "--top-p",
    );
}

#[test]
fn plugins_lists_or_reports_what_is_missing() {
    let empty = temp_dir("plugins-empty");
    let e = empty.to_str().unwrap();
    fails(
        &legora(&["plugins", "--plugin-dir", e, "--no-default-dirs"]),
        1,
        "no plugins found in",
    );
    fails(
        &legora(&["plugins", "--plugin-dir", "/nonexistent/plugins"]),
        1,
        "no such folder",
    );
    fails(
        &legora(&["plugins", "nosuch", "--plugin-dir", e, "--no-default-dirs"]),
        1,
        "plugin `nosuch` not found",
    );
    // The bundled plugins, built once for the CLI tests.
    let d = common::bundled_plugins().to_str().unwrap();
    let v = json(&legora(&[
        "plugins",
        "--plugin-dir",
        d,
        "--no-default-dirs",
        "--json",
        "medical",
    ]));
    assert_eq!(v[0]["name"], "medical");
    assert!(v[0]["formats"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "medical/medqa"));
    let o = legora(&["plugins", "--plugin-dir", d, "--no-default-dirs"]);
    assert!(o.ok && o.stdout.starts_with("plugin"), "{}", o.stderr);
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn run_file_errors_name_the_file_line_and_key() {
    let dir = temp_dir("runfile");
    let run = dir.join("run.toml");
    std::fs::write(
        &run,
        "seed = 1\nbogus_key = 2\n\n[model]\npath = \"m\"\n\n[[tasks]]\nname = \"a\"\n\
         format = \"medical/medqa\"\ntrain = \"a.jsonl\"\n",
    )
    .unwrap();
    let r = run.to_str().unwrap();
    for sub in ["eval", "train"] {
        let o = legora(&[sub, "--config", r]);
        fails(&o, 1, &format!("{r}:2:"));
        assert!(o.stderr.contains("bogus_key"), "{}", o.stderr);
    }
    let o = legora(&["compose", "--experts", "a", "--config", r]);
    fails(&o, 1, "bogus_key");
    fails(
        &legora(&["eval", "--config", "/nonexistent/run.toml"]),
        1,
        "/nonexistent/run.toml",
    );
    fails(&legora(&["compose", "--config", r]), 2, "--experts");
    // The demo run file has three tasks: two folders do not fit.
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../demo/demo.toml");
    let o = legora(&[
        "compose",
        "--experts",
        &fx("llama-lora-qv"),
        &fx("llama-lora-all"),
        "--config",
        demo.to_str().unwrap(),
    ]);
    fails(&o, 1, "2 expert folders given");
    assert!(o.stderr.contains("medical, finance, npc"), "{}", o.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}
