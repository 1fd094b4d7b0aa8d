//! End-to-end tests of the plugin host.
//!
//! The plugins are built as dynamic libraries by `common::plugin_dir` and
//! loaded both ways a dynamic plugin runs: in a worker process (the default)
//! and in process. The same plugins are also linked as rlibs and registered
//! statically; all paths must give identical results.

use super::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bare_host, lib_path, plugin_dir, workspace_root};
use legora_plugin_api::{
    EvalOutput, EvalRequest, ParseMode, ParseOptions, PluginError, ABI_VERSION,
};
use legora_plugin_finance::FinancePlugin;
use legora_plugin_game_npc::GameNpcPlugin;
use legora_plugin_host::{HostError, Isolation, PluginHost};
use legora_plugin_medical::MedicalPlugin;
use serde_json::{json, Map, Value};

const BOTH: [Isolation; 2] = [Isolation::Process, Isolation::InProcess];

fn dynamic_host(isolation: Isolation) -> PluginHost {
    let mut host = bare_host(isolation);
    for name in ["medical", "finance", "game-npc"] {
        let plugin = host.load_name(name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plugin.name(), name);
        assert_eq!(plugin.isolation(), Some(isolation));
    }
    host
}

fn static_host() -> PluginHost {
    let mut host = PluginHost::new();
    host.register_static(MedicalPlugin).expect("medical");
    host.register_static(FinancePlugin).expect("finance");
    host.register_static(GameNpcPlugin).expect("game-npc");
    host
}

fn plugin_data(plugin: &str, rel: &str) -> PathBuf {
    workspace_root()
        .join("plugins")
        .join(plugin)
        .join("data")
        .join(rel)
}

fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() < 1e-12, "{what}: got {got}, want {want}");
}

fn metric(out: &EvalOutput, name: &str) -> f64 {
    *out.metrics
        .get(name)
        .unwrap_or_else(|| panic!("metric `{name}` missing from {out:?}"))
}

fn meta(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// Lists, parses every shipped sample file, scores hand-computed cases and
/// fetches the presets; returns everything as JSON for comparing paths.
fn exercise(host: &PluginHost) -> Value {
    let mut report = Map::new();
    assert_eq!(
        host.format_names(),
        [
            "finance/alpaca",
            "finance/cuad",
            "finance/transactions",
            "game-npc/alpaca",
            "game-npc/card",
            "game-npc/dialogue",
            "medical/alpaca",
            "medical/medqa",
            "medical/notes",
        ]
    );
    assert_eq!(
        host.evaluator_names(),
        [
            "finance/extraction",
            "finance/fraud",
            "finance/label_accuracy",
            "game-npc/diversity",
            "game-npc/in_character",
            "game-npc/persona",
            "medical/label_accuracy",
            "medical/mc_accuracy",
            "medical/summary",
        ]
    );
    assert_eq!(
        host.preset_names(),
        ["finance/compliance", "game-npc/persona", "medical/clinical"]
    );
    report.insert("formats".into(), json!(host.format_names()));
    report.insert(
        "manifests".into(),
        json!(host
            .plugins()
            .iter()
            .map(|p| p.manifest().clone())
            .collect::<Vec<_>>()),
    );

    // --- every shipped sample file, strict mode --------------------------
    let files: &[(&str, &str, &str, usize)] = &[
        ("medical/medqa", "medical", "medqa/train.jsonl", 400),
        ("medical/medqa", "medical", "medqa/test.jsonl", 100),
        ("medical/notes", "medical", "notes/train.jsonl", 250),
        ("medical/notes", "medical", "notes/test.jsonl", 60),
        ("medical/alpaca", "medical", "alpaca/train.json", 250),
        ("medical/alpaca", "medical", "alpaca/test.json", 60),
        ("finance/cuad", "finance", "cuad/train.json", 640),
        ("finance/cuad", "finance", "cuad/test.json", 160),
        (
            "finance/transactions",
            "finance",
            "transactions/train.csv",
            800,
        ),
        (
            "finance/transactions",
            "finance",
            "transactions/test.csv",
            200,
        ),
        ("finance/alpaca", "finance", "alpaca/train.json", 300),
        ("finance/alpaca", "finance", "alpaca/test.json", 80),
        // the dialogue format finds its cards in ../cards by default
        (
            "game-npc/dialogue",
            "game-npc",
            "dialogues/train.jsonl",
            720,
        ),
        ("game-npc/dialogue", "game-npc", "dialogues/test.jsonl", 192),
    ];
    let mut parsed = Map::new();
    for (format, plugin, rel, want) in files {
        let out = host
            .parse_file(format, plugin_data(plugin, rel), &ParseOptions::strict())
            .unwrap_or_else(|e| panic!("{format} {rel}: {e}"));
        assert_eq!(out.records.len(), *want, "{format} {rel}");
        assert_eq!(out.skipped, 0);
        let task = out.records[0].task.clone();
        assert_eq!(&task, format, "default task is the qualified format name");
        parsed.insert(format!("{plugin}/{rel}"), json!(out));
    }
    let mut cards: Vec<PathBuf> = std::fs::read_dir(plugin_data("game-npc", "cards"))
        .expect("cards dir")
        .map(|e| e.expect("entry").path())
        .collect();
    cards.sort();
    assert!(cards.len() >= 20);
    for card in &cards {
        let out = host
            .parse_file("game-npc/card", card, &ParseOptions::strict())
            .unwrap_or_else(|e| panic!("{}: {e}", card.display()));
        assert_eq!(out.records.len(), 3, "{}", card.display());
        let name = card
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        parsed.insert(format!("game-npc/cards/{name}"), json!(out));
    }
    report.insert("parsed".into(), Value::Object(parsed));

    // --- hand-computed evaluator cases ------------------------------------
    let mut scores = Map::new();

    // medical/mc_accuracy from text: C = C, b -> B = B, "The answer is D." -> D != A, E = E -> 3/4
    let out = host
        .evaluate(
            "medical/mc_accuracy",
            EvalRequest::new(["C", "b", "The answer is D.", "E"], ["C", "B", "A", "E"]),
        )
        .expect("mc_accuracy");
    close(metric(&out, "accuracy"), 0.75, "mc_accuracy text");
    scores.insert("mc_text".into(), json!(out));
    // ... and from per-choice scores: argmax C = C, argmax A != B -> 1/2
    let out = host
        .evaluate(
            "medical/mc_accuracy",
            EvalRequest::new(["", ""], ["C", "B"]).with_scores(
                ["A", "B", "C", "D", "E"],
                vec![
                    vec![-3.0, -2.0, -0.1, -4.0, -5.0],
                    vec![-0.2, -1.0, -3.0, -3.0, -3.0],
                ],
            ),
        )
        .expect("mc_accuracy scores");
    close(metric(&out, "accuracy"), 0.5, "mc_accuracy scores");
    scores.insert("mc_scores".into(), json!(out));

    // medical/summary
    // ex1 pred "Patient has acute chest pain." ref "The patient has chest pain today"
    //   ROUGE-L tokens: pred 5, ref 6, LCS "patient has chest pain" = 4
    //   P = 4/5, R = 4/6, F = 2PR/(P+R) = 8/11
    //   token F1 (SQuAD, "the" dropped): pred 5, ref 5 tokens, overlap 4 -> P = R = F1 = 0.8
    // ex2 pred "pain chest patient" ref "patient chest pain"
    //   LCS = 1 -> ROUGE-L 1/3; same bag of tokens -> token F1 = 1
    // mean ROUGE-L = (8/11 + 1/3) / 2 = 35/66; mean token F1 = 0.9
    let out = host
        .evaluate(
            "medical/summary",
            EvalRequest::new(
                ["Patient has acute chest pain.", "pain chest patient"],
                ["The patient has chest pain today", "patient chest pain"],
            ),
        )
        .expect("summary");
    close(metric(&out, "rouge_l"), 35.0 / 66.0, "rouge_l");
    close(metric(&out, "token_f1"), 0.9, "token_f1");
    scores.insert("summary".into(), json!(out));

    // medical/label_accuracy: Cardiology = cardiology, "neurology." = neurology,
    // urology != nephrology -> 2/3
    let out = host
        .evaluate(
            "medical/label_accuracy",
            EvalRequest::new(
                ["Cardiology", "neurology.", "urology"],
                ["cardiology", "neurology", "nephrology"],
            ),
        )
        .expect("label_accuracy");
    close(metric(&out, "accuracy"), 2.0 / 3.0, "label_accuracy");
    scores.insert("label".into(), json!(out));

    // finance/extraction (SQuAD normalization: lowercase, no punctuation, no articles)
    // 1 "the State of Delaware" vs "Delaware": EM 0; [state of delaware] vs [delaware]:
    //   overlap 1, P = 1/3, R = 1, F1 = 0.5
    // 2 "thirty (30) days" vs "30 days": EM 0; [thirty 30 days] vs [30 days]: P = 2/3, R = 1, F1 = 0.8
    // 3 "none" for an impossible question: EM 1, F1 1
    // 4 "Acme Corp." vs golds {"Acme Corp", "Acme"}: EM 1, F1 1 (best gold)
    // EM = 2/4 = 0.5; F1 = (0.5 + 0.8 + 1 + 1) / 4 = 0.825
    let out = host
        .evaluate(
            "finance/extraction",
            EvalRequest::new(
                [
                    "the State of Delaware",
                    "thirty (30) days",
                    "none",
                    "Acme Corp.",
                ],
                ["Delaware", "30 days", "none", "Acme Corp"],
            )
            .with_meta(vec![
                Map::new(),
                Map::new(),
                meta(json!({"answers": [], "is_impossible": true})),
                meta(json!({"answers": ["Acme Corp", "Acme"], "is_impossible": false})),
            ]),
        )
        .expect("extraction");
    close(metric(&out, "exact_match"), 0.5, "exact_match");
    close(metric(&out, "f1"), 0.825, "extraction f1");
    scores.insert("extraction".into(), json!(out));

    // finance/fraud
    // references [fraud, legit, fraud, legit], predictions [fraud, fraud, fraud, legit]
    //   tp 2 (1, 3), fp 1 (2), fn 0, tn 1 (4): P = 2/3, R = 1, F1 = 2(2/3)/(5/3) = 0.8, acc 3/4
    // scores [legit, fraud] logits [0,2] [0,1] [0,0.5] [0,-1] -> P(fraud) = sigmoid(2, 1, 0.5, -1)
    //   = .88 .73 .62 .27; positives {.88, .62}, negatives {.73, .27}
    //   pairs pos > neg: .88>.73 .88>.27 .62>.27 yes, .62>.73 no -> AUC = 3/4
    let out = host
        .evaluate(
            "finance/fraud",
            EvalRequest::new(
                ["fraud", "fraud", "fraud", "legit"],
                ["fraud", "legit", "fraud", "legit"],
            )
            .with_scores(
                ["legit", "fraud"],
                vec![
                    vec![0.0, 2.0],
                    vec![0.0, 1.0],
                    vec![0.0, 0.5],
                    vec![0.0, -1.0],
                ],
            ),
        )
        .expect("fraud");
    close(metric(&out, "precision"), 2.0 / 3.0, "precision");
    close(metric(&out, "recall"), 1.0, "recall");
    close(metric(&out, "f1"), 0.8, "fraud f1");
    close(metric(&out, "accuracy"), 0.75, "fraud accuracy");
    close(metric(&out, "roc_auc"), 0.75, "roc_auc");
    scores.insert("fraud".into(), json!(out));
    // one class only: roc_auc is undefined and left out with a warning
    let out = host
        .evaluate(
            "finance/fraud",
            EvalRequest::new(["legit"], ["legit"])
                .with_scores(["legit", "fraud"], vec![vec![0.0, 1.0]]),
        )
        .expect("fraud single class");
    assert!(
        !out.metrics.contains_key("roc_auc") && !out.warnings.is_empty(),
        "{out:?}"
    );

    // game-npc/in_character for "Brom Ironfist" with marker "Hmph"
    // 1 "Hmph. Axes, fresh from the forge."   in character
    // 2 "As an AI language model, I cannot."   out of role (and no marker)
    // 3 "Hmph. My name is Gandalf."            wrong name
    // 4 "Welcome, traveler."                   no marker
    // in_character 1/4, out_of_role 1/4, name_kept 3/4, marker 2/4
    let brom = meta(json!({"character": "Brom Ironfist", "markers": ["Hmph"]}));
    let out = host
        .evaluate(
            "game-npc/in_character",
            EvalRequest::new(
                [
                    "Hmph. Axes, fresh from the forge.",
                    "As an AI language model, I cannot.",
                    "Hmph. My name is Gandalf.",
                    "Welcome, traveler.",
                ],
                ["", "", "", ""],
            )
            .with_meta(vec![brom.clone(), brom.clone(), brom.clone(), brom]),
        )
        .expect("in_character");
    close(metric(&out, "in_character_rate"), 0.25, "in_character_rate");
    close(metric(&out, "out_of_role_rate"), 0.25, "out_of_role_rate");
    close(metric(&out, "name_kept_rate"), 0.75, "name_kept_rate");
    close(metric(&out, "marker_rate"), 0.5, "marker_rate");
    scores.insert("in_character".into(), json!(out));

    // game-npc/diversity on [aye aye captain] [aye captain ho] [ho ho ho ho]
    // distinct-1: 10 unigrams, 3 distinct -> 0.3
    // distinct-2: 2 + 2 + 3 = 7 bigrams, distinct {aye aye, aye captain, captain ho, ho ho} = 4 -> 4/7
    // repetition (rep-2): 0, 0, 1 - 1/3 -> mean 2/9; mean length (3 + 3 + 4) / 3 = 10/3
    let replies = ["Aye, aye captain!", "aye captain ho", "ho ho ho ho"];
    let out = host
        .evaluate(
            "game-npc/diversity",
            EvalRequest::new(replies, ["", "", ""]),
        )
        .expect("diversity");
    close(metric(&out, "distinct_1"), 0.3, "distinct_1");
    close(metric(&out, "distinct_2"), 4.0 / 7.0, "distinct_2");
    close(
        metric(&out, "repetition_rate"),
        2.0 / 9.0,
        "repetition_rate",
    );
    close(
        metric(&out, "mean_reply_length"),
        10.0 / 3.0,
        "mean_reply_length",
    );
    scores.insert("diversity".into(), json!(out));
    let out = host
        .evaluate("game-npc/persona", EvalRequest::new(replies, ["", "", ""]))
        .expect("persona");
    assert_eq!(out.metrics.len(), 8, "{out:?}");
    scores.insert("persona".into(), json!(out));
    report.insert("scores".into(), Value::Object(scores));

    // --- presets ------------------------------------------------------------
    let mut presets = Map::new();
    for name in host.preset_names() {
        let preset = host.preset(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
        preset.validate().expect("valid preset");
        presets.insert(name, json!(preset));
    }
    let fin = &presets["finance/compliance"];
    assert_eq!(fin["lora"]["r"], json!(8));
    assert_eq!(fin["lora"]["peft_type"], json!("LORA"));
    assert_eq!(
        fin["format_options"]["finance/transactions"]["label_column"],
        json!("is_fraud")
    );
    assert_eq!(
        presets["game-npc/persona"]["mixture"]["routing_strategy"],
        json!("topk")
    );
    report.insert("presets".into(), Value::Object(presets));
    Value::Object(report)
}

#[test]
fn dynamic_and_static_plugins_give_identical_results() {
    let statically = exercise(&static_host());
    for isolation in BOTH {
        let dynamic = exercise(&dynamic_host(isolation));
        // Compare piece by piece for a readable failure.
        for key in ["formats", "manifests", "parsed", "scores", "presets"] {
            assert!(
                dynamic[key] == statically[key],
                "`{key}` differs between the dynamic ({isolation:?}) and static paths"
            );
        }
        assert_eq!(dynamic, statically);
    }
}

#[test]
fn broken_plugins_give_typed_errors_and_the_host_keeps_working() {
    for isolation in BOTH {
        broken_plugins(isolation);
    }
}

fn broken_plugins(isolation: Isolation) {
    let mut host = dynamic_host(isolation);
    let good = || EvalRequest::new(["cardiology"], ["cardiology"]);

    // (a) another ABI version: refused before anything but the entry runs
    let path = lib_path("legora_test_plugin_abi_mismatch");
    match host.load_path(&path) {
        Err(HostError::AbiMismatch {
            path: p,
            expected,
            found,
        }) => {
            assert_eq!((expected, found), (ABI_VERSION, ABI_VERSION + 1000));
            assert_eq!(p, path);
        }
        other => panic!("expected AbiMismatch, got {other:?}"),
    }
    let msg = host.load_path(&path).expect_err("again").to_string();
    assert!(
        msg.contains(&format!("version {}", ABI_VERSION + 1000))
            && msg.contains(&format!("version {ABI_VERSION}")),
        "{msg}"
    );
    assert!(host.plugin("abi-mismatch").is_err(), "nothing registered");
    close(
        metric(
            &host
                .evaluate("medical/label_accuracy", good())
                .expect("host works"),
            "accuracy",
        ),
        1.0,
        "after (a)",
    );

    // (b) no entry symbol: the error names the path and the symbols looked up
    let path = lib_path("legora_test_plugin_no_entry");
    match host.load_path(&path) {
        Err(HostError::MissingSymbol { path: p, symbols }) => {
            assert_eq!(p, path);
            assert_eq!(
                symbols[0],
                "legora_plugin_entry_legora_test_plugin_no_entry"
            );
        }
        other => panic!("expected MissingSymbol, got {other:?}"),
    }
    close(
        metric(
            &host
                .evaluate("medical/label_accuracy", good())
                .expect("host works"),
            "accuracy",
        ),
        1.0,
        "after (b)",
    );

    // (c) a panic inside a call comes back as an error with its message
    host.load_path(lib_path("legora_test_plugin_panics"))
        .expect("panicking plugin loads");
    match host.evaluate("panics/boom", EvalRequest::new(["a", "b"], ["a", "b"])) {
        Err(HostError::Panicked { plugin, message }) => {
            assert_eq!(plugin, "panics");
            assert_eq!(message, "the evaluator exploded on 2 examples");
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    match host.parse_bytes(
        "panics/lines",
        "x.txt",
        b"x".to_vec(),
        &ParseOptions::strict(),
    ) {
        Err(HostError::Panicked { message, .. }) => {
            assert!(message.contains("index out of bounds"), "{message}")
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    // the panicking plugin itself still answers, and so do the others
    assert_eq!(
        host.preset("panics/ok").expect("preset after panic").lora.r,
        2
    );
    close(
        metric(
            &host
                .evaluate("medical/label_accuracy", good())
                .expect("host works"),
            "accuracy",
        ),
        1.0,
        "after (c)",
    );

    // (d) invalid JSON in a response (this plugin is found through the
    // fallback entry symbol `legora_plugin_entry`)
    host.load_path(lib_path("legora_test_plugin_bad_json"))
        .expect("manifest is fine");
    match host.evaluate("bad-json/broken", EvalRequest::new(["a"], ["a"])) {
        Err(HostError::MalformedResponse {
            plugin,
            method,
            reason,
        }) => {
            assert_eq!((plugin.as_str(), method.as_str()), ("bad-json", "evaluate"));
            assert!(reason.contains("EOF"), "{reason}");
        }
        other => panic!("expected MalformedResponse, got {other:?}"),
    }
    close(
        metric(
            &host
                .evaluate("medical/label_accuracy", good())
                .expect("host works"),
            "accuracy",
        ),
        1.0,
        "after (d)",
    );

    // not a library at all, a missing name, a duplicate plugin, an unknown item
    let text_file = workspace_root().join("plugins/medical/data/notes/test.jsonl");
    assert!(matches!(
        host.load_path(&text_file),
        Err(HostError::NotLoadable { .. })
    ));
    match host.load_name("no-such-plugin") {
        Err(HostError::NotFound {
            candidates,
            searched,
            ..
        }) => {
            assert_eq!(searched, vec![plugin_dir().to_path_buf()]);
            assert!(
                candidates[0].contains("legora_plugin_no_such_plugin"),
                "{candidates:?}"
            );
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(matches!(
        host.load_name("medical"),
        Err(HostError::Duplicate { kind: "plugin", .. })
    ));
    assert!(matches!(
        host.evaluate("medical/nope", good()),
        Err(HostError::Unknown {
            kind: "evaluator",
            ..
        })
    ));
    // infinite log-likelihoods are clamped (order kept), NaN is refused
    let out = host
        .evaluate(
            "finance/fraud",
            EvalRequest::new(["legit", "fraud"], ["legit", "fraud"]).with_scores(
                ["legit", "fraud"],
                vec![vec![0.0, f64::NEG_INFINITY], vec![f64::NEG_INFINITY, 0.0]],
            ),
        )
        .expect("infinite scores");
    close(metric(&out, "roc_auc"), 1.0, "auc with -inf");
    let nan = EvalRequest::new(["legit"], ["legit"])
        .with_scores(["legit", "fraud"], vec![vec![0.0, f64::NAN]]);
    assert!(matches!(
        host.evaluate("finance/fraud", nan),
        Err(HostError::InvalidRequest { .. })
    ));
    // a plugin-side error keeps its kind
    let bad = EvalRequest::new(["x"], ["y"]).with_scores(["a", "b"], vec![vec![0.0, 1.0]]);
    assert!(matches!(
        host.evaluate("finance/fraud", bad),
        Err(HostError::Plugin {
            source: PluginError::InvalidRequest { .. },
            ..
        })
    ));
    close(
        metric(
            &host
                .evaluate("medical/label_accuracy", good())
                .expect("host works"),
            "accuracy",
        ),
        1.0,
        "at the end",
    );
}

/// Writes `contents` to a fresh file under the test tmp dir.
fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("malformed");
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write");
    path
}

/// (line, row, message) of one row error.
type Row = (Option<u64>, Option<u64>, String);

fn row_errors(err: HostError) -> (String, Vec<Row>, usize) {
    match err {
        HostError::InvalidRows {
            file,
            errors,
            total,
            ..
        } => (
            file,
            errors
                .into_iter()
                .map(|e| (e.line, e.row, e.message))
                .collect(),
            total,
        ),
        other => panic!("expected InvalidRows, got {other}"),
    }
}

fn check_malformed_rows(host: &PluginHost) {
    let good = r#"{"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "B"}"#;
    let medqa = temp_file(
        "medqa_bad.jsonl",
        &[
            good,
            r#"{"question": "Q?", "options": {"A": "x""#, // line 2: bad JSON
            r#"{"question": "Q?", "options": {"A": "x", "B": "y"}}"#, // line 3: missing field
            r#"{"question": "Q?", "options": 5, "answer_idx": "A"}"#, // line 4: wrong type
            "",
            good,
        ]
        .join("\n"),
    );
    let err = host
        .parse_file("medical/medqa", &medqa, &ParseOptions::strict())
        .expect_err("strict fails");
    let text = err.to_string();
    let (file, errors, total) = row_errors(err);
    assert_eq!(file, medqa.display().to_string());
    assert_eq!(total, 3);
    assert_eq!(errors[0].0, Some(2));
    assert!(errors[0].2.starts_with("invalid JSON"), "{errors:?}");
    assert_eq!(errors[1].0, Some(3));
    assert!(
        errors[1].2.contains("missing field `answer_idx`"),
        "{errors:?}"
    );
    assert_eq!(errors[2].0, Some(4));
    assert!(
        errors[2].2.contains("invalid type: integer `5`"),
        "{errors:?}"
    );
    assert!(
        text.contains(&format!(
            "{}:3: row 3: missing field `answer_idx`",
            medqa.display()
        )),
        "{text}"
    );

    let out = host
        .parse_file("medical/medqa", &medqa, &ParseOptions::lenient())
        .expect("lenient skips");
    assert_eq!(out.records.len(), 2);
    assert_eq!(out.skipped, 3);
    assert_eq!(out.errors.len(), 3);
    assert_eq!(out.errors[2].line, Some(4));

    // Alpaca JSON array: the item on line 3 lacks `output`
    let alpaca = temp_file(
        "alpaca_bad.json",
        "[\n  {\"instruction\": \"a\", \"input\": \"\", \"output\": \"b\"},\n  {\"instruction\": \"a\", \"input\": \"\"}\n]\n",
    );
    let (_, errors, _) = row_errors(
        host.parse_file("medical/alpaca", &alpaca, &ParseOptions::strict())
            .expect_err("strict"),
    );
    assert_eq!((errors[0].0, errors[0].1), (Some(3), Some(2)));
    assert!(errors[0].2.contains("missing field `output`"));

    // CSV: a data row with a missing field (line 3) and a bad label (line 4)
    let header = "txn_id,amount,merchant_category,channel,country,hour,distance_km,is_fraud";
    let csv = temp_file(
        "txn_bad.csv",
        &format!(
            "{header}\nT1,10.00,grocery,chip,US,12,3,0\nT2,12.00,grocery,chip,US,12,3\nT3,1.00,fuel,chip,US,1,2,maybe\nT4,900.00,jewelry,online,RU,3,4000,1\n"
        ),
    );
    let (file, errors, total) = row_errors(
        host.parse_file("finance/transactions", &csv, &ParseOptions::strict())
            .expect_err("strict"),
    );
    assert_eq!((file, total), (csv.display().to_string(), 2));
    assert_eq!((errors[0].0, errors[0].1), (Some(3), Some(2)));
    assert!(
        errors[0].2.contains("missing column value(s): is_fraud"),
        "{errors:?}"
    );
    assert_eq!(errors[1].0, Some(4));
    let out = host
        .parse_file("finance/transactions", &csv, &ParseOptions::lenient())
        .expect("lenient");
    assert_eq!((out.records.len(), out.skipped), (2, 2));
    assert_eq!(out.records[1].label.as_deref(), Some("fraud"));

    // CSV whose header lacks a column: the file fails in both modes, at line 1
    let csv = temp_file("txn_no_label.csv", "txn_id,amount\nT1,10.00\n");
    for options in [ParseOptions::strict(), ParseOptions::lenient()] {
        let (_, errors, _) = row_errors(
            host.parse_file("finance/transactions", &csv, &options)
                .expect_err("missing column"),
        );
        assert_eq!(errors[0].0, Some(1), "{:?}", options.mode);
        assert!(
            errors[0].2.contains("header lacks column `is_fraud`"),
            "{errors:?}"
        );
    }
    // ... also for columns named in the preset's format options
    let preset = host.preset("finance/compliance").expect("preset");
    let mut options = ParseOptions::strict();
    options.params = preset.format_options["finance/transactions"].clone();
    let csv = temp_file("txn_no_hour.csv", "txn_id,amount,merchant_category,channel,country,distance_km,is_fraud\nT1,1,fuel,chip,US,2,0\n");
    let (_, errors, _) = row_errors(
        host.parse_file("finance/transactions", &csv, &options)
            .expect_err("no hour"),
    );
    assert!(errors[0].2.contains("`hour`"), "{errors:?}");

    // dialogue row naming an unknown character, cards given explicitly
    let dialogue = temp_file(
        "dialogue_bad.jsonl",
        "{\"character\": \"Brom Ironfist\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hmph.\"}]}\n{\"character\": \"Nobody\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"?\"}]}\n",
    );
    let options = ParseOptions {
        mode: ParseMode::Lenient,
        ..ParseOptions::default()
    }
    .with_param(
        "cards",
        plugin_data("game-npc", "cards").display().to_string(),
    );
    let out = host
        .parse_file("game-npc/dialogue", &dialogue, &options)
        .expect("lenient");
    assert_eq!((out.records.len(), out.skipped), (1, 1));
    assert!(out.errors[0].message.contains("unknown character `Nobody`"));
    assert_eq!(out.errors[0].line, Some(2));
    // without any cards the file cannot be read at all
    let err = host
        .parse_file("game-npc/dialogue", &dialogue, &ParseOptions::lenient())
        .expect_err("no cards next to a tmp file");
    assert!(err.to_string().contains("no character cards"), "{err}");
}

#[test]
fn malformed_rows_are_reported_with_file_and_line_in_both_paths() {
    for isolation in BOTH {
        check_malformed_rows(&dynamic_host(isolation));
    }
    check_malformed_rows(&static_host());
}

#[test]
fn the_example_plugin_builds_and_loads() {
    let mut host = bare_host(Isolation::Process);
    let plugin = host
        .load_name("minimal")
        .expect("examples/plugin-minimal loads");
    assert_eq!(plugin.manifest().name, "minimal");
    assert!(host.discover().iter().any(|p| p.ends_with(
        lib_path("legora_plugin_minimal")
            .file_name()
            .unwrap_or_default()
    )));
    let out = host
        .parse_bytes(
            "minimal/tsv",
            "pairs.tsv",
            b"2+2\t4\n3+3\t6\n".to_vec(),
            &ParseOptions::strict(),
        )
        .expect("parses");
    assert_eq!(out.records.len(), 2);
    assert_eq!(out.records[0].task, "minimal/tsv");
    let err = host
        .parse_bytes(
            "minimal/tsv",
            "pairs.tsv",
            b"2+2\t4\nno tab\n".to_vec(),
            &ParseOptions::strict(),
        )
        .expect_err("strict");
    assert!(
        err.to_string()
            .contains("pairs.tsv:2: expected `prompt<TAB>completion`"),
        "{err}"
    );
    let eval = host
        .evaluate(
            "minimal/exact_match",
            EvalRequest::new(["4", "7"], ["4", "6"]),
        )
        .expect("evaluates");
    close(metric(&eval, "exact_match"), 0.5, "exact_match");
    assert_eq!(host.preset("minimal/tiny").expect("preset").lora.r, 4);
    assert_eq!(
        host.format("minimal/tsv")
            .expect("format")
            .default_evaluator()
            .as_deref(),
        Some("minimal/exact_match")
    );
}

/// Child half of `plugins_are_found_through_legora_plugin_path`.
#[test]
#[ignore = "run by plugins_are_found_through_legora_plugin_path in a child process"]
fn child_loads_from_env_path() {
    let mut host = PluginHost::new();
    host.use_exe_dir(false);
    let dirs = host.search_dirs();
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    let plugin = host
        .load_name("finance")
        .expect("found through LEGORA_PLUGIN_PATH");
    assert_eq!(plugin.isolation(), Some(Isolation::Process));
    assert_eq!(
        host.worker_command().expect("a worker").program(),
        Path::new(common::worker_program())
    );
}

#[test]
fn plugins_are_found_through_legora_plugin_path() {
    let dir = plugin_dir();
    let path =
        std::env::join_paths([Path::new("/nonexistent-legora-plugins"), dir]).expect("joinable");
    // the harness names a test by its module path without the crate's name
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let child = format!("{module}::child_loads_from_env_path");
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--ignored", "--exact", &child, "--test-threads=1"])
        .env(legora_plugin_host::PLUGIN_PATH_ENV, path)
        // the worker program, found through its environment variable
        .env(legora_plugin_host::WORKER_ENV, common::worker_program())
        .output()
        .expect("child runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child test failed: {}\n{stdout}",
        out.status
    );
    // a filter that matches nothing also exits 0
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the child ran no test `{child}`:\n{stdout}"
    );
}
