//! Quantized bases against bitsandbytes / PEFT (fixtures of
//! tests/fixtures/make_qlora_fixtures.py): a QLoRA model (PEFT adapter over a bnb NF4
//! double-quantized base) gives the logits of legora's NF4 model within 1e-4; the 4-bit
//! checkpoint transformers saved loads as it is (codes, absmax and quant state read, not
//! re-quantized) and gives the same logits; bad bitsandbytes checkpoints and options are
//! typed errors naming the tensor or the key.

use super::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use common::{TempDir, B};
use legora_hub::{
    BitsAndBytesConfig, FloatDtype, HubError, LoadOptions, PeftModel, PretrainedModel, Quantize,
};
use legora_kernels::quant::Format;
use legora_models::LmInput;
use safetensors::SafeTensors;

const TOL: f32 = 1e-4;
const NF4_DQ: Format = Format::Nf4 { double_quant: true };

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/qlora")
        .join(name)
}

/// The expected tensors: `(shape, f32 values)` by name, and the input ids.
struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    fn load() -> Self {
        let p = dir("expected.safetensors");
        Self {
            bytes: std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        }
    }

    fn floats(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let v = st.tensor(name).unwrap();
        v.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn input(&self) -> LmInput<B> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let v = st.tensor("input_ids").unwrap();
        let ids: Vec<i64> = v
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let shape = [v.shape()[0], v.shape()[1]];
        let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, shape), &Default::default());
        LmInput::new(t)
    }
}

fn max_diff(logits: Tensor<B, 3>, want: &[f32]) -> f32 {
    let got = logits.into_data().to_vec::<f32>().unwrap();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .fold(0.0, |m, (a, b)| m.max((a - b).abs()))
}

/// NF4 with double quantization as `BitsAndBytesConfig` names it, `lm_head` f32 (the
/// fixture's bitsandbytes model keeps it in its f32 dtype).
fn nf4_options() -> LoadOptions {
    let bnb: BitsAndBytesConfig = serde_json::from_str(
        r#"{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": true, "bnb_4bit_compute_dtype": "float32"}"#,
    )
    .unwrap();
    let mut o = LoadOptions::new(FloatDtype::F32, bnb.quantize().unwrap());
    o.lm_head = Some(Format::F32);
    o
}

#[test]
fn qlora_over_nf4_matches_peft_over_bitsandbytes() {
    let e = Expected::load();
    let base = PretrainedModel::<B>::from_pretrained_with(
        dir("base"),
        &Default::default(),
        &nf4_options(),
    )
    .unwrap();
    for (id, slot) in base.model.slots() {
        let want = if id.to_string() == "lm_head" {
            Format::F32
        } else {
            NF4_DQ
        };
        assert_eq!(slot.format(), want, "{id}");
    }
    let peft = PeftModel::from_pretrained(base, dir("adapter")).unwrap();
    let logits = peft.model().forward(e.input()).unwrap().logits;
    let d = max_diff(logits, &e.floats("qlora_logits"));
    eprintln!("QLoRA NF4: max |Δlogits| = {d:.2e}");
    assert!(d < TOL, "max |Δlogits| = {d}");
}

#[test]
fn prequantized_bnb_checkpoint_loads_as_is() {
    let e = Expected::load();
    let m =
        PretrainedModel::<B>::from_pretrained(dir("prequantized"), &Default::default()).unwrap();
    for (id, slot) in m.model.slots() {
        let want = if id.to_string() == "lm_head" {
            Format::F32
        } else {
            NF4_DQ
        };
        assert_eq!(slot.format(), want, "{id}");
    }
    let d = max_diff(
        m.model.forward(e.input()).unwrap().logits,
        &e.floats("prequantized_logits"),
    );
    eprintln!("pre-quantized NF4: max |Δlogits| = {d:.2e}");
    assert!(d < TOL, "max |Δlogits| = {d}");
    // The QLoRA adapter over it gives the QLoRA logits too.
    let peft = PeftModel::from_pretrained(m, dir("adapter")).unwrap();
    let d = max_diff(
        peft.model().forward(e.input()).unwrap().logits,
        &e.floats("qlora_logits"),
    );
    assert!(d < TOL, "adapter over the pre-quantized base: {d}");
}

/// The pre-quantized checkpoint copied with its tensors edited by `edit`.
fn edited(
    tag: &str,
    edit: impl Fn(&mut HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> TempDir {
    let tmp = TempDir::copy_of(tag, &dir("prequantized"));
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<_, _> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (d, s, b))| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    tmp
}

fn load_error(tmp: &TempDir) -> HubError {
    match PretrainedModel::<B>::from_pretrained(tmp.path(), &Default::default()) {
        Ok(_) => panic!("a broken checkpoint loaded"),
        Err(e) => e,
    }
}

const MODULE: &str = "model.layers.1.mlp.down_proj";

#[test]
fn bnb_checkpoint_without_its_quant_state_is_an_error_naming_the_tensor() {
    let tmp = edited("no-quant-state", |t| {
        t.retain(|k, _| !(k.starts_with(MODULE) && k.contains("quant_state")));
    });
    let e = load_error(&tmp);
    let text = e.to_string();
    assert!(matches!(e, HubError::Quantization { .. }), "{text}");
    assert!(text.contains(&format!("{MODULE}.weight")), "{text}");
    assert!(text.contains("quant_state"), "{text}");
}

#[test]
fn bnb_absmax_of_the_wrong_length_is_an_error_naming_the_tensor() {
    let tmp = edited("short-absmax", |t| {
        let (_, shape, bytes) = t.get_mut(&format!("{MODULE}.weight.absmax")).unwrap();
        bytes.pop();
        shape[0] -= 1;
    });
    let e = load_error(&tmp);
    let text = e.to_string();
    assert!(matches!(e, HubError::Quantization { .. }), "{text}");
    assert!(text.contains(&format!("{MODULE}.weight.absmax")), "{text}");
}

#[test]
fn bits_and_bytes_options_are_checked() {
    let parse = |json: &str| serde_json::from_str::<BitsAndBytesConfig>(json);
    assert!(parse(r#"{"load_in_4bit": true, "llm_int8_threshold2": 1}"#).is_err());
    // transformers' defaults: fp4, no double quantization.
    let q = parse(r#"{"load_in_4bit": true}"#)
        .unwrap()
        .quantize()
        .unwrap();
    assert_eq!(
        q,
        Some(Quantize::Fp4 {
            double_quant: false
        })
    );
    assert_eq!(
        parse(r#"{"load_in_8bit": true}"#)
            .unwrap()
            .quantize()
            .unwrap(),
        Some(Quantize::Int8)
    );
    for (json, key) in [
        (
            r#"{"load_in_4bit": true, "load_in_8bit": true}"#,
            "load_in_8bit",
        ),
        (
            r#"{"load_in_4bit": true, "bnb_4bit_quant_type": "int4"}"#,
            "bnb_4bit_quant_type",
        ),
        (
            r#"{"load_in_4bit": true, "bnb_4bit_compute_dtype": "bfloat16"}"#,
            "bnb_4bit_compute_dtype",
        ),
    ] {
        match parse(json).unwrap().quantize() {
            Err(HubError::Options { key: k, .. }) => assert_eq!(k, key, "{json}"),
            other => panic!("{json}: {other:?}"),
        }
    }
    assert!(Quantize::parse("q4").is_err());
    // lm_head and the embeddings: bf16 beside quantized projections, the dtype otherwise.
    let o = LoadOptions::new(FloatDtype::F32, Some(Quantize::Int8));
    assert_eq!(o.format_of("lm_head.weight"), Format::Bf16);
    assert_eq!(o.format_of("model.embed_tokens.weight"), Format::Bf16);
    assert_eq!(
        o.format_of("model.layers.0.self_attn.q_proj.weight"),
        Format::Int8
    );
    let o = LoadOptions::new(FloatDtype::BF16, None);
    assert_eq!(o.format_of("lm_head.weight"), Format::Bf16);
    assert_eq!(o.format_of("model.embed_tokens.weight"), Format::Bf16);
}

#[test]
fn a_bf16_load_keeps_bf16_storage_and_the_f32_logits_within_bf16_rounding() {
    let e = Expected::load();
    let opts = LoadOptions::new(FloatDtype::BF16, None);
    let m = PretrainedModel::<B>::from_pretrained_with(dir("base"), &Default::default(), &opts)
        .unwrap();
    assert!(m
        .model
        .slots()
        .iter()
        .all(|(_, s)| s.format() == Format::Bf16));
    let f = PretrainedModel::<B>::from_pretrained(dir("base"), &Default::default()).unwrap();
    let want = f
        .model
        .forward(e.input())
        .unwrap()
        .logits
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    // bf16 keeps 8 mantissa bits: weights within 2^-8 relative; the logits of this tiny
    // model (|logits| < 1) move by far less than 0.05.
    let d = max_diff(m.model.forward(e.input()).unwrap().logits, &want);
    assert!(d > 0.0 && d < 0.05, "bf16 vs f32: {d}");
}
