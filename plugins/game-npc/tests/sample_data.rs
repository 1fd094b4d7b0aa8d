//! The committed sample data is exactly what the generator writes, stays
//! small, and parses strictly with enough rows and characters.

#[path = "../examples/gen_game_npc_data.rs"]
#[allow(dead_code)]
mod gen_data;

use std::collections::BTreeSet;
use std::path::Path;

use legora_plugin_api::{Attachment, ParseRequest, Plugin};
use legora_plugin_game_npc::GameNpcPlugin;

fn data_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/data"))
}

#[test]
fn committed_data_matches_the_generator() {
    let mut total = 0;
    let generated = gen_data::generate();
    for (rel, contents) in &generated {
        let path = data_dir().join(rel);
        let on_disk =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            &on_disk == contents,
            "{rel} differs from the generator's output: \
             run `cargo run -p legora-plugin-game-npc --example gen_game_npc_data`"
        );
        total += on_disk.len();
    }
    let cards = std::fs::read_dir(data_dir().join("cards"))
        .expect("cards dir")
        .count();
    assert_eq!(
        cards,
        generated
            .iter()
            .filter(|(r, _)| r.starts_with("cards/"))
            .count(),
        "stray card files"
    );
    assert!(total < 1_000_000, "sample data is {total} bytes");
}

#[test]
fn sample_files_parse_strictly() {
    let mut attachments = Vec::new();
    let mut card_records = 0;
    let mut names: Vec<_> = std::fs::read_dir(data_dir().join("cards"))
        .expect("cards")
        .map(|e| e.expect("entry").path())
        .collect();
    names.sort();
    for path in names {
        let data = std::fs::read(&path).expect("card");
        let out = GameNpcPlugin
            .parse(&ParseRequest::new(
                "card",
                path.display().to_string(),
                data.clone(),
            ))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(out.records.len(), 3, "greeting + 2 examples");
        card_records += out.records.len();
        attachments.push(Attachment {
            name: path.display().to_string(),
            data,
        });
    }
    assert!(attachments.len() >= 20, "{} characters", attachments.len());
    let mut counts = Vec::new();
    for split in ["train", "test"] {
        let rel = format!("dialogues/{split}.jsonl");
        let mut req = ParseRequest::new(
            "dialogue",
            rel.clone(),
            std::fs::read(data_dir().join(&rel)).expect("read"),
        );
        req.attachments = attachments.clone();
        let out = GameNpcPlugin
            .parse(&req)
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
        let characters: BTreeSet<_> = out
            .records
            .iter()
            .map(|r| r.meta["character"].to_string())
            .collect();
        assert!(
            characters.len() >= 20,
            "{rel}: {} characters",
            characters.len()
        );
        for r in &out.records {
            r.validate().expect("valid record");
            let system = &r.messages[0].content;
            assert!(system.len() < 240, "{rel}: long system prompt {system:?}");
        }
        counts.push(out.records.len());
    }
    assert_eq!(
        counts,
        vec![
            24 * gen_data::PER_CHARACTER.0,
            24 * gen_data::PER_CHARACTER.1
        ]
    );
    assert!(counts[0] >= 600 && counts[1] >= 150 && card_records > 0);
}
