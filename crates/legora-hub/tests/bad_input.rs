//! Bad input: every case is a typed error naming the file (and tensor / field), never a
//! panic.

use super::common;

use burn::tensor::TensorData;
use common::{fixture, TempDir, B};
use legora_hub::io::write_safetensors;
use legora_hub::{
    load_adapter, load_tokenizer, FloatDtype, HubError, PeftModel, PretrainedModel, ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
};
use legora_models::ModelError;

fn load(dir: &std::path::Path) -> Result<PretrainedModel<B>, HubError> {
    PretrainedModel::from_pretrained(dir, &Default::default())
}

fn edit_config(dir: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

#[test]
fn missing_config_json() {
    let tmp = TempDir::copy_of("noconfig", &fixture("mistral"));
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    let e = load(tmp.path()).unwrap_err();
    assert!(
        matches!(&e, HubError::MissingFile { path, .. } if path.ends_with("config.json")),
        "{e}"
    );
    assert!(e.to_string().contains("config.json"));
}

#[test]
fn corrupt_config_json() {
    let tmp = TempDir::copy_of("badjson", &fixture("mistral"));
    std::fs::write(
        tmp.path().join("config.json"),
        "{\"model_type\": \"mistral\", ",
    )
    .unwrap();
    let e = load(tmp.path()).unwrap_err();
    assert!(
        matches!(&e, HubError::Json { path, .. } if path.ends_with("config.json")),
        "{e}"
    );

    // Valid JSON, wrong content: the message names the field.
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"model_type": "mistral", "vocab_size": "many"}"#,
    )
    .unwrap();
    let e = load(tmp.path()).unwrap_err();
    assert!(
        matches!(
            &e,
            HubError::Model {
                source: ModelError::InvalidConfig { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("vocab_size") || e.to_string().contains("invalid type"),
        "{e}"
    );

    // A value out of its domain.
    let tmp = TempDir::copy_of("badheads", &fixture("mistral"));
    edit_config(tmp.path(), |v| v["num_key_value_heads"] = 3.into());
    let e = load(tmp.path()).unwrap_err();
    assert!(e.to_string().contains("num_key_value_heads"), "{e}");
}

#[test]
fn unknown_model_type() {
    let tmp = TempDir::copy_of("gpt2", &fixture("mistral"));
    edit_config(tmp.path(), |v| v["model_type"] = "gpt2".into());
    let e = load(tmp.path()).unwrap_err();
    assert!(
        matches!(&e, HubError::Model { source: ModelError::UnknownModelType { found, .. }, .. } if found == "gpt2"),
        "{e}"
    );
    assert!(
        e.to_string().contains("llama") && e.to_string().contains("qwen2"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors() {
    let tmp = TempDir::copy_of("trunc", &fixture("mistral"));
    let p = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(tmp.path()).unwrap_err();
    assert!(
        matches!(&e, HubError::Safetensors { path, .. } if path.ends_with("model.safetensors")),
        "{e}"
    );
    // Even the header cut short.
    std::fs::write(&p, &bytes[..5]).unwrap();
    assert!(matches!(
        load(tmp.path()),
        Err(HubError::Safetensors { .. })
    ));
    // A missing shard of a sharded checkpoint.
    let tmp = TempDir::copy_of("shard", &fixture("llama"));
    std::fs::remove_file(tmp.path().join("model-00002-of-00003.safetensors")).unwrap();
    let e = load(tmp.path()).unwrap_err();
    assert!(
        matches!(&e, HubError::MissingFile { path, .. } if path.ends_with("model-00002-of-00003.safetensors")),
        "{e}"
    );
}

#[test]
fn tensor_with_the_wrong_shape_names_tensor_expected_and_found() {
    let tmp = TempDir::copy_of("shape", &fixture("mistral"));
    let p = tmp.path().join("model.safetensors");
    let f = legora_hub::SafetensorsFile::open(&p).unwrap();
    let mut tensors: Vec<(String, TensorData)> = Vec::new();
    for n in f.names() {
        let mut d = f.tensor(&n).unwrap().unwrap();
        if n == "model.layers.1.self_attn.k_proj.weight" {
            d = TensorData::new(vec![0f32; 16 * 64], [16, 64]); // expected [32, 64]
        }
        tensors.push((n, d));
    }
    drop(f);
    write_safetensors(&p, &tensors, FloatDtype::F32).unwrap();
    let e = load(tmp.path()).unwrap_err();
    match &e {
        HubError::Model {
            source:
                ModelError::ShapeMismatch {
                    tensor,
                    expected,
                    found,
                },
            ..
        } => {
            assert_eq!(tensor, "model.layers.1.self_attn.k_proj.weight");
            assert_eq!(
                (expected.as_slice(), found.as_slice()),
                (&[32, 64][..], &[16, 64][..])
            );
        }
        other => panic!("expected a shape error, got {other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("k_proj") && msg.contains("[32, 64]") && msg.contains("[16, 64]"),
        "{msg}"
    );

    // A tensor missing altogether (the others as in the fixture).
    let orig =
        legora_hub::SafetensorsFile::open(&fixture("mistral").join("model.safetensors")).unwrap();
    let tensors: Vec<_> = orig
        .names()
        .into_iter()
        .filter(|n| n != "model.norm.weight")
        .map(|n| (n.clone(), orig.tensor(&n).unwrap().unwrap()))
        .collect();
    write_safetensors(&p, &tensors, FloatDtype::F32).unwrap();
    let e = load(tmp.path()).unwrap_err();
    assert!(
        matches!(&e, HubError::Model { source: ModelError::MissingTensor { tensor }, .. } if tensor == "model.norm.weight"),
        "{e}"
    );
}

#[test]
fn missing_or_corrupt_tokenizer() {
    let tmp = TempDir::copy_of("notok", &fixture("mistral"));
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    // The model loads; asking for the tokenizer is the error.
    let m = load(tmp.path()).unwrap();
    let e = m.encode("hello").unwrap_err();
    assert!(
        matches!(&e, HubError::MissingFile { path, .. } if path.ends_with("tokenizer.json")),
        "{e}"
    );
    let e = load_tokenizer(tmp.path()).unwrap_err();
    assert!(matches!(&e, HubError::MissingFile { .. }), "{e}");

    std::fs::write(tmp.path().join("tokenizer.json"), "{\"model\": 12}").unwrap();
    let e = load(tmp.path()).unwrap_err();
    assert!(
        matches!(&e, HubError::Tokenizer { path, .. } if path.ends_with("tokenizer.json")),
        "{e}"
    );
}

/// Found by fuzzing: tokenizers 0.22 parses a post-processor template that names a
/// special token it does not define, then panics at the first encode. The load refuses it.
#[test]
fn tokenizer_whose_template_names_an_undefined_special_token() {
    let tmp = TempDir::copy_of("badtemplate", &fixture("mistral"));
    let p = tmp.path().join("tokenizer.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let specials = &mut v["post_processor"]["special_tokens"];
    let s = specials.as_object_mut().unwrap().remove("<s>").unwrap();
    specials["<t>"] = s;
    std::fs::write(&p, v.to_string()).unwrap();
    let e = load_tokenizer(tmp.path()).unwrap_err();
    assert!(
        matches!(&e, HubError::Tokenizer { path, message }
            if path.ends_with("tokenizer.json") && message.contains("encoding failed")),
        "{e}"
    );
}

#[test]
fn adapter_whose_target_modules_match_nothing() {
    let tmp = TempDir::new("notarget");
    for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
        std::fs::copy(fixture("llama-lora-qv").join(f), tmp.path().join(f)).unwrap();
    }
    let p = tmp.path().join(ADAPTER_CONFIG);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["target_modules"] = serde_json::json!(["c_attn", "c_proj"]); // GPT-2 names
    std::fs::write(&p, v.to_string()).unwrap();
    let base = load(&fixture("llama")).unwrap();
    let e = PeftModel::from_pretrained(base, tmp.path()).unwrap_err();
    assert!(
        matches!(&e, HubError::Model { source: ModelError::NoTargetMatched { target_modules, .. }, .. } if target_modules.contains("c_attn")),
        "{e}"
    );

    // Also from Rust: get_peft_model with names the model does not have.
    let base = load(&fixture("llama")).unwrap();
    let e = legora_hub::get_peft_model(
        base,
        &legora_nn::LoraConfig::new(4, 8.0, &["query_key_value"]),
    )
    .unwrap_err();
    assert!(
        matches!(
            &e,
            HubError::Model {
                source: ModelError::NoTargetMatched { .. },
                ..
            }
        ),
        "{e}"
    );

    // Tensors for modules this architecture does not have.
    let w = tmp.path().join(ADAPTER_WEIGHTS);
    v["target_modules"] = serde_json::json!(["q_proj", "c_attn"]);
    std::fs::write(&p, v.to_string()).unwrap();
    write_safetensors(
        &w,
        &[
            (
                "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight".into(),
                TensorData::new(vec![0f32; 4 * 64], [4, 64]),
            ),
            (
                "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight".into(),
                TensorData::new(vec![0f32; 192 * 4], [192, 4]),
            ),
        ],
        FloatDtype::F32,
    )
    .unwrap();
    let mut base = load(&fixture("llama")).unwrap();
    let e = load_adapter(&mut base.model, tmp.path(), "x").unwrap_err();
    assert!(
        matches!(&e, HubError::Adapter { .. }) && e.to_string().contains("c_attn"),
        "{e}"
    );
    assert!(
        base.model.adapter_names().is_empty(),
        "a failed load leaves the model untouched"
    );
}

#[test]
fn adapter_for_a_different_hidden_size() {
    // An adapter trained on a model with hidden_size 128: lora_A is [4, 128].
    let tmp = TempDir::new("hidden");
    std::fs::copy(
        fixture("llama-lora-qv").join(ADAPTER_CONFIG),
        tmp.path().join(ADAPTER_CONFIG),
    )
    .unwrap();
    let mut tensors = Vec::new();
    for l in 0..2 {
        for (m, out) in [("q_proj", 128), ("v_proj", 64)] {
            let k = format!("base_model.model.model.layers.{l}.self_attn.{m}");
            tensors.push((
                format!("{k}.lora_A.weight"),
                TensorData::new(vec![0.1f32; 4 * 128], [4, 128]),
            ));
            tensors.push((
                format!("{k}.lora_B.weight"),
                TensorData::new(vec![0.1f32; out * 4], [out, 4]),
            ));
        }
    }
    write_safetensors(&tmp.path().join(ADAPTER_WEIGHTS), &tensors, FloatDtype::F32).unwrap();
    let base = load(&fixture("llama")).unwrap();
    let e = PeftModel::from_pretrained(base, tmp.path()).unwrap_err();
    match &e {
        HubError::TensorShape {
            tensor,
            expected,
            found,
            path,
        } => {
            assert!(path.ends_with(ADAPTER_WEIGHTS));
            assert_eq!(
                tensor,
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
            );
            assert_eq!(
                (expected.as_slice(), found.as_slice()),
                (&[4, 64][..], &[4, 128][..])
            );
        }
        other => panic!("expected a shape error, got {other}"),
    }
}

#[test]
fn broken_adapter_folders() {
    let base = || load(&fixture("llama")).unwrap();
    // No adapter_config.json.
    let tmp = TempDir::new("noadapter");
    let e = PeftModel::from_pretrained(base(), tmp.path()).unwrap_err();
    assert!(
        matches!(&e, HubError::MissingFile { path, .. } if path.ends_with(ADAPTER_CONFIG)),
        "{e}"
    );
    // An unsupported option in the config.
    std::fs::copy(
        fixture("llama-lora-qv").join(ADAPTER_WEIGHTS),
        tmp.path().join(ADAPTER_WEIGHTS),
    )
    .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama-lora-qv").join(ADAPTER_CONFIG)).unwrap(),
    )
    .unwrap();
    v["fan_in_fan_out"] = true.into();
    std::fs::write(tmp.path().join(ADAPTER_CONFIG), v.to_string()).unwrap();
    let e = PeftModel::from_pretrained(base(), tmp.path()).unwrap_err();
    assert!(
        matches!(&e, HubError::Nn { .. }) && e.to_string().contains("fan_in_fan_out"),
        "{e}"
    );
    // DoRA without its magnitudes.
    v["fan_in_fan_out"] = false.into();
    v["use_dora"] = true.into();
    std::fs::write(tmp.path().join(ADAPTER_CONFIG), v.to_string()).unwrap();
    let e = PeftModel::from_pretrained(base(), tmp.path()).unwrap_err();
    assert!(
        matches!(&e, HubError::MissingTensor { .. })
            && e.to_string().contains("lora_magnitude_vector"),
        "{e}"
    );
    // A lora_A without its lora_B.
    v["use_dora"] = false.into();
    std::fs::write(tmp.path().join(ADAPTER_CONFIG), v.to_string()).unwrap();
    write_safetensors(
        &tmp.path().join(ADAPTER_WEIGHTS),
        &[(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
            TensorData::new(vec![0f32; 256], [4, 64]),
        )],
        FloatDtype::F32,
    )
    .unwrap();
    let e = PeftModel::from_pretrained(base(), tmp.path()).unwrap_err();
    assert!(
        matches!(&e, HubError::MissingTensor { tensor, .. } if tensor.ends_with("q_proj.lora_B.weight")),
        "{e}"
    );
}

#[test]
fn writes_are_atomic_and_leave_no_temp_files() {
    let tmp = TempDir::new("atomic");
    let p = tmp.path().join("sub/file.bin");
    legora_hub::write_atomic(&p, b"one").unwrap();
    legora_hub::write_atomic(&p, b"two").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"two");
    let names: Vec<String> = std::fs::read_dir(p.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["file.bin"]);
    // Writing into a path whose parent is a file fails with the path in the error.
    let e = legora_hub::write_atomic(&p.join("x"), b"").unwrap_err();
    assert!(matches!(e, HubError::Io { .. }), "{e}");
}
