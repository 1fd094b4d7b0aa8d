//! The committed sample data is exactly what the generator writes, stays
//! small, and parses strictly with enough rows.

#[path = "../examples/gen_finance_data.rs"]
#[allow(dead_code)]
mod gen_data;

use std::path::Path;

use legora_plugin_api::{ParseRequest, Plugin};
use legora_plugin_finance::FinancePlugin;

fn data_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/data"))
}

#[test]
fn committed_data_matches_the_generator() {
    let mut total = 0;
    for (rel, contents) in gen_data::generate() {
        let path = data_dir().join(&rel);
        let on_disk =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            on_disk == contents,
            "{rel} differs from the generator's output: \
             run `cargo run -p legora-plugin-finance --example gen_finance_data`"
        );
        total += on_disk.len();
    }
    assert!(total < 1_000_000, "sample data is {total} bytes");
}

#[test]
fn sample_files_parse_strictly() {
    let (mut train, mut test) = (0, 0);
    for (format, tr, te) in gen_data::COUNTS {
        for split in ["train", "test"] {
            let ext = if format == "transactions" {
                "csv"
            } else {
                "json"
            };
            let rel = format!("{format}/{split}.{ext}");
            let data = std::fs::read(data_dir().join(&rel)).expect("readable");
            let out = FinancePlugin
                .parse(&ParseRequest::new(format, rel.clone(), data))
                .unwrap_or_else(|e| panic!("{rel}: {e}"));
            assert_eq!(
                out.records.len(),
                if split == "train" { tr } else { te },
                "{rel}"
            );
            for r in &out.records {
                r.validate().expect("valid record");
                let prompt = r.prompt.as_deref().unwrap_or_default();
                assert!(prompt.len() < 300, "{rel}: long prompt {prompt:?}");
            }
            if format == "transactions" {
                let fraud = out
                    .records
                    .iter()
                    .filter(|r| r.label.as_deref() == Some("fraud"))
                    .count();
                let share = fraud as f64 / out.records.len() as f64;
                assert!((0.2..0.4).contains(&share), "{rel}: fraud share {share}");
            }
            if split == "train" {
                train += out.records.len();
            } else {
                test += out.records.len();
            }
        }
    }
    assert!(train >= 600 && test >= 150, "{train} train / {test} test");
}
