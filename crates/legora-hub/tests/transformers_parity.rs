//! legora against transformers / PEFT on the tiny fixtures of
//! tests/fixtures/make_model_fixtures.py (Llama sharded f32 with llama3 rope, Qwen2 bf16
//! tied with q/k/v bias, Mistral with sliding window 4, Qwen3 with per-head q/k norms, Phi-3
//! with fused qkv_proj / gate_up_proj and a window of 6 on every layer):
//! logits within 1e-4, greedy ids equal, scores equal, chat template equal.

use super::common;

use common::{fixture, Reference, TempDir, B};
use legora_hub::{Message, PeftModel, PretrainedModel};
use legora_models::{GenerationConfig, LmInput, TokenIds};

const TOL: f32 = 1e-4;
const FAMILIES: [&str; 6] = ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3"];

fn base(family: &str) -> PretrainedModel<B> {
    PretrainedModel::from_pretrained(fixture(family), &Default::default()).unwrap()
}

/// The fixture with `max_position_embeddings = 128` (its config says 64, shorter than the
/// scored text; transformers scored the whole text in one window, and RoPE does not read
/// that key, so the reference numbers hold).
fn base_long(family: &str) -> PretrainedModel<B> {
    // one folder per call: tests running at once in this process must not share it
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "legora-parity-{family}-{}-{call}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(family)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let cfg = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["max_position_embeddings"] = serde_json::json!(128);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let m = PretrainedModel::from_pretrained(&dir, &Default::default()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    m
}

#[test]
fn base_logits_match_transformers() {
    for family in FAMILIES {
        let r = Reference::load(family);
        let m = base(family);
        let d = r.max_diff(m.model.forward(r.batch()).unwrap().logits, "logits_base");
        eprintln!("{family}: base max |Δlogits| = {d:.2e}");
        assert!(d < TOL, "{family}: max |Δlogits| = {d}");
        // Positions derived from the mask (as `generate` does) equal the explicit ones.
        let mut input = r.batch();
        input.position_ids = None;
        let d2 = r.max_diff(m.model.forward(input).unwrap().logits, "logits_base");
        assert!(d2 < TOL, "{family}: derived positions: {d2}");
    }
}

#[test]
fn adapter_logits_match_peft() {
    for family in FAMILIES {
        let r = Reference::load(family);
        for tag in ["qv", "all"] {
            let m =
                PeftModel::from_pretrained(base(family), fixture(&format!("{family}-lora-{tag}")))
                    .unwrap();
            let d = r.max_diff(
                m.model().forward(r.batch()).unwrap().logits,
                &format!("logits_{tag}"),
            );
            eprintln!("{family} + {tag}: max |Δlogits| = {d:.2e}");
            assert!(d < TOL, "{family} + {tag}: max |Δlogits| = {d}");
        }
    }
}

#[test]
fn disabling_the_adapter_gives_the_base_logits() {
    let r = Reference::load("qwen2");
    let mut m = PeftModel::from_pretrained(base("qwen2"), fixture("qwen2-lora-all")).unwrap();
    m.disable_adapters();
    let d = r.max_diff(m.model().forward(r.batch()).unwrap().logits, "logits_base");
    assert!(d < TOL, "{d}");
    m.enable_adapters();
    let d = r.max_diff(m.model().forward(r.batch()).unwrap().logits, "logits_all");
    assert!(d < TOL, "{d}");
}

/// The phi3 fixture under LongRoPE (past and within its original context) and a partial
/// rotary factor, as make_model_fixtures.py's `PHI3_ROPE_VARIANTS` set them; the
/// transformers-4 spelling (`rope_scaling` `"type": "longrope"`, the original context at
/// the top level) for the first.
#[test]
fn phi3_longrope_and_partial_rotary() {
    let r = Reference::load("phi3");
    let tmp = TempDir::copy_of("phi3-rope", &fixture("phi3"));
    let cfg_path = tmp.path().join("config.json");
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let short: Vec<f64> = (0..8).map(|i| 1.0 + 0.125 * i as f64).collect();
    let long: Vec<f64> = (0..8).map(|i| 1.5 + 0.75 * i as f64).collect();
    let longrope = |original: usize| {
        serde_json::json!({"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": original})
    };
    let spelled_4 = {
        let mut c = base.clone();
        let obj = c.as_object_mut().unwrap();
        obj.remove("rope_parameters");
        obj.insert("rope_theta".into(), serde_json::json!(10000.0));
        obj.insert(
            "original_max_position_embeddings".into(),
            serde_json::json!(4),
        );
        obj.insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "longrope", "short_factor": short, "long_factor": long}),
        );
        c
    };
    let with = |rope: serde_json::Value| {
        let mut c = base.clone();
        c["rope_parameters"] = rope;
        c
    };
    for (what, cfg, want) in [
        (
            "longrope past the original context",
            with(longrope(4)),
            "logits_longrope_long",
        ),
        (
            "longrope within it",
            with(longrope(32)),
            "logits_longrope_short",
        ),
        (
            "longrope, transformers 4 keys",
            spelled_4,
            "logits_longrope_long",
        ),
        (
            "partial rotary 0.5",
            with(
                serde_json::json!({"rope_type": "default", "rope_theta": 10000.0,
                                    "partial_rotary_factor": 0.5}),
            ),
            "logits_partial",
        ),
    ] {
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let m = PretrainedModel::<B>::from_pretrained(tmp.path(), &Default::default()).unwrap();
        let d = r.max_diff(m.model.forward(r.batch()).unwrap().logits, want);
        assert!(d < TOL, "{what}: max |Δlogits| = {d}");
    }
    // factors that do not fit the rotated pairs are refused naming the key
    std::fs::write(
        &cfg_path,
        with(
            serde_json::json!({"rope_type": "longrope", "short_factor": [1.0],
            "long_factor": long, "original_max_position_embeddings": 4}),
        )
        .to_string(),
    )
    .unwrap();
    let e = PretrainedModel::<B>::from_pretrained(tmp.path(), &Default::default()).unwrap_err();
    assert!(e.to_string().contains("short_factor"), "{e}");
}

#[test]
fn rope_scaling_linear_and_transformers_4_config_keys() {
    let r = Reference::load("llama");
    let tmp = TempDir::copy_of("rope", &fixture("llama"));
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rope_parameters"] =
        serde_json::json!({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let m = PretrainedModel::<B>::from_pretrained(tmp.path(), &Default::default()).unwrap();
    let d = r.max_diff(
        m.model.forward(r.batch()).unwrap().logits,
        "logits_rope_linear",
    );
    assert!(d < TOL, "linear rope: {d}");

    // The same llama3 model, spelled as transformers 4 wrote it: rope_theta + rope_scaling.
    let obj = cfg.as_object_mut().unwrap();
    obj.remove("rope_parameters");
    obj.insert("rope_theta".into(), serde_json::json!(10000.0));
    obj.insert(
        "rope_scaling".into(),
        serde_json::json!({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    );
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let m = PretrainedModel::<B>::from_pretrained(tmp.path(), &Default::default()).unwrap();
    let d = r.max_diff(m.model.forward(r.batch()).unwrap().logits, "logits_base");
    assert!(d < TOL, "transformers-4 config: {d}");
}

#[test]
fn greedy_generation_matches_transformers() {
    for family in FAMILIES {
        let r = Reference::load(family);
        let m = base(family);
        let mut cfg = m.generation_config.clone();
        cfg.max_new_tokens = Some(20);
        cfg.do_sample = false;
        let got = m.model.generate(&r.prompts(), &cfg, None).unwrap();
        assert_eq!(got, r.rows("gen_base"), "{family}: greedy ids");

        let p =
            PeftModel::from_pretrained(base_long(family), fixture(&format!("{family}-lora-qv")))
                .unwrap();
        let got = p.model().generate(&r.prompts(), &cfg, None).unwrap();
        assert_eq!(got, r.rows("gen_qv"), "{family} + qv: greedy ids");
    }
}

#[test]
fn a_stop_token_ends_its_row_only() {
    let r = Reference::load("llama");
    let m = base("llama");
    let want = r.rows("gen_base");
    // Make row 0's 6th greedy token a stop token (it does not occur earlier in row 0,
    // nor in row 1: checked below). Row 0 stops there; row 1 runs to 20 tokens.
    let stop = want[0][5];
    assert!(!want[0][..5].contains(&stop) && !want[1].contains(&stop));
    let cfg = GenerationConfig {
        eos_token_id: Some(TokenIds::One(stop)),
        ..GenerationConfig::greedy(20)
    };
    let got = m.model.generate(&r.prompts(), &cfg, None).unwrap();
    assert_eq!(got[0], want[0][..6].to_vec());
    assert_eq!(got[1], want[1]);
}

#[test]
fn kv_cache_and_full_forward_agree_on_the_fixtures() {
    // Prefill 10 tokens, then 5 single steps, vs one forward over 15 (Mistral: the
    // window of 4 is crossed both ways).
    for family in FAMILIES {
        let r = Reference::load(family);
        let m = base(family);
        let row: Vec<u32> = r.prompts()[0].clone();
        let dev = Default::default();
        let full = m
            .model
            .forward(LmInput::from_tokens(std::slice::from_ref(&row), &dev).unwrap())
            .unwrap()
            .logits;
        let mut cache = m.model.new_cache();
        let mut parts = vec![
            m.model
                .forward_cached(
                    LmInput::from_tokens(&[row[..10].to_vec()], &dev).unwrap(),
                    &mut cache,
                )
                .unwrap()
                .logits,
        ];
        for t in &row[10..] {
            parts.push(
                m.model
                    .forward_cached(LmInput::from_tokens(&[vec![*t]], &dev).unwrap(), &mut cache)
                    .unwrap()
                    .logits,
            );
        }
        let inc = burn::tensor::Tensor::cat(parts, 1);
        let d = (full - inc).abs().max().into_scalar();
        assert!(d < 1e-4, "{family}: {d}");
    }
}

#[test]
fn score_matches_transformers() {
    let text = std::fs::read_to_string(fixture("score.txt")).unwrap();
    for family in FAMILIES {
        let r = Reference::load(family);
        let m = base_long(family);
        let ids = m.encode(&text).unwrap();
        assert_eq!(ids, r.rows("score_ids").concat(), "{family}: tokenizer ids");
        // One window over the whole text, as transformers scored it (within the context).
        let ctx = m.model.config().max_position_embeddings;
        assert!(ids.len() <= ctx, "{family}: {} tokens", ids.len());
        let s = m.model.score(&ids, ctx, None).unwrap();
        assert_eq!(s.tokens, ids.len() - 1);
        let want = r.f64_scalar("score_base");
        assert!(
            (s.mean_nll - want).abs() < 1e-4,
            "{family}: {} vs {want}",
            s.mean_nll
        );
        assert!((s.perplexity - want.exp()).abs() < 1e-3 * want.exp());

        let p =
            PeftModel::from_pretrained(base_long(family), fixture(&format!("{family}-lora-qv")))
                .unwrap();
        let s = p.model().score(&ids, ctx, None).unwrap();
        let want = r.f64_scalar("score_qv");
        assert!(
            (s.mean_nll - want).abs() < 1e-4,
            "{family} + qv: {} vs {want}",
            s.mean_nll
        );
    }
}

#[test]
fn windowed_scoring_predicts_every_token_once() {
    let m = base_long("llama");
    let text = std::fs::read_to_string(fixture("score.txt")).unwrap();
    let ids = m.encode(&text).unwrap();
    let s = m.model.score(&ids, 16, None).unwrap();
    assert_eq!(s.tokens, ids.len() - 1);
    // Shorter contexts predict worse than the full context on average? Not guaranteed for
    // a random model; only check the windows' NLL is a finite, different number.
    let ctx = m.model.config().max_position_embeddings;
    let full = m.model.score(&ids, ctx, None).unwrap();
    assert!(s.mean_nll.is_finite() && (s.mean_nll - full.mean_nll).abs() > 1e-6);
}

#[test]
fn chat_template_renders_like_transformers() {
    let chat: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference/chat.json")).unwrap())
            .unwrap();
    let messages: Vec<Message> = serde_json::from_value(chat["messages"].clone()).unwrap();
    for family in FAMILIES {
        let m = base(family);
        let got = m.apply_chat_template(&messages, true).unwrap();
        assert_eq!(got, chat["rendered"].as_str().unwrap(), "{family}");
    }
}

#[test]
fn mistral_sliding_window_is_honoured() {
    // The fixture's window (4) is shorter than its prompt (15): without the window the
    // logits move far from transformers', so the match above really tests the window.
    let r = Reference::load("mistral");
    let tmp = TempDir::copy_of("window", &fixture("mistral"));
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    assert_eq!(cfg["sliding_window"], 4);
    cfg["sliding_window"] = serde_json::Value::Null;
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let m = PretrainedModel::<B>::from_pretrained(tmp.path(), &Default::default()).unwrap();
    let d = r.max_diff(m.model.forward(r.batch()).unwrap().logits, "logits_base");
    assert!(
        d > 1e-2,
        "without the window the logits should differ, max |Δ| = {d}"
    );
}

/// The gemma3 fixture as a multimodal checkpoint: `gemma3-mm/config.json` (a
/// `Gemma3ForConditionalGeneration` config around it, written by transformers) and the
/// fixture's tensors renamed under `prefix` (the text model's; the vision tower's are not
/// needed).
fn gemma3_multimodal(prefix: &str) -> TempDir {
    let tmp = TempDir::copy_of("gemma3-mm", &fixture("gemma3"));
    std::fs::copy(
        fixture("gemma3-mm/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(fixture("gemma3/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let rest = name.strip_prefix("model.").expect("a text-model tensor");
            (format!("{prefix}{rest}"), view)
        })
        .collect();
    safetensors::serialize_to_file(renamed, None, &tmp.path().join("model.safetensors")).unwrap();
    tmp
}

#[test]
fn the_text_model_of_a_multimodal_gemma3_checkpoint() {
    // transformers (make_model_fixtures.py) gives the gemma3 reference logits for both layouts
    let r = Reference::load("gemma3");
    for prefix in ["language_model.model.", "model.language_model."] {
        let tmp = gemma3_multimodal(prefix);
        let m = PretrainedModel::<B>::from_pretrained(tmp.path(), &Default::default()).unwrap();
        assert_eq!(m.config.model_type, "gemma3_text", "{prefix}");
        let d = r.max_diff(m.model.forward(r.batch()).unwrap().logits, "logits_base");
        assert!(d < TOL, "{prefix}: max |Δlogits| = {d}");
        // what it exports is the text model, which loads as one
        let out = TempDir::new("gemma3-mm-export");
        m.save_pretrained(out.path()).unwrap();
        let again = PretrainedModel::<B>::from_pretrained(out.path(), &Default::default()).unwrap();
        let d = r.max_diff(
            again.model.forward(r.batch()).unwrap().logits,
            "logits_base",
        );
        assert!(d < TOL, "{prefix}: exported, max |Δlogits| = {d}");
    }
    // a text_config that is not an object is refused naming it
    let tmp = gemma3_multimodal("model.language_model.");
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"model_type": "gemma3", "text_config": [1]}"#,
    )
    .unwrap();
    let e = PretrainedModel::<B>::from_pretrained(tmp.path(), &Default::default()).unwrap_err();
    assert!(e.to_string().contains("text_config"), "{e}");
}
