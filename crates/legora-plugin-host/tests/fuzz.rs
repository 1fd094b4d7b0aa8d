//! Mutation fuzzing of what crosses into the host from data files and from plugins:
//! every data-row format of the bundled plugins (JSONL, JSON arrays, CSV, Character
//! Cards, each read through the host as `legora train` reads it, strict and lenient)
//! and the bytes of plugin replies (the response envelopes of every call, decoded as
//! the host decodes a worker's reply). The engine is legora-hub's (`fuzz_engine`,
//! included by path): every input must give `Ok` or a typed error, with no panic and
//! no allocation over its cap.

#[path = "../../legora-hub/tests/fuzz_engine/mod.rs"]
mod fuzz_engine;

use super::common;

use std::path::PathBuf;

use common::workspace_root;
use fuzz_engine::{fuzz, scratch, Mutation};
use legora_plugin_api::protocol::Reply;
use legora_plugin_api::protocol::{Call, ParseHeader, Request};
use legora_plugin_api::{
    handle_request, EvalRequest, Manifest, ParseOptions, ParseRequest, Plugin,
};
use legora_plugin_finance::FinancePlugin;
use legora_plugin_game_npc::GameNpcPlugin;
use legora_plugin_host::{decode_reply, PluginHost};
use legora_plugin_medical::MedicalPlugin;
use serde_json::{json, Value};

fn data(plugin: &str, rel: &str) -> PathBuf {
    workspace_root()
        .join("plugins")
        .join(plugin)
        .join("data")
        .join(rel)
}

/// The first rows of a data file: `lines` lines of JSONL / CSV, or the first items
/// of a JSON array (mutations of a short file reach every part of a row).
fn head(path: &PathBuf, lines: usize) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap();
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(items)) => serde_json::to_vec_pretty(&items[..items.len().min(3)]).unwrap(),
        Ok(v) => serde_json::to_vec_pretty(&v).unwrap(),
        Err(_) => text
            .lines()
            .take(lines)
            .collect::<Vec<_>>()
            .join("\n")
            .into_bytes(),
    }
}

#[test]
fn fuzz_data_rows() {
    let mut host = PluginHost::new();
    host.register_static(MedicalPlugin).unwrap();
    host.register_static(FinancePlugin).unwrap();
    host.register_static(GameNpcPlugin).unwrap();
    let cards = data("game-npc", "cards");
    let files = [
        ("medical/medqa", "medical", "medqa/test.jsonl"),
        ("medical/notes", "medical", "notes/test.jsonl"),
        ("medical/alpaca", "medical", "alpaca/test.json"),
        ("finance/cuad", "finance", "cuad/test.json"),
        ("finance/transactions", "finance", "transactions/test.csv"),
        ("game-npc/card", "game-npc", "cards/brom_ironfist.json"),
        ("game-npc/dialogue", "game-npc", "dialogues/test.jsonl"),
    ];
    for (format, plugin, rel) in files {
        let source = data(plugin, rel);
        let ext = source.extension().unwrap().to_str().unwrap().to_string();
        let file = scratch(&format!("rows-{}.{ext}", format.replace('/', "-")));
        let mut options = [ParseOptions::strict(), ParseOptions::lenient()];
        for o in &mut options {
            o.params
                .insert("cards".into(), json!(cards.to_str().unwrap()));
        }
        fuzz(
            &format!("rows {format}"),
            &[head(&source, 12)],
            Mutation::Json,
            |b| {
                std::fs::write(&file, b).unwrap();
                for o in &options {
                    let _ = host.parse_file(format, &file, o);
                }
            },
        );
    }
}

/// A plugin's reply bytes to `call`, as its C entry point writes them.
fn reply(plugin: &dyn Plugin, call: Call, payload: &[u8]) -> Vec<u8> {
    let request = serde_json::to_vec(&Request::new(call)).unwrap();
    handle_request(plugin, &request, payload)
}

#[test]
fn fuzz_plugin_replies() {
    let plugins: [&dyn Plugin; 3] = [&MedicalPlugin, &FinancePlugin, &GameNpcPlugin];
    let mut seeds = Vec::new();
    for plugin in plugins {
        let manifest_bytes = reply(plugin, Call::Manifest, &[]);
        let Ok(Reply::Manifest(manifest)) = decode_reply("seed", "manifest", &manifest_bytes)
        else {
            panic!("no manifest")
        };
        let manifest: Manifest = manifest;
        seeds.push(manifest_bytes);
        for p in &manifest.presets {
            seeds.push(reply(
                plugin,
                Call::Preset {
                    name: p.name.clone(),
                },
                &[],
            ));
        }
        for e in &manifest.evaluators {
            let request = EvalRequest {
                evaluator: e.name.clone(),
                predictions: vec!["A".into(), "B".into()],
                references: vec!["A".into(), "C".into()],
                ..Default::default()
            };
            seeds.push(reply(plugin, Call::Evaluate(request), &[]));
        }
    }
    // a parse reply with records, and an error reply (a row error)
    for rows in [
        head(&data("medical", "medqa/test.jsonl"), 3),
        b"{\"question\": 1}".to_vec(),
    ] {
        let request = ParseRequest::new("medqa", "test.jsonl", rows);
        let (header, payload) = ParseHeader::split(&request);
        seeds.push(reply(&MedicalPlugin, Call::Parse(header), &payload));
    }
    fuzz("plugin replies", &seeds, Mutation::Json, |b| {
        let _ = decode_reply("fuzzed", "call", b);
    });
}
