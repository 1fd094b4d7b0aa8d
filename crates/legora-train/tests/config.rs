//! Run-file parsing: defaults, resolution, and errors that name key and line.

use super::common;

use std::path::{Path, PathBuf};

use common::tmp_dir;
use legora_train::*;

/// A valid run file (line numbers matter to the tests below: keep them in sync).
const GOOD: &str = r#"name = "demo"
seed = 7

[model]
path = "model"
template = "chatml"
max_seq_len = 128

[data]
mixing = "temperature"
temperature = 2.0

[[tasks]]
name = "medical"
format = "medical/alpaca"
train = "data/med.json"

[[tasks]]
name = "finance"
format = "finance/alpaca"
train = "data/fin.json"
eval = "data/fin-eval.json"
params = { choices = ["yes", "no"] }

[lora]
r = 4
lora_alpha = 8
target_modules = ["q_proj", "k_proj", "v_proj"]

[moe]
top_k = 1
routing_strategy = "switch"

[stages.experts]
learning_rate = 3e-4
num_train_epochs = 2
batch_size = 4
warmup_ratio = 0.1
lr_scheduler_type = "linear"

[stages.router]
max_steps = 50
experts = "joint"
routing_loss_coef = 0.1
"#;

fn setup(name: &str) -> PathBuf {
    let d = tmp_dir(name);
    std::fs::create_dir_all(d.join("data")).unwrap();
    std::fs::create_dir_all(d.join("model")).unwrap();
    for f in ["med.json", "fin.json", "fin-eval.json"] {
        std::fs::write(d.join("data").join(f), "[]").unwrap();
    }
    d
}

fn parse(dir: &Path, text: &str) -> Result<RunConfig> {
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    RunConfig::load(&p)
}

/// Replace the first occurrence of `from` in GOOD.
fn edit(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from}");
    GOOD.replacen(from, to, 1)
}

fn config_err(e: TrainError) -> (Option<usize>, String, String) {
    match e {
        TrainError::Config {
            line, key, message, ..
        } => (line, key, message),
        other => panic!("expected a config error, got {other}"),
    }
}

#[test]
fn good_file_resolves_with_defaults() {
    let _serial = crate::common::serial();
    let d = setup("cfg-good");
    let c = parse(&d, GOOD).unwrap();
    assert_eq!(c.name(), "demo");
    assert_eq!(c.output_dir(), d.join("runs").join("demo"));
    assert_eq!(c.train_file(1), d.join("data/fin.json"));
    assert_eq!(c.eval_file(0), None);
    assert_eq!(c.task_names(), ["medical", "finance"]);
    assert_eq!(c.check_model_path().unwrap(), d.join("model"));
    assert_eq!(c.template().unwrap().name(), "chatml");
    assert_eq!(
        c.mixing(),
        legora_data::Mixing::Temperature { temperature: 2.0 }
    );
    let lora = c.lora_config();
    assert_eq!((lora.r, lora.lora_alpha), (4, 8.0));
    let router = c.router_config();
    assert_eq!(router.num_experts, 2);
    assert_eq!(router.routing_strategy, legora_nn::RoutingStrategy::Switch);
    assert_eq!(router.router_pooling, legora_nn::RouterPooling::Token);
    assert!(!c.file.data.pad_per_task);
    assert_eq!(
        c.file.tasks[1].params["choices"],
        serde_json::json!(["yes", "no"])
    );
    // 2 epochs of 25 batches = 50 steps, warmup ceil(0.1·50) = 5
    let e = c.train_settings(StageKind::Experts, 25).unwrap();
    assert_eq!((e.total_steps, e.warmup_steps, e.batch_size), (50, 5, 4));
    assert_eq!(e.schedule, ScheduleKind::Linear);
    assert_eq!(e.max_grad_norm, Some(1.0), "max_grad_norm defaults to 1.0");
    assert_eq!(e.seed, 7);
    let r = c.train_settings(StageKind::Router, 25).unwrap();
    assert_eq!((r.total_steps, r.learning_rate), (50, 1e-3));
    assert_eq!(r.experts, ExpertsMode::Joint);
    assert_eq!(r.routing_loss_coef, 0.1);
    assert!(c.file.stages.eval.enabled);
}

#[test]
fn unknown_key_names_key_and_line() {
    let _serial = crate::common::serial();
    let d = setup("cfg-unknown");
    let e = parse(
        &d,
        &edit("batch_size = 4\n", "batch_size = 4\nlearning_rte = 1e-3\n"),
    )
    .unwrap_err();
    let text = e.to_string();
    let (line, key, msg) = config_err(e);
    assert_eq!(line, Some(38), "{text}");
    assert_eq!(key, "stages.experts.learning_rte", "{text}");
    assert!(msg.contains("unknown field `learning_rte`"), "{text}");
    assert!(
        text.contains("run.toml:38:1: `stages.experts.learning_rte`"),
        "{text}"
    );
    // unknown key at top level and in an array of tables
    let e = parse(&d, &format!("colour = 1\n{GOOD}")).unwrap_err();
    let (line, key, _) = config_err(e);
    assert_eq!((line, key.as_str()), (Some(1), "colour"));
    let e = parse(
        &d,
        &edit(
            "train = \"data/fin.json\"",
            "train = \"data/fin.json\"\nweight = 2",
        ),
    )
    .unwrap_err();
    let (line, key, _) = config_err(e);
    assert_eq!((line, key.as_str()), (Some(22), "tasks[1].weight"));
}

#[test]
fn wrong_type_names_key_and_line() {
    let _serial = crate::common::serial();
    let d = setup("cfg-type");
    let e = parse(&d, &edit("batch_size = 4", "batch_size = \"four\"")).unwrap_err();
    let text = e.to_string();
    let (line, key, msg) = config_err(e);
    assert_eq!(line, Some(37), "{text}");
    assert_eq!(key, "stages.experts.batch_size", "{text}");
    assert!(
        msg.contains("invalid type: string \"four\", expected usize"),
        "{text}"
    );
    let e = parse(&d, &edit("r = 4", "r = 4.5")).unwrap_err();
    let text = e.to_string();
    let (line, key, _) = config_err(e);
    assert_eq!((line, key.as_str()), (Some(26), "lora.r"), "{text}");
    let e = parse(&d, &edit("experts = \"joint\"", "experts = \"sometimes\"")).unwrap_err();
    let text = e.to_string();
    let (line, key, msg) = config_err(e);
    assert_eq!(
        (line, key.as_str()),
        (Some(43), "stages.router.experts"),
        "{text}"
    );
    assert!(msg.contains("sometimes"), "{text}");
}

#[test]
fn missing_file_names_key_and_line() {
    let _serial = crate::common::serial();
    let d = setup("cfg-missing");
    std::fs::remove_file(d.join("data/fin-eval.json")).unwrap();
    let e = parse(&d, GOOD).unwrap_err();
    let text = e.to_string();
    let (line, key, msg) = config_err(e);
    assert_eq!((line, key.as_str()), (Some(22), "tasks[1].eval"), "{text}");
    assert!(
        msg.contains("expected an existing file") && msg.contains("fin-eval.json"),
        "{text}"
    );
    assert!(
        text.contains(
            "run.toml:22:8: `tasks[1].eval`: expected an existing file, found nothing at "
        ),
        "{text}"
    );
    // the run file itself
    let e = RunConfig::load(d.join("nope.toml")).unwrap_err();
    assert!(
        e.to_string().contains("nope.toml") && e.to_string().contains("No such file"),
        "{e}"
    );
    // the model folder
    std::fs::write(d.join("data/fin-eval.json"), "[]").unwrap();
    let c = parse(&d, &edit("path = \"model\"", "path = \"models/absent\"")).unwrap();
    let (line, key, _) = config_err(c.check_model_path().unwrap_err());
    assert_eq!((line, key.as_str()), (Some(5), "model.path"));
}

#[test]
fn missing_required_key_and_semantic_errors() {
    let _serial = crate::common::serial();
    let d = setup("cfg-semantic");
    let e = parse(&d, &edit("format = \"finance/alpaca\"\n", "")).unwrap_err();
    let text = e.to_string();
    let (line, key, msg) = config_err(e);
    assert_eq!(key, "tasks[1].format", "{text}");
    assert!(msg.contains("missing field `format`"), "{text}");
    // the line of the `[[tasks]]` header of the entry that lacks the key
    assert_eq!(line, Some(18), "{text}");
    // values out of range go through the same locator
    let cases = [
        ("r = 4", "r = 0", 26, "lora.r", "a rank in [1, 65536]"),
        (
            "top_k = 1\nrouting_strategy = \"switch\"",
            "top_k = 3\nrouting_strategy = \"topk\"",
            31,
            "moe.top_k",
            "num_experts (2)",
        ),
        (
            "routing_strategy = \"switch\"",
            "routing_strategy = \"mixtral\"",
            32,
            "moe.routing_strategy",
            "\"mixtral\"",
        ),
        (
            "mixing = \"temperature\"",
            "mixing = \"zipf\"",
            10,
            "data.mixing",
            "\"zipf\"",
        ),
        (
            "temperature = 2.0",
            "temperature = -1.0",
            11,
            "data.temperature",
            "> 0",
        ),
        (
            "warmup_ratio = 0.1",
            "warmup_ratio = 1.5",
            38,
            "stages.experts.warmup_ratio",
            "[0, 1]",
        ),
        (
            "lr_scheduler_type = \"linear\"",
            "lr_scheduler_type = \"step\"",
            39,
            "stages.experts.lr_scheduler_type",
            "\"step\"",
        ),
        (
            "name = \"finance\"",
            "name = \"medical\"",
            19,
            "tasks[1].name",
            "unique",
        ),
        (
            "template = \"chatml\"",
            "template = \"llama2\"",
            6,
            "model.template",
            "\"llama2\"",
        ),
        (
            "routing_strategy = \"switch\"",
            "routing_strategy = \"switch\"\nrouter_pooling = \"max\"",
            33,
            "moe.router_pooling",
            "\"prefix_mean\"",
        ),
        // a bitsandbytes setting legora does not have, at its key
        (
            "max_seq_len = 128",
            "max_seq_len = 128\n[model.quantization]\nload_in_4bit = true\n\
             bnb_4bit_quant_type = \"int3\"",
            10,
            "model.quantization.bnb_4bit_quant_type",
            "\"nf4\" or \"fp4\"",
        ),
    ];
    let e = parse(&d, &edit("r = 4", "r = 0")).unwrap_err().to_string();
    assert!(
        e.ends_with("run.toml:26:1: `lora.r`: expected a rank in [1, 65536], found 0"),
        "{e}"
    );
    for (from, to, want_line, want_key, want_msg) in cases {
        let e = parse(&d, &edit(from, to)).unwrap_err();
        let text = e.to_string();
        let (line, key, msg) = config_err(e);
        assert_eq!(
            (line, key.as_str()),
            (Some(want_line), want_key),
            "{to}: {text}"
        );
        assert!(msg.contains(want_msg), "{to}: {text}");
    }
    // router-only keys are refused in the experts stage
    let e = parse(
        &d,
        &edit("batch_size = 4", "batch_size = 4\nexperts = \"joint\""),
    )
    .unwrap_err();
    let (line, key, _) = config_err(e);
    assert_eq!((line, key.as_str()), (Some(38), "stages.experts.experts"));
    // syntax errors carry a line too
    let e = parse(&d, &edit("seed = 7", "seed = = 7")).unwrap_err();
    let (line, key, _) = config_err(e);
    assert_eq!((line, key.as_str()), (Some(2), "(syntax)"));
}

#[test]
fn the_documented_example_parses() {
    let _serial = crate::common::serial();
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/run-file.md"
    ))
    .unwrap();
    let start = doc.find("## A complete example").unwrap();
    let block = &doc[start..];
    let body = &block[block.find("```toml\n").unwrap() + 8..];
    let text = &body[..body.find("```").unwrap()];
    let d = tmp_dir("cfg-doc");
    for f in [
        "data/medical/train.json",
        "data/medical/eval.json",
        "data/finance/train.json",
    ] {
        let p = d.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "[]").unwrap();
    }
    let c = parse(&d, text).unwrap();
    assert_eq!(c.task_names(), ["medical", "finance"]);
    assert_eq!(c.output_dir(), d.join("runs/demo"));
    let e = c.train_settings(StageKind::Experts, 100).unwrap();
    assert_eq!(
        (e.total_steps, e.warmup_steps, e.eval_steps),
        (300, 9, Some(50))
    );
    let r = c.train_settings(StageKind::Router, 100).unwrap();
    assert_eq!((r.total_steps, r.experts), (200, ExpertsMode::Frozen));
}

#[test]
fn loraplus_and_lr_groups_resolve_and_bad_values_name_the_key() {
    let _serial = crate::common::serial();
    let d = setup("cfg-loraplus");
    let good = edit(
        "lr_scheduler_type = \"linear\"\n",
        "lr_scheduler_type = \"linear\"\nloraplus_lr_ratio = 16.0\nloraplus_lr_embedding = 1e-6\n\
         lr_groups = { lora_A = 0.5, router = 2.0 }\n",
    );
    let c = parse(&d, &good).unwrap();
    let e = c.train_settings(StageKind::Experts, 25).unwrap();
    assert_eq!(e.loraplus_lr_ratio, Some(16.0));
    let scales = ParamKind::ALL.map(|k| e.lr_scale(k));
    assert_eq!(scales, [0.5, 16.0, 16.0, 2.0]);
    let r = c.train_settings(StageKind::Router, 25).unwrap();
    assert_eq!(ParamKind::ALL.map(|k| r.lr_scale(k)), [1.0; 4]);

    let bad = [
        (
            "loraplus_lr_ratio = 0.0",
            "stages.experts.loraplus_lr_ratio",
            "> 0",
        ),
        (
            "loraplus_lr_ratio = -2.0",
            "stages.experts.loraplus_lr_ratio",
            "> 0",
        ),
        (
            "loraplus_lr_ratio = nan",
            "stages.experts.loraplus_lr_ratio",
            "NaN",
        ),
        (
            "loraplus_lr_embedding = 1e-4",
            "stages.experts.loraplus_lr_embedding",
            "0.0001",
        ),
        (
            "lr_groups = { lora_C = 2.0 }",
            "stages.experts.lr_groups.lora_C",
            "unknown field",
        ),
        (
            "lr_groups = { lora_B = 0.0 }",
            "stages.experts.lr_groups.lora_B",
            "> 0",
        ),
        (
            "loraplus_lr_ratio = 4.0\nlr_groups = { lora_B = 8.0 }",
            "stages.experts.lr_groups.lora_B",
            "found both",
        ),
    ];
    for (line, want_key, want_msg) in bad {
        let text = edit("lr_scheduler_type = \"linear\"\n", &format!("{line}\n"));
        let e = parse(&d, &text).unwrap_err();
        let shown = e.to_string();
        let (at, key, msg) = config_err(e);
        assert_eq!(key, want_key, "{line}: {shown}");
        assert!(msg.contains(want_msg), "{line}: {shown}");
        assert!(at.is_some(), "{line}: {shown}");
    }
}
