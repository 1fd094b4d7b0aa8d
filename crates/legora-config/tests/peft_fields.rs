//! Every key PEFT 0.21's `LoraConfig` writes to adapter_config.json, set to a value other
//! than its default (tests/fixtures/peft/lora_config_fields.json, made by
//! tests/fixtures/make_peft_parity.py), is either interpreted by legora, kept as
//! bookkeeping that changes nothing, or refused with an error naming the key: nothing is
//! silently ignored.

use legora_config::{LoraConfig, KEPT_AS_IS, NOT_IMPLEMENTED};
use serde_json::Value;

/// Keys legora reads into [`LoraConfig`]'s own fields and acts on (or refuses by value).
const INTERPRETED: &[&str] = &[
    "alpha_pattern",
    "base_model_name_or_path",
    "bias",
    "exclude_modules",
    "init_lora_weights",
    "layers_pattern",
    "layers_to_transform",
    "lora_alpha",
    "lora_dropout",
    "modules_to_save",
    "peft_type",
    "r",
    "rank_pattern",
    "target_modules",
    "use_dora",
    "use_rslora",
];

fn fields() -> Vec<(String, Value, Value)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/peft/lora_config_fields.json"
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(doc["peft"], "0.21.2");
    doc["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["field"].as_str().unwrap().to_string(),
                f["default"].clone(),
                f["non_default"].clone(),
            )
        })
        .collect()
}

#[test]
fn every_peft_field_is_interpreted_kept_or_refused_by_name() {
    let refused: Vec<&str> = NOT_IMPLEMENTED.iter().map(|(k, _)| *k).collect();
    let (mut acted, mut kept, mut refusals) = (0, 0, 0);
    for (field, default, other) in fields() {
        let known = [INTERPRETED, KEPT_AS_IS, &refused]
            .iter()
            .filter(|l| l.contains(&field.as_str()))
            .count();
        assert_eq!(known, 1, "PEFT field `{field}` must be in exactly one list");
        // the default parses (PEFT writes every key)
        let json = serde_json::json!({ &field: default }).to_string();
        LoraConfig::from_json(&json).unwrap_or_else(|e| panic!("default of {field}: {e}"));
        let json = serde_json::json!({ &field: other }).to_string();
        match LoraConfig::from_json(&json) {
            Err(e) => {
                assert!(e.to_string().contains(&field), "{field}: {e}");
                assert!(
                    !KEPT_AS_IS.contains(&field.as_str()) || field == "task_type",
                    "{field} is kept as-is but was refused: {e}"
                );
                refusals += 1;
            }
            Ok(cfg) => {
                assert!(
                    !refused.contains(&field.as_str()),
                    "{field} = {other} accepted"
                );
                // an accepted value is kept: written back as read
                let back: Value = serde_json::from_str(&cfg.to_json()).unwrap();
                assert_eq!(back[&field], other, "{field} not written back");
                if INTERPRETED.contains(&field.as_str()) {
                    acted += 1;
                } else {
                    kept += 1;
                }
            }
        }
    }
    eprintln!("{acted} interpreted, {kept} kept as-is, {refusals} refused");
    assert!(refusals >= NOT_IMPLEMENTED.len());
}
