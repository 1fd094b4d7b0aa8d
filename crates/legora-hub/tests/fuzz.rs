//! Mutation fuzzing of every file parser legora-hub exposes: safetensors headers,
//! config.json, adapter_config.json, moe_config.json, tokenizer.json, chat templates and
//! GGUF headers. Each starts from real files (the fixtures) and feeds it seeded random
//! mutations: byte flips, inserted / deleted / duplicated ranges, splices, and
//! "interesting" values (huge and negative integers, NaN spellings, deep nesting)
//! written into JSON fields and binary length fields.
//!
//! The engine (mutations, the panic and allocation checks) is `fuzz_engine`, shared with
//! the fuzz tests of legora-train and legora-plugin-host.

#[path = "fuzz_engine/mod.rs"]
mod fuzz_engine;

use std::path::{Path, PathBuf};

use fuzz_engine::{fuzz, read, scratch, Mutation};

#[test]
fn fuzz_safetensors() {
    let p = scratch("model.safetensors");
    let seeds = [
        read("models/mistral/model.safetensors"),
        read("models/mistral-lora-qv/adapter_model.safetensors"),
    ];
    fuzz("safetensors", &seeds, Mutation::Bytes, |b| {
        std::fs::write(&p, b).unwrap();
        if let Ok(f) = legora_hub::SafetensorsFile::open(&p) {
            for n in f.names() {
                let _ = f.tensor(&n);
            }
        }
    });
}

#[test]
fn fuzz_config_json() {
    let seeds = [
        read("models/mistral/config.json"),
        read("models/llama/config.json"),
        read("models/qwen2/config.json"),
    ];
    fuzz("config.json", &seeds, Mutation::Json, |b| {
        let text = String::from_utf8_lossy(b);
        if let Ok(c) = legora_models::Config::from_json(&text) {
            let _ = c.resolve();
        }
    });
}

#[test]
fn fuzz_adapter_config_json() {
    let seeds = [
        read("models/mistral-lora-qv/adapter_config.json"),
        read("models/llama-lora-all/adapter_config.json"),
    ];
    fuzz("adapter_config.json", &seeds, Mutation::Json, |b| {
        let text = String::from_utf8_lossy(b);
        if let Ok(c) = legora_config::LoraConfig::from_json(&text) {
            let _ = c.validate();
        }
    });
}

#[test]
fn fuzz_moe_config_json() {
    let seed = br#"{"format": "legora-moe", "format_version": 1, "experts": ["a", "b"],
        "router": {"num_experts": 2, "top_k": 1, "routing_strategy": "topk"},
        "router_layers": [0, 1]}"#
        .to_vec();
    fuzz("moe_config.json", &[seed], Mutation::Json, |b| {
        let _ = serde_json::from_slice::<legora_hub::MoeConfig>(b);
    });
}

#[test]
fn fuzz_tokenizer_json() {
    let seeds = [read("models/mistral/tokenizer.json")];
    // tokenizer.json is large: fewer inputs (each parse builds the whole vocabulary)
    fuzz("tokenizer.json", &seeds, Mutation::Json, |b| {
        // regressions: tokenizers 0.22 panicked on 13 of the first 1,500 inputs here
        // while parsing (decoders/mod.rs), and on 2 of 100,000 at the first encode
        // (processors/template.rs); legora contains both as typed errors at load
        if let Ok(t) = legora_hub::tokenizer_from_bytes(Path::new("tokenizer.json"), b) {
            let _ = legora_hub::encode(&t, "the router picks", true);
        }
    });
}

#[test]
fn fuzz_chat_templates() {
    let seeds = [
        read("models/mistral/chat_template.jinja"),
        read("models/llama/chat_template.jinja"),
    ];
    let msgs = [
        legora_hub::Message::new(legora_hub::Role::User, "hi"),
        legora_hub::Message::new(legora_hub::Role::Assistant, "hello"),
    ];
    fuzz("chat templates", &seeds, Mutation::Bytes, |b| {
        let t = legora_hub::ChatTemplate {
            source: String::from_utf8_lossy(b).into_owned(),
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            path: PathBuf::from("chat_template.jinja"),
        };
        let _ = t.render(&msgs, true);
    });
}

#[test]
fn fuzz_gguf_headers() {
    let p = scratch("model.gguf");
    let seeds = [read("gguf/llama-q8_0.gguf"), read("gguf/qwen2-q4_0.gguf")];
    fuzz("gguf", &seeds, Mutation::Bytes, |b| {
        std::fs::write(&p, b).unwrap();
        let _ = legora_hub::GgufFile::open(&p);
    });
}
