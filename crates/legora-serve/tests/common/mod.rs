//! Shared by the server tests: fixtures made with legora-hub from the demo base (two
//! PEFT adapters, a routed mixture), a server on an ephemeral loopback port, and a
//! small HTTP client (ureq) with timeouts.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::backend::Flex;
use legora_hub::{PeftModel, PretrainedModel};
use legora_models::GenerationConfig;
use legora_nn::{InitLoraWeights, LoraConfig, RouterConfig};
use legora_serve::{ServeOptions, Server};
use serde_json::Value;

pub type B = Flex;

/// The demo base model folder.
pub fn demo_base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../demo/base")
}

/// A fresh scratch folder for this test process.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("legora-serve-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn lora(r: usize, targets: &[&str]) -> LoraConfig {
    let mut c = LoraConfig::new(r, 2.0 * r as f64, targets);
    c.init_lora_weights = InitLoraWeights::Random; // B ≠ 0: the adapter changes outputs
    c
}

/// Folders `adapters/a`, `adapters/b` (PEFT) and `mix` (a routed two-expert mixture)
/// under `dir`, made against the demo base.
pub struct Fixtures {
    pub adapter_a: PathBuf,
    pub adapter_b: PathBuf,
    pub mixture: PathBuf,
}

pub fn fixtures(dir: &Path) -> Fixtures {
    let base = PretrainedModel::<B>::from_pretrained(demo_base(), &Default::default()).unwrap();
    let out = Fixtures {
        adapter_a: dir.join("adapters/a"),
        adapter_b: dir.join("adapters/b"),
        mixture: dir.join("mix"),
    };
    for (name, path, cfg) in [
        ("a", &out.adapter_a, lora(4, &["q_proj", "v_proj"])),
        ("b", &out.adapter_b, lora(2, &["gate_proj", "down_proj"])),
    ] {
        let mut m = base.model.clone();
        m.add_adapter(name, &cfg).unwrap();
        std::fs::create_dir_all(path).unwrap();
        legora_hub::save_adapter(&m, name, &cfg, path).unwrap();
    }
    let mut m = base.model.clone();
    for e in ["e0", "e1"] {
        m.add_adapter(e, &lora(2, &["up_proj", "o_proj"])).unwrap();
    }
    let rc = RouterConfig::new(2).with_top_k(1);
    m.adapters_to_mixture(&["e0", "e1"], Some(&rc)).unwrap();
    std::fs::create_dir_all(&out.mixture).unwrap();
    legora_hub::save_mixture(&m, &out.mixture, None, None).unwrap();
    out
}

/// Start a server on the demo base with the fixtures as `a`, `b` and `mix`.
pub fn server(fx: &Fixtures, tune: impl FnOnce(&mut ServeOptions)) -> Server {
    let model = PretrainedModel::<B>::from_pretrained(demo_base(), &Default::default()).unwrap();
    let mut opts = ServeOptions::new("127.0.0.1:0".parse().unwrap());
    opts.adapters = vec![
        ("a".into(), fx.adapter_a.clone()),
        ("b".into(), fx.adapter_b.clone()),
    ];
    opts.mixtures = vec![("mix".into(), fx.mixture.clone())];
    tune(&mut opts);
    legora_serve::start(model, opts).unwrap()
}

/// What `legora generate` prints for `prompt` (greedy, `max_new` tokens) with the
/// model `name` of the fixtures: the same loading and the same `CausalLm::generate`.
pub fn reference(fx: &Fixtures, name: &str, prompt: &str, chat: bool, max_new: usize) -> String {
    let device = Default::default();
    let mut base = PretrainedModel::<B>::from_pretrained(demo_base(), &device).unwrap();
    let mut task = None;
    let model = match name {
        "base" => base,
        "a" | "b" => {
            let dir = if name == "a" {
                &fx.adapter_a
            } else {
                &fx.adapter_b
            };
            PeftModel::from_pretrained(base, dir).unwrap().base
        }
        m if m.starts_with("mix") => {
            base.load_mixture(&fx.mixture).unwrap();
            task = m.strip_prefix("mix/e").map(|t| t.parse::<usize>().unwrap());
            base
        }
        other => panic!("no reference for {other}"),
    };
    let tok = model.tokenizer().unwrap();
    let ids = if chat {
        let msgs = [legora_hub::Message::new(legora_hub::Role::User, prompt)];
        let text = model.apply_chat_template(&msgs, true).unwrap();
        legora_hub::encode(tok, &text, false).unwrap()
    } else {
        legora_hub::encode(tok, prompt, true).unwrap()
    };
    let mut gen: GenerationConfig = model.generation_config.clone();
    gen.max_new_tokens = Some(max_new);
    gen.do_sample = false;
    let tasks = task.map(|t| vec![t]);
    let out = model
        .model
        .generate(&[ids], &gen, tasks.as_deref())
        .unwrap();
    model.decode(&out[0]).unwrap()
}

/// An HTTP agent with timeouts.
pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .build()
}

/// POST `body` to `path`; the status and the parsed JSON answer.
pub fn post(server: &Server, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let url = format!("http://{}{path}", server.addr());
    let mut req = agent().post(&url).set("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    finish(req.send_string(body))
}

/// GET `path`; the status and the body text.
pub fn get_text(server: &Server, path: &str, key: Option<&str>) -> (u16, String) {
    let url = format!("http://{}{path}", server.addr());
    let mut req = agent().get(&url);
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    match req.call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("GET {path}: {e}"),
    }
}

/// DELETE `path`.
pub fn delete(server: &Server, path: &str) -> (u16, Value) {
    let url = format!("http://{}{path}", server.addr());
    finish(agent().delete(&url).call())
}

fn finish(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let (code, resp) = match r {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(c, r)) => (c, r),
        Err(e) => panic!("request failed: {e}"),
    };
    let text = resp.into_string().unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (code, v)
}

/// POST a streaming request; the `data:` payloads, parsed, up to `[DONE]` (which must
/// come).
pub fn post_stream(server: &Server, path: &str, body: &str) -> Vec<Value> {
    let url = format!("http://{}{path}", server.addr());
    let resp = agent()
        .post(&url)
        .set("Content-Type", "application/json")
        .send_string(body)
        .unwrap();
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let mut out = Vec::new();
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return out;
        }
        out.push(serde_json::from_str(data).unwrap());
    }
    panic!("the stream ended without data: [DONE]");
}

/// A metric's value from `/metrics`: the last field of the first line starting with
/// `line_start` (0 when absent).
pub fn metric(server: &Server, line_start: &str) -> f64 {
    let (_, text) = get_text(server, "/metrics", None);
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}
