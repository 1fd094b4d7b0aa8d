//! The cost of process isolation on the demo's plugin workload: the plugin
//! calls `legora demo` makes (load the three domain plugins, parse the six
//! data files of `demo/demo.toml` with its parameters, nine evaluations: base,
//! single LoRA and mixture for each task, scored as the demo scores them), timed
//! in process and through workers.
//!
//! ```text
//! cargo build --release -p legora-plugin-host --example isolation_overhead \
//!     -p legora-plugin-medical -p legora-plugin-finance -p legora-plugin-game-npc
//! target/release/examples/isolation_overhead target/release target/release/legora-plugin-worker 7
//! ```
//!
//! Arguments: the folder with the plugin libraries, the worker program, the
//! number of repeats (the median is printed).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use legora_plugin_host::api::{EvalRequest, ParseOptions, Record};
use legora_plugin_host::{Isolation, PluginHost};
use serde_json::{json, Map, Value};

/// (format, train file, test file, parse params) as in demo/demo.toml.
fn tasks(root: &Path) -> Vec<(&'static str, PathBuf, PathBuf, Map<String, Value>)> {
    let data = |p: &str| root.join("plugins").join(p);
    let choices = |c: &[&str]| {
        let mut m = Map::new();
        m.insert("choices".into(), json!(c));
        m
    };
    vec![
        (
            "medical/alpaca",
            data("medical/data/alpaca/train.json"),
            data("medical/data/alpaca/test.json"),
            choices(&[
                "cardiology",
                "dermatology",
                "endocrinology",
                "gastroenterology",
                "hematology",
                "neurology",
                "psychiatry",
                "pulmonology",
                "rheumatology",
                "surgery",
                "urology",
            ]),
        ),
        (
            "finance/alpaca",
            data("finance/data/alpaca/train.json"),
            data("finance/data/alpaca/test.json"),
            choices(&["positive", "negative", "neutral"]),
        ),
        (
            "game-npc/dialogue",
            data("game-npc/data/dialogues/train.jsonl"),
            data("game-npc/data/dialogues/test.jsonl"),
            Map::new(),
        ),
    ]
}

/// The demo's evaluation request for a task's test records: choice scores when
/// the records have choices, generated text (here: the references) otherwise.
fn eval_request(records: &[Record]) -> EvalRequest {
    let references: Vec<String> = records
        .iter()
        .map(|r| r.reference().unwrap_or_default().to_string())
        .collect();
    let mut request = EvalRequest::new(references.clone(), references);
    let choices = records[0].choices.clone();
    if !choices.is_empty() {
        let scores = records
            .iter()
            .map(|r| {
                choices
                    .iter()
                    .map(|c| {
                        if r.label.as_ref() == Some(c) {
                            -0.5
                        } else {
                            -3.0
                        }
                    })
                    .collect()
            })
            .collect();
        request = request.with_scores(choices, scores);
    }
    request.with_meta(records.iter().map(|r| r.meta.clone()).collect())
}

/// One pass of the workload: (load, parse, evaluate) times.
fn workload(dir: &Path, worker: &Path, isolation: Isolation, root: &Path) -> [Duration; 3] {
    let t0 = Instant::now();
    let mut host = PluginHost::new();
    host.use_env_path(false).use_exe_dir(false);
    host.add_search_dir(dir);
    host.set_isolation(isolation);
    host.set_worker_command(worker, ["plugin-worker"]);
    for name in ["medical", "finance", "game-npc"] {
        host.load_name(name).unwrap_or_else(|e| panic!("{e}"));
    }
    let t1 = Instant::now();
    let mut tests = Vec::new();
    for (format, train, test, params) in tasks(root) {
        let options = ParseOptions {
            params,
            ..ParseOptions::default()
        };
        let parse = |p: &Path| {
            host.parse_file(format, p, &options)
                .unwrap_or_else(|e| panic!("{e}"))
                .records
        };
        let n = parse(&train).len();
        assert!(n > 0);
        tests.push((format, parse(&test)));
    }
    let t2 = Instant::now();
    for _variant in ["base", "single_lora", "mixture"] {
        for (format, records) in &tests {
            let evaluator = host
                .format(format)
                .ok()
                .and_then(|f| f.default_evaluator())
                .unwrap_or_else(|| panic!("{format} has a default evaluator"));
            let out = host
                .evaluate(&evaluator, eval_request(records))
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(!out.metrics.is_empty());
        }
    }
    let t3 = Instant::now();
    drop(host);
    [t1 - t0, t2 - t1, t3 - t2]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(dir), Some(worker)) = (args.first(), args.get(1)) else {
        eprintln!("usage: isolation_overhead <plugin dir> <worker program> [repeats]");
        std::process::exit(64);
    };
    let repeats: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(7);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (dir, worker) = (Path::new(dir), Path::new(worker));
    // warm the page cache and both paths once
    workload(dir, worker, Isolation::InProcess, &root);
    workload(dir, worker, Isolation::Process, &root);
    let mut rows = Vec::new();
    for isolation in [Isolation::InProcess, Isolation::Process] {
        let mut runs: [Vec<Duration>; 4] = Default::default();
        for _ in 0..repeats {
            let t = workload(dir, worker, isolation, &root);
            for (i, d) in t.iter().enumerate() {
                runs[i].push(*d);
            }
            runs[3].push(t.iter().sum());
        }
        rows.push((isolation, runs.map(median)));
    }
    println!("median of {repeats} runs, ms:  load(3)  parse(6)  evaluate(9)  total");
    for (isolation, t) in &rows {
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        println!(
            "{:<12} {:>24.1} {:>9.1} {:>12.1} {:>6.1}",
            format!("{isolation:?}"),
            ms(&t[0]),
            ms(&t[1]),
            ms(&t[2]),
            ms(&t[3])
        );
    }
    let extra = rows[1].1[3].as_secs_f64() - rows[0].1[3].as_secs_f64();
    println!(
        "isolation costs {:.1} ms in all: {:.3}% of the demo's 1.9 min",
        extra * 1e3,
        extra / 114.0 * 100.0
    );
}
