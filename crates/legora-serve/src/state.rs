//! What the HTTP handlers and the engine share: settings, the tokenizer, the model list
//! and the metrics (Prometheus text format).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Mutex, RwLock};

use legora_hub::{ChatTemplate, Tokenizer};
use legora_models::GenerationConfig;

use crate::engine::Command;

/// Limits and settings of the HTTP side.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bearer token every request but `/health` must carry.
    pub api_key: Option<String>,
    /// Request bodies above this many bytes get 413.
    pub max_body_bytes: usize,
    /// Requests waiting for a seat at most; beyond, 429.
    pub max_queue: usize,
    /// `max_tokens` above this gets 400.
    pub max_tokens: usize,
    /// Folders `POST /v1/adapters` may load from (canonical).
    pub adapter_dirs: Vec<PathBuf>,
}

/// State shared by the handlers and the engine.
pub struct Shared {
    /// Limits of the HTTP side.
    pub limits: Limits,
    /// The base model's tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, if any.
    pub chat_template: Option<ChatTemplate>,
    /// The model folder's generation config (request fields override it).
    pub generation: GenerationConfig,
    /// `max_position_embeddings`.
    pub context: usize,
    /// `vocab_size`.
    pub vocab: usize,
    /// Model names and kinds, as the engine last published them.
    pub models: RwLock<Vec<(String, &'static str)>>,
    /// Counters.
    pub metrics: Metrics,
    /// The engine's inbox.
    pub tx: Mutex<Sender<Command>>,
    /// Unix time the server started (the `created` of `/v1/models`).
    pub created: u64,
}

impl Shared {
    /// Send a command to the engine.
    pub fn send(&self, cmd: Command) -> crate::Result<()> {
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(cmd)
            .map_err(|_| crate::ServeError::EngineStopped)
    }
}

/// A histogram with fixed upper bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            inner: Mutex::new((vec![0; bounds.len()], 0.0, 0)),
        }
    }

    /// Record one observation.
    pub fn observe(&self, x: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in self.bounds.iter().enumerate() {
            if x <= *b {
                g.0[i] += 1;
            }
        }
        g.1 += x;
        g.2 += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&g.0) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", g.2);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", g.1, g.2);
    }
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Requests answered, by route and status.
    pub requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub completion_tokens: AtomicU64,
    /// Requests waiting for a seat.
    pub queue: AtomicU64,
    /// Running sequences.
    pub active: AtomicU64,
    /// Adapters and mixtures loaded.
    pub adapters: AtomicU64,
    /// Sequences freed, by reason (`finished`, `closed`, `error`).
    pub freed: Mutex<BTreeMap<&'static str, u64>>,
    /// Engine steps.
    pub steps: AtomicU64,
    /// Sequences per step.
    pub batch_seqs: Histogram,
    /// New tokens per step.
    pub batch_tokens: Histogram,
    /// Time to first token.
    pub ttft: Histogram,
    /// Time between tokens of one stream.
    pub itl: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            queue: AtomicU64::new(0),
            active: AtomicU64::new(0),
            adapters: AtomicU64::new(0),
            freed: Mutex::default(),
            steps: AtomicU64::new(0),
            batch_seqs: Histogram::new(BATCH_BOUNDS),
            batch_tokens: Histogram::new(BATCH_BOUNDS),
            ttft: Histogram::new(LATENCY_BOUNDS),
            itl: Histogram::new(LATENCY_BOUNDS),
        }
    }
}

impl Metrics {
    /// Count a freed sequence.
    pub fn freed(&self, reason: &'static str) {
        *self
            .freed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// Count an answered request.
    pub fn request(&self, route: &str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    /// Record one engine step.
    pub fn record_step(&self, seqs: usize, tokens: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.batch_seqs.observe(seqs as f64);
        self.batch_tokens.observe(tokens as f64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP legora_requests_total Requests answered.\n# TYPE legora_requests_total counter"
        );
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "legora_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let counters = [
            (
                "legora_prompt_tokens_total",
                "Prompt tokens of admitted requests.",
                &self.prompt_tokens,
            ),
            (
                "legora_completion_tokens_total",
                "Tokens generated.",
                &self.completion_tokens,
            ),
            ("legora_steps_total", "Batched forward steps.", &self.steps),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let gauges = [
            (
                "legora_queue_depth",
                "Requests waiting for a seat.",
                &self.queue,
            ),
            (
                "legora_active_sequences",
                "Sequences in the running batch.",
                &self.active,
            ),
            (
                "legora_adapters_loaded",
                "Adapters and mixtures loaded.",
                &self.adapters,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# HELP legora_sequences_freed_total Sequences freed, by reason.\n\
             # TYPE legora_sequences_freed_total counter"
        );
        for (why, n) in self.freed.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(s, "legora_sequences_freed_total{{reason=\"{why}\"}} {n}");
        }
        self.batch_seqs
            .write(&mut s, "legora_batch_sequences", "Sequences per step.");
        self.batch_tokens
            .write(&mut s, "legora_batch_tokens", "New tokens per step.");
        self.ttft.write(
            &mut s,
            "legora_time_to_first_token_seconds",
            "Time to first token.",
        );
        self.itl.write(
            &mut s,
            "legora_inter_token_latency_seconds",
            "Time between tokens of one request.",
        );
        s
    }
}
