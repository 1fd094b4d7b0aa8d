//! GGUF bases against transformers: every number here comes from
//! tests/fixtures/make_gguf_fixtures.py, which loaded the same files with
//! `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(dir, gguf_file=...)` and decoded
//! the blocks with `gguf.quants.dequantize`.

use super::common;
use super::common::gguf_writer;

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use common::{TempDir, B};
use legora_hub::gguf::{GgufFile, MetadataValue};
use legora_hub::{Message, PretrainedModel, Role};
use legora_kernels::quant::ggml::{dequantize_row, GgmlType};
use legora_models::{GenerationConfig, LmInput};
use safetensors::SafeTensors;
use serde_json::Value;

/// The models the script wrote (`<family>-<type>.gguf`).
const MODELS: [&str; 14] = [
    "llama-f16",
    "llama-q8_0",
    "llama-q4_0",
    "llama-q4_k",
    "llama-q6_k",
    "qwen2-f16",
    "qwen2-q8_0",
    "qwen2-q4_0",
    "qwen3-f16",
    "qwen3-q8_0",
    "phi3-f16",
    "phi3-q8_0",
    "gemma3-f16",
    "gemma3-q8_0",
];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf")
}

fn path(stem: &str) -> PathBuf {
    dir().join(format!("{stem}.gguf"))
}

struct Reference {
    bytes: Vec<u8>,
    info: Value,
}

impl Reference {
    fn load() -> Self {
        Self {
            bytes: std::fs::read(dir().join("reference.safetensors")).unwrap(),
            info: serde_json::from_str(
                &std::fs::read_to_string(dir().join("reference.json")).unwrap(),
            )
            .unwrap(),
        }
    }

    fn ints(&self, name: &str) -> Vec<u32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let v = st.tensor(name).unwrap_or_else(|_| panic!("no `{name}`"));
        assert_eq!(v.dtype(), safetensors::Dtype::I64, "{name}");
        v.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect()
    }

    fn floats(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let v = st.tensor(name).unwrap_or_else(|_| panic!("no `{name}`"));
        assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name}");
        let data = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (v.shape().to_vec(), data)
    }

    fn str(&self, stem: &str, key: &str) -> String {
        self.info[stem][key].as_str().unwrap().to_string()
    }
}

/// The file as a base whose decoding keeps f32 activations (transformers' arithmetic over
/// the dequantized file, which the references are); [`load_default`] leaves llama.cpp's
/// 8-bit activations on for Q8_0 / Q4_0.
fn load(stem: &str) -> PretrainedModel<B> {
    let options = legora_hub::LoadOptions {
        gguf_exact_decode: true,
        ..Default::default()
    };
    PretrainedModel::from_pretrained_with(path(stem), &Default::default(), &options)
        .unwrap_or_else(|e| panic!("{stem}: {e}"))
}

/// The file as a base with the default options.
fn load_default(stem: &str) -> PretrainedModel<B> {
    PretrainedModel::from_pretrained(path(stem), &Default::default())
        .unwrap_or_else(|e| panic!("{stem}: {e}"))
}

fn logits(model: &PretrainedModel<B>, ids: &[u32]) -> Vec<f32> {
    let t: Tensor<B, 2, Int> = Tensor::from_data(
        TensorData::new(
            ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            [1, ids.len()],
        ),
        &Default::default(),
    );
    let out = model.model.forward(LmInput::new(t)).unwrap().logits;
    out.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

#[test]
fn blocks_decode_bit_exactly_as_the_gguf_package() {
    let f = GgufFile::open(dir().join("blocks.gguf")).unwrap();
    let mut checked = 0;
    for info in f
        .tensor_infos()
        .iter()
        .filter(|t| !t.name.ends_with(".want"))
    {
        let ty = info.ggml_type;
        assert_eq!(ty.name(), info.name, "one tensor per type, named after it");
        let got = f.dequantize(&info.name).unwrap().unwrap();
        let want = f
            .dequantize(&format!("{}.want", info.name))
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), want.len(), "{ty}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{ty} element {i}: {g} vs {w}");
        }
        // Row by row from the block bytes gives the same values.
        let t = f.tensor(&info.name).unwrap();
        let ne0 = info.ne0() as usize;
        let row_bytes = ty.row_bytes(info.ne0()).unwrap();
        for (r, bytes) in t.data.chunks_exact(row_bytes).enumerate() {
            let mut row = vec![0f32; ne0];
            dequantize_row(ty, bytes, &mut row).unwrap();
            assert_eq!(row, want[r * ne0..(r + 1) * ne0], "{ty} row {r}");
        }
        checked += 1;
    }
    let must = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];
    for ty in must {
        assert!(f.tensor_info(ty.name()).is_some(), "fixture covers {ty}");
    }
    assert_eq!(checked, 18);
}

#[test]
fn logits_match_transformers() {
    let r = Reference::load();
    for stem in MODELS {
        let m = load(stem);
        for i in 0..2 {
            let ids = r.ints(&format!("{stem}.prompt{i}"));
            let (shape, want) = r.floats(&format!("{stem}.logits{i}"));
            assert_eq!(shape, [ids.len(), m.config.vocab_size], "{stem}");
            let got = logits(&m, &ids);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{stem} prompt {i}: max |Δlogit| = {worst:e}");
        }
    }
}

/// The projections, `lm_head` and the embeddings keep the file's GGML blocks, and
/// decoding every weight instead gives the same logits; the blocks hold the file's bytes,
/// far below f32.
#[test]
fn gguf_blocks_stay_blocks() {
    use legora_hub::LoadOptions;
    use legora_kernels::quant::ggml::GgmlType;
    use legora_kernels::quant::Format;
    use legora_models::{Proj, SlotId};
    let r = Reference::load();
    for (stem, ty) in [
        ("llama-q8_0", GgmlType::Q8_0),
        ("llama-q4_0", GgmlType::Q4_0),
        ("qwen2-q8_0", GgmlType::Q8_0),
        ("phi3-q8_0", GgmlType::Q8_0),
        ("gemma3-q8_0", GgmlType::Q8_0),
    ] {
        let blocks = load(stem);
        let q = blocks.model.config().projections()[0];
        let slot = blocks.model.slot(SlotId::layer(0, q)).unwrap();
        assert_eq!(slot.format(), Format::Ggml(ty), "{stem}");
        let (o, i) = slot.dims();
        assert!(
            slot.frozen_weight().bytes() < o * i * 2,
            "{stem}: {} bytes",
            o * i
        );
        // the embeddings too: a lookup dequantizes only its rows
        let embed = blocks.model.model.embed_tokens.format();
        assert!(matches!(embed, Format::Ggml(_)), "{stem}: {embed:?}");
        let options = LoadOptions {
            gguf_blocks: false,
            ..LoadOptions::default()
        };
        let decoded =
            PretrainedModel::<B>::from_pretrained_with(path(stem), &Default::default(), &options)
                .unwrap();
        let down = decoded
            .model
            .slot(SlotId::layer(0, Proj::DownProj))
            .unwrap();
        assert_eq!(down.format(), Format::F32, "{stem}");
        // parameters counted as transformers counts them, whatever the storage
        assert_eq!(
            blocks.model.parameter_report().total,
            decoded.model.parameter_report().total,
            "{stem}"
        );
        let ids = r.ints(&format!("{stem}.prompt0"));
        let (a, b) = (logits(&blocks, &ids), logits(&decoded, &ids));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-5,
            "{stem}: blocks vs decoded, max |Δ| = {worst:e}"
        );
    }
}

/// A PEFT LoRA (q_proj, v_proj and the Q4_K ffn_down) over the Q4_K file, its blocks kept
/// in memory, scores the prompts as PEFT does over transformers' dequantization of the same
/// file (make_gguf_fixtures.py --only lora); saved again, it reloads to the same losses.
#[test]
fn peft_lora_over_q4_k_blocks_matches_peft() {
    use legora_hub::PeftModel;
    let r = Reference::load();
    let adapter = dir().join("llama-q4_k-lora");
    let m = PeftModel::from_pretrained(load("llama-q4_k"), &adapter).unwrap();
    let down = m
        .base
        .model
        .slot(legora_models::SlotId::layer(
            0,
            legora_models::Proj::DownProj,
        ))
        .unwrap();
    assert_eq!(down.format().name(), "Q4_K");
    let losses = |m: &PeftModel<B>| -> Vec<f64> {
        (0..2)
            .map(|i| {
                let ids = r.ints(&format!("llama-q4_k.prompt{i}"));
                m.base.model.score(&ids, 64, None).unwrap().mean_nll
            })
            .collect()
    };
    let got = losses(&m);
    for (i, g) in got.iter().enumerate() {
        let want = f64::from(r.floats(&format!("llama-q4_k-lora.loss{i}")).1[0]);
        assert!(
            (g - want).abs() < 1e-4,
            "prompt {i}: legora {g} vs PEFT {want}"
        );
    }
    let tmp = TempDir::new("q4_k-lora");
    m.save_pretrained(tmp.path()).unwrap();
    let again = PeftModel::from_pretrained(load("llama-q4_k"), tmp.path()).unwrap();
    assert_eq!(losses(&again), got);
}

/// An aligned file's GGML blocks are read in place from the mapping (llama's permuted
/// q/k rows excepted: they are reordered into memory); a file whose tensor data is not
/// aligned to 4 bytes (`general.alignment` 2) has its blocks copied instead, with the
/// same logits.
#[test]
fn aligned_blocks_are_mapped_unaligned_ones_copied() {
    use common::gguf_writer::{parts, write_gguf};
    use legora_models::{Proj, SlotId};
    let r = Reference::load();
    let ids = r.ints("llama-q8_0.prompt0");
    let mapped = |m: &PretrainedModel<B>, p: Proj| {
        let slot = m.model.slot(SlotId::layer(0, p)).unwrap();
        slot.frozen_weight().is_mapped()
    };
    let aligned = load("llama-q8_0");
    assert!(mapped(&aligned, Proj::DownProj) && mapped(&aligned, Proj::VProj));
    assert!(
        !mapped(&aligned, Proj::QProj),
        "permuted rows are reordered in memory"
    );
    assert!(load("qwen2-q8_0").model.model.embed_tokens.is_mapped());

    let (mut meta, tensors) = parts("llama-q8_0");
    meta.push(("general.alignment".into(), MetadataValue::U32(2)));
    let tmp = TempDir::new("gguf-align-2");
    let file = tmp.path().join("a2.gguf");
    // a padding key whose length puts the data section at 2 mod 4
    let unaligned = (0..4).find(|&pad| {
        let mut m = meta.clone();
        m.push(("legora.pad".into(), MetadataValue::String("x".repeat(pad))));
        std::fs::write(&file, write_gguf(&m, &tensors)).unwrap();
        let f = GgufFile::open(&file).unwrap();
        f.shared_words("blk.0.ffn_down.weight").is_none()
    });
    assert!(unaligned.is_some(), "no padding misaligns the data");
    let copied = PretrainedModel::<B>::from_pretrained(&file, &Default::default()).unwrap();
    assert!(!mapped(&copied, Proj::DownProj));
    assert_eq!(logits(&copied, &ids), logits(&aligned, &ids));
}

/// By default decoding over Q8_0 / Q4_0 quantizes the activations as llama.cpp does: a
/// prompt of at most 4 tokens (read by the decoding products) gives logits within 2% of
/// the largest logit of exact decoding, not equal to them. (Without the fused CPU kernels
/// — legora-kernels built without `flex` — every product is the exact reference path.)
#[test]
fn default_decoding_uses_8_bit_activations_on_q8_0_and_q4_0() {
    let ids = [1u32, 40, 41];
    let fused = legora_kernels::has_fused_kernels::<B>();
    for stem in ["qwen2-q4_0", "llama-q8_0"] {
        let (exact, fast) = (logits(&load(stem), &ids), logits(&load_default(stem), &ids));
        let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = exact
            .iter()
            .zip(&fast)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        if fused {
            assert!(
                worst > 0.0 && worst < 0.02 * scale,
                "{stem}: {worst} of {scale}"
            );
        } else {
            assert_eq!(worst, 0.0, "{stem}: the reference path is exact");
        }
    }
}

#[test]
fn greedy_tokens_match_transformers() {
    let r = Reference::load();
    for stem in MODELS {
        let m = load(stem);
        let prompt = r.ints(&format!("{stem}.prompt0"));
        // No eos in the config: transformers was also run without stopping.
        let out = m
            .model
            .generate(&[prompt], &GenerationConfig::greedy(20), None)
            .unwrap();
        assert_eq!(out[0], r.ints(&format!("{stem}.greedy")), "{stem}");
    }
}

#[test]
fn tokenizers_match_transformers() {
    let r = Reference::load();
    let text = r.info["text"].as_str().unwrap();
    let prompts: Vec<&str> = r.info["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let messages: Vec<Message> = serde_json::from_value(r.info["messages"].clone()).unwrap();
    for stem in [
        "llama-f16",
        "qwen2-f16",
        "qwen3-f16",
        "phi3-f16",
        "gemma3-f16",
        "tok-llama-bpe",
        "tok-gpt-2",
    ] {
        let f = GgufFile::open(path(stem)).unwrap();
        let tok = legora_hub::gguf::gguf_tokenizer(&f).unwrap();
        let ids = legora_hub::encode(&tok, text, true).unwrap();
        assert_eq!(
            ids,
            r.ints(&format!("{stem}.text_ids")),
            "{stem}: ids of the text"
        );
        if stem.starts_with("phi3") || stem.starts_with("gemma3") {
            // leading spaces: Phi-3's prefix from a normalizer, Gemma's tokens of spaces
            let lead = legora_hub::encode(&tok, &format!("  {text}"), true).unwrap();
            assert_eq!(
                lead,
                r.ints(&format!("{stem}.lead_ids")),
                "{stem}: leading spaces"
            );
        }
        assert_eq!(
            legora_hub::decode(&tok, &ids).unwrap(),
            r.str(stem, "text_decoded"),
            "{stem}: decode"
        );
        if !stem.starts_with("tok-") {
            for (i, p) in prompts.iter().enumerate() {
                let ids = legora_hub::encode(&tok, p, true).unwrap();
                assert_eq!(
                    ids,
                    r.ints(&format!("{stem}.prompt{i}")),
                    "{stem}: prompt {i}"
                );
            }
        }
        let template = legora_hub::gguf::gguf_chat_template(&f).unwrap().unwrap();
        assert_eq!(
            template.render(&messages, true).unwrap(),
            r.str(stem, "chat"),
            "{stem}: chat template"
        );
    }
    // The three byte-level splits differ on "1234567" (the fixture's text is chosen so).
    let ids = |s: &str| r.ints(&format!("{s}.text_ids"));
    assert_ne!(ids("qwen2-f16"), ids("tok-llama-bpe"));
    assert_ne!(ids("tok-gpt-2"), ids("tok-llama-bpe"));
}

#[test]
fn config_and_layout_from_metadata() {
    let m = load("llama-q4_k");
    let c = m.model.config();
    // hidden 32, 4 heads, but head_dim 16 (from llama.attention.key_length)
    assert_eq!(
        (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim
        ),
        (32, 4, 2, 16)
    );
    assert!(!c.tie_word_embeddings, "llama-*.gguf have output.weight");
    assert_eq!(m.name_or_path, path("llama-q4_k"));
    assert_eq!(m.generation_config.stop_tokens(), vec![2]);
    let q = load("qwen2-q8_0");
    let c = q.model.config();
    assert!(c.tie_word_embeddings && c.qkv_bias && !c.o_bias);
    assert_eq!(
        (c.head_dim, c.intermediate_size, c.rope.theta),
        (8, 88, 1e6)
    );

    let f = GgufFile::open(path("llama-q4_k")).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.get("llama.block_count"), Some(&MetadataValue::U32(2)));
    // Only ffn_down (rows of 256) holds whole Q4_K blocks; the rest fell back to Q5_0.
    let t = f.tensor("blk.0.ffn_down.weight").unwrap();
    assert_eq!(
        (t.ggml_type(), t.dims()),
        (GgmlType::Q4_K, &[256u64, 32][..])
    );
    assert_eq!(t.data.len(), 32 * 144);
    assert_eq!(
        f.tensor_info("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::Q5_0
    );
}

#[test]
fn export_of_a_gguf_base_reloads_with_the_same_logits() {
    let r = Reference::load();
    let m = load("qwen2-q4_0");
    let tmp = TempDir::new("gguf-export");
    m.save_pretrained(tmp.path()).unwrap();
    let again = PretrainedModel::<B>::from_pretrained(tmp.path(), &Default::default()).unwrap();
    let ids = r.ints("qwen2-q4_0.prompt0");
    assert_eq!(logits(&again, &ids), logits(&m, &ids));
    let text = r.info["text"].as_str().unwrap();
    assert_eq!(again.encode(text).unwrap(), m.encode(text).unwrap());
    let msgs = [Message::new(Role::User, "hi")];
    assert_eq!(
        again.apply_chat_template(&msgs, true).unwrap(),
        m.apply_chat_template(&msgs, true).unwrap()
    );
}

/// llama.cpp's converter writes Llama 3.1's `llama3` RoPE scaling as `rope_freqs.weight`
/// (one divisor per frequency; transformers' GGUF loader ignores the tensor). Reference:
/// the same weights as an HF folder with `rope_scaling` `llama3`, through legora's own
/// llama3 rule (itself tested against transformers in transformers_parity.rs).
#[test]
fn rope_freqs_apply_llama3_scaling() {
    let r = Reference::load();
    let ids = r.ints("llama-f16.prompt1");
    let tmp = TempDir::new("gguf-rope-freqs");
    // HF folder with llama3 scaling (factor 8, low 1, high 4, original 16: with head_dim 16
    // and θ 10000 the wavelengths 6.3, 19.9, 62.8, ... fall in all three bands).
    let base = load("llama-f16");
    base.save_pretrained(tmp.path().join("hf")).unwrap();
    let cfg_path = tmp.path().join("hf/config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let hf =
        PretrainedModel::<B>::from_pretrained(tmp.path().join("hf"), &Default::default()).unwrap();

    // convert_hf_to_gguf.py (LlamaModel, rope_type llama3): per freq = θ^(-2i/d),
    // wavelen = 2π / freq: < 16/4 → 1, > 16/1 → 8, else 1 / ((1 − s)/8 + s) with
    // s = (16 / wavelen − 1) / (4 − 1).
    let factors: Vec<f32> = (0..8)
        .map(|i| {
            let freq = 1.0 / 10000f64.powf(2.0 * i as f64 / 16.0);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < 4.0 {
                1.0
            } else if wavelen > 16.0 {
                8.0
            } else {
                let s = (16.0 / wavelen - 1.0) / 3.0;
                (1.0 / ((1.0 - s) / 8.0 + s)) as f32
            }
        })
        .collect();
    assert!(
        factors[0] > 1.0 && factors[0] < 8.0 && factors[7] == 8.0,
        "{factors:?}"
    );
    let (meta, mut tensors) = gguf_writer::parts("llama-f16");
    tensors.push(gguf_writer::T {
        name: "rope_freqs.weight".into(),
        dims: vec![8],
        ty: GgmlType::F32.id(),
        data: factors.iter().flat_map(|f| f.to_le_bytes()).collect(),
        offset: None,
    });
    let p = tmp.path().join("scaled.gguf");
    std::fs::write(&p, gguf_writer::write_gguf(&meta, &tensors)).unwrap();
    let scaled = PretrainedModel::<B>::from_pretrained(&p, &Default::default()).unwrap();

    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let (want, got, plain) = (
        logits(&hf, &ids),
        logits(&scaled, &ids),
        logits(&base, &ids),
    );
    assert!(diff(&got, &want) < 1e-4, "{:e}", diff(&got, &want));
    assert!(diff(&plain, &want) > 1e-2, "the scaling changes the logits");
}
