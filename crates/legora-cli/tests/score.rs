//! `legora score` on the transformers fixtures (numbers from
//! tests/fixtures/make_model_fixtures.py: transformers' mean NLL of score.txt).

use std::path::PathBuf;

use legora_testing::model_fixtures as fixtures;

fn reference_score(family: &str, key: &str) -> f64 {
    let bytes = std::fs::read(
        fixtures()
            .join("reference")
            .join(format!("{family}.safetensors")),
    )
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(key).unwrap();
    f64::from_le_bytes(v.data()[..8].try_into().unwrap())
}

/// A copy of fixture `name` whose config says `max_position_embeddings = 128`.
///
/// transformers scored score.txt (96 tokens) in one window, past the fixtures' 64
/// positions, which legora refuses. RoPE (default, and llama3 scaling, which reads
/// `original_max_position_embeddings`) does not read `max_position_embeddings`, so
/// raising it changes no number: transformers' reference holds for the copy.
fn long_context(name: &str) -> PathBuf {
    let to = std::env::temp_dir().join(format!("legora-score-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    let cfg = to.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["max_position_embeddings"] = serde_json::json!(128);
    std::fs::write(&cfg, v.to_string()).unwrap();
    to
}

fn legora(args: &[&str]) -> (bool, String, String) {
    let out: super::common::Out = super::common::legora_cmd()
        .args(args)
        .output()
        .unwrap()
        .into();
    (out.ok, out.stdout, out.stderr)
}

fn score(extra: &[&str]) -> serde_json::Value {
    let model = long_context("qwen2");
    let text = fixtures().join("score.txt");
    // transformers scored all 96 tokens in one window, so ask for one window too.
    let mut args = vec![
        "score",
        "--model",
        model.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--max-length",
        "128",
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = legora(&args);
    assert!(ok, "legora score failed: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn score_prints_transformers_nll_as_json() {
    let v = score(&[]);
    let want = reference_score("qwen2", "score_base");
    let nll = v["mean_nll"].as_f64().unwrap();
    assert!((nll - want).abs() < 1e-4, "{nll} vs transformers {want}");
    assert!((v["perplexity"].as_f64().unwrap() - want.exp()).abs() < 1e-2);
    assert_eq!(v["tokens"].as_u64().unwrap() as usize, 95);

    let adapter = fixtures().join("qwen2-lora-qv");
    let v = score(&["--adapter", adapter.to_str().unwrap()]);
    let want = reference_score("qwen2", "score_qv");
    assert!((v["mean_nll"].as_f64().unwrap() - want).abs() < 1e-4);
}

/// `--backend` picks a compiled backend at run time (the report names it); one not compiled
/// into the binary, or an unknown name, is a usage error listing the compiled ones.
#[test]
fn backend_flag_chooses_a_compiled_backend_and_refuses_the_others() {
    let v = score(&["--backend", "flex"]);
    assert_eq!(v["backend"], "flex");
    let want = reference_score("qwen2", "score_base");
    assert!((v["mean_nll"].as_f64().unwrap() - want).abs() < 1e-4);
    assert_eq!(score(&[])["backend"], "flex", "the default build runs flex");
    let text = fixtures().join("score.txt");
    let model = fixtures().join("qwen2");
    for (name, needle) in [
        (
            "cuda",
            "backend `cuda` is not compiled into this binary (it has flex",
        ),
        (
            "wgpu",
            "backend `wgpu` is not compiled into this binary (it has flex",
        ),
        (
            "metal",
            "unknown backend `metal`: expected one of cuda, wgpu, ndarray, flex",
        ),
    ] {
        let (ok, _, stderr) = legora(&[
            "score",
            "--backend",
            name,
            "--model",
            model.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
        ]);
        assert!(!ok && stderr.contains(needle), "--backend {name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn score_defaults_to_windows_of_max_position_embeddings() {
    let model = fixtures().join("qwen2");
    let text = fixtures().join("score.txt");
    let (ok, stdout, stderr) = legora(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    // 96 tokens in windows of 64 overlapping by one: still 95 predicted tokens.
    assert_eq!(v["tokens"], 95);
    let nll = v["mean_nll"].as_f64().unwrap();
    assert!(nll.is_finite() && (nll - reference_score("qwen2", "score_base")).abs() > 1e-6);
}

#[test]
fn score_reports_bad_input_without_panicking() {
    let text = fixtures().join("score.txt");
    let (ok, _, stderr) = legora(&[
        "score",
        "--model",
        "/nonexistent/model",
        "--text",
        text.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("config.json") && !stderr.contains("panicked"),
        "{stderr}"
    );
    let model = fixtures().join("qwen2");
    let (ok, _, stderr) = legora(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--adapter",
        "a",
        "--moe",
        "b",
    ]);
    assert!(!ok && stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn score_a_mixture_folder() {
    use legora::prelude::*;
    type B = legora::backend::Flex;
    // Experts: PEFT's llama q/v adapter and a random one on the same modules.
    let dev = Default::default();
    let base = PretrainedModel::<B>::from_pretrained(fixtures().join("llama"), &dev).unwrap();
    let mut m = PeftModel::from_pretrained(base, fixtures().join("llama-lora-qv")).unwrap();
    let mut cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]);
    cfg.init_lora_weights = InitLoraWeights::Random;
    m.add_adapter("other", &cfg).unwrap();
    m.model_mut()
        .adapters_to_mixture(&["default", "other"], Some(&RouterConfig::new(2)))
        .unwrap();
    let dir = std::env::temp_dir().join(format!("legora-cli-moe-{}", std::process::id()));
    save_mixture(m.model(), &dir, None, None).unwrap();

    let model = long_context("llama");
    let text = fixtures().join("score.txt");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "score",
            "--model",
            model.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--max-length",
            "128",
            "--moe",
            dir.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let (ok, stdout, stderr) = legora(&a);
        assert!(ok, "{stderr}");
        serde_json::from_str::<serde_json::Value>(stdout.trim()).unwrap()
    };
    // Expert 0 alone is PEFT's adapter: transformers' score with that adapter.
    let v = run(args(&["--task-id", "0"]));
    let want = reference_score("llama", "score_qv");
    assert!(
        (v["mean_nll"].as_f64().unwrap() - want).abs() < 1e-4,
        "{v} vs {want}"
    );
    // Router-gated.
    let v = run(args(&[]));
    assert!(v["mean_nll"].as_f64().unwrap().is_finite());
    let (ok, _, stderr) = legora(
        &args(&["--task-id", "5"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(!ok && stderr.contains("task id"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--model` takes a Hugging Face repo id that the local cache holds (`$HF_HOME/hub`),
/// with no download: the same score as the folder; an id the cache lacks is an error
/// naming it and where it looked.
#[test]
fn a_repo_id_scores_from_the_hugging_face_cache() {
    let home = std::env::temp_dir().join(format!("legora-hf-home-{}", std::process::id()));
    let repo = home.join("hub/models--tiny-org--tiny-qwen2");
    let folder = long_context("qwen2");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(&folder).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, snap.join(p.file_name().unwrap())).unwrap();
    }
    let text = fixtures().join("score.txt");
    let run = |model: &str| {
        let out: super::common::Out = super::common::legora_cmd()
            .args(["score", "--model", model, "--text", text.to_str().unwrap()])
            .args(["--max-length", "128"])
            .env("HF_HOME", &home)
            .env_remove("HF_HUB_CACHE")
            .output()
            .unwrap()
            .into();
        out
    };
    let out = run("tiny-org/tiny-qwen2");
    assert!(out.ok, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let want = reference_score("qwen2", "score_base");
    assert!((v["mean_nll"].as_f64().unwrap() - want).abs() < 1e-4, "{v}");
    let out = run("tiny-org/absent");
    assert!(!out.ok);
    assert!(out.stderr.contains("tiny-org/absent"), "{}", out.stderr);
    assert!(
        out.stderr.contains(&home.join("hub").display().to_string()),
        "{}",
        out.stderr
    );
    let _ = std::fs::remove_dir_all(&home);
}
