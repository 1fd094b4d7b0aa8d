//! Mutation fuzzing of every file parser legora-hub exposes: safetensors headers,
//! config.json, adapter_config.json, moe_config.json, tokenizer.json, chat templates and
//! GGUF headers. Each starts from real files (the fixtures) and feeds it seeded random
//! mutations: byte flips, inserted / deleted / duplicated ranges, splices, and
//! "interesting" values (huge and negative integers, NaN spellings, deep nesting)
//! written into JSON fields and binary length fields.
//!
//! Every input must come back as `Ok` or a typed `Err`: a panic fails the test, and so
//! does any single allocation above [`CAP`] (the counting allocator below refuses it and
//! counts it). `LEGORA_FUZZ_ITERS` sets the inputs per parser (default 1500: seconds in
//! CI); `bench/fuzz.sh` runs 100,000 per parser in release.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Largest single allocation a parser may make on a fuzzed input (256 MiB; the
/// fixtures are a few KiB).
const CAP: usize = 256 << 20;

static OVER_CAP: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: forwards to the system allocator; only refuses (null) sizes above CAP, which
// callers must handle as an allocation failure anyway.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            OVER_CAP.fetch_add(1, Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > CAP {
            OVER_CAP.fetch_add(1, Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn iters() -> usize {
    std::env::var("LEGORA_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

const INTERESTING: [&str; 14] = [
    "0",
    "-1",
    "1e309",
    "NaN",
    "18446744073709551615",
    "4294967296",
    "1099511627776",
    "null",
    "\"\"",
    "[]",
    "{}",
    "true",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "\"\\u0000\"",
];

/// One random mutation of `input`.
fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    let rounds = rng.random_range(1..=4);
    for _ in 0..rounds {
        let len = b.len().max(1);
        match rng.random_range(0..7) {
            0 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
            1 => {
                let i = rng.random_range(0..=b.len());
                b.insert(i, rng.random());
            }
            2 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                let n = rng.random_range(1..=(b.len() - i).min(64));
                b.drain(i..i + n);
            }
            3 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                let n = rng.random_range(1..=(b.len() - i).min(64));
                let chunk = b[i..i + n].to_vec();
                let at = rng.random_range(0..=b.len());
                b.splice(at..at, chunk);
            }
            4 => {
                // an interesting token over a number or a value
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())].as_bytes();
                let i = rng.random_range(0..len.min(b.len() + 1));
                let n = rng.random_range(0..=8).min(b.len() - i.min(b.len()));
                b.splice(i..i + n, v.iter().copied());
            }
            5 if b.len() >= 8 => {
                // a binary length field: 8 little-endian bytes of a huge value
                let i = rng.random_range(0..=b.len() - 8);
                let v: u64 = match rng.random_range(0..3) {
                    0 => u64::MAX,
                    1 => 1 << rng.random_range(20..63),
                    _ => rng.random(),
                };
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                let n = rng.random_range(0..=len.min(16));
                b.truncate(b.len().saturating_sub(n));
            }
        }
    }
    b
}

/// A JSON-aware mutation: a random field of the document set to an interesting value.
fn mutate_json(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(input) else {
        return mutate(rng, input);
    };
    if let Some(obj) = v.as_object_mut() {
        let keys: Vec<String> = obj.keys().cloned().collect();
        if !keys.is_empty() {
            let k = &keys[rng.random_range(0..keys.len())];
            let new = INTERESTING[rng.random_range(0..INTERESTING.len())];
            obj.insert(
                k.clone(),
                serde_json::from_str(new).unwrap_or(serde_json::Value::Null),
            );
        }
    }
    let out = serde_json::to_vec(&v).unwrap();
    if rng.random_bool(0.3) {
        mutate(rng, &out)
    } else {
        out
    }
}

/// Feed `iters()` mutations of `seeds` to `parse`; returns the inputs run.
fn fuzz(name: &str, seeds: &[Vec<u8>], json: bool, parse: impl Fn(&[u8])) -> usize {
    let mut rng = StdRng::seed_from_u64(0x1e60_7a00 ^ name.len() as u64);
    let n = iters();
    let over_before = OVER_CAP.load(Ordering::Relaxed);
    let mut panics = 0;
    for i in 0..n {
        let seed = &seeds[i % seeds.len()];
        let input = if json && rng.random_bool(0.5) {
            mutate_json(&mut rng, seed)
        } else {
            mutate(&mut rng, seed)
        };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(&input))).is_err() {
            panics += 1;
            let dump = std::env::temp_dir().join(format!("legora-fuzz-{name}-{i}.bin"));
            let _ = std::fs::write(&dump, &input);
            eprintln!("{name}: input {i} panicked (saved to {})", dump.display());
        }
    }
    let over = OVER_CAP.load(Ordering::Relaxed) - over_before;
    eprintln!("fuzz {name}: {n} inputs, {panics} panics, {over} allocations over {CAP} bytes");
    assert_eq!(panics, 0, "{name}: {panics} panics");
    assert_eq!(over, 0, "{name}: {over} allocations over the cap");
    n
}

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(fixtures().join(p)).unwrap()
}

/// A scratch file for parsers that take a path.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("legora-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn fuzz_safetensors() {
    let p = scratch("model.safetensors");
    let seeds = [
        read("models/mistral/model.safetensors"),
        read("models/mistral-lora-qv/adapter_model.safetensors"),
    ];
    fuzz("safetensors", &seeds, false, |b| {
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
    fuzz("config.json", &seeds, true, |b| {
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
    fuzz("adapter_config.json", &seeds, true, |b| {
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
    fuzz("moe_config.json", &[seed], true, |b| {
        let _ = serde_json::from_slice::<legora_hub::MoeConfig>(b);
    });
}

#[test]
fn fuzz_tokenizer_json() {
    let seeds = [read("models/mistral/tokenizer.json")];
    // tokenizer.json is large: fewer inputs (each parse builds the whole vocabulary)
    fuzz("tokenizer.json", &seeds, true, |b| {
        // regression: tokenizers 0.22 panicked on 13 of the first 1,500 inputs here
        // (decoders/mod.rs); legora contains it as a typed error
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
    fuzz("chat templates", &seeds, false, |b| {
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
    fuzz("gguf", &seeds, false, |b| {
        std::fs::write(&p, b).unwrap();
        let _ = legora_hub::GgufFile::open(&p);
    });
}
