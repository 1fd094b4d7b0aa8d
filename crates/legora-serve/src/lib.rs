//! # legora-serve
//!
//! An OpenAI-compatible HTTP server over one base model and any number of PEFT adapters
//! and legora mixtures, with continuous batching:
//!
//! - `POST /v1/chat/completions` (the model's chat template), `POST /v1/completions`,
//!   `GET /v1/models`; streaming as server-sent events in OpenAI's chunk format ending
//!   `data: [DONE]`; `usage` on every answer; OpenAI's error object on every failure;
//! - `model` names the base, an adapter, a mixture (routed per token by its routers) or
//!   one expert of a mixture (`mixture/expert`);
//! - one engine thread owns the model ([`engine`]): requests join and leave the running
//!   batch between steps, prompts are prefilled in chunks, and every step is ONE
//!   [`legora_models::CausalLm::forward_packed`] whose rows may each use a different
//!   adapter, the base or a mixture (all are experts of one stacked mixture per slot,
//!   [`registry`]);
//! - adapters load and unload at run time (`POST /v1/adapters`, `DELETE
//!   /v1/adapters/{name}`) from under `--adapter-dir` folders only, within a memory cap
//!   (least recently used evicted);
//! - limits: body size (413), prompt length and `max_tokens` (400), queue length (429),
//!   running sequences; an optional Bearer API key (401); `GET /health`, `GET /metrics`
//!   (Prometheus text).
//!
//! The HTTP stack is axum on tokio (hyper underneath), with HTTP/1 only and no macros.

pub mod api;
pub mod engine;
mod error;
pub mod http;
pub mod registry;
pub mod snapshot;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use burn::tensor::backend::Backend;
use legora_hub::PretrainedModel;

pub use engine::{EngineConfig, FinishReason};
pub use error::{Result, ServeError};
pub use registry::{Entry, EntryKind, Registry};
pub use state::{Limits, Metrics, Shared};

/// Everything [`start`] needs besides the model.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to bind (`127.0.0.1:0` picks a free port).
    pub addr: SocketAddr,
    /// The base model's name in the API (default: its folder's name).
    pub base_name: Option<String>,
    /// PEFT adapter folders loaded at start-up, by name.
    pub adapters: Vec<(String, PathBuf)>,
    /// Mixture folders loaded at start-up, by name.
    pub mixtures: Vec<(String, PathBuf)>,
    /// HTTP limits (adapter folders are canonicalized by [`start`]).
    pub limits: Limits,
    /// Batching settings.
    pub engine: EngineConfig,
}

impl ServeOptions {
    /// Defaults: loopback on `addr`, 1 MiB bodies, 64 waiting requests, 16 running
    /// sequences, 256 tokens per step in chunks of 64, 256 MiB of run-time adapters.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            base_name: None,
            adapters: Vec::new(),
            mixtures: Vec::new(),
            limits: Limits {
                api_key: None,
                max_body_bytes: 1 << 20,
                max_queue: 64,
                max_tokens: 4096,
                adapter_dirs: Vec::new(),
            },
            engine: EngineConfig {
                max_seqs: 16,
                step_tokens: 256,
                prefill_chunk: 64,
                adapter_memory: 256 << 20,
            },
        }
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<JoinHandle<Result<()>>>,
    engine: Option<JoinHandle<()>>,
}

impl Server {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The state shared by the handlers and the engine (metrics, limits).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Block until the server stops (an I/O error of the listener).
    pub fn wait(mut self) -> Result<()> {
        let r = match self.http.take() {
            Some(h) => h.join().unwrap_or(Err(ServeError::EngineStopped)),
            None => Ok(()),
        };
        self.shutdown_engine();
        r
    }

    /// Stop serving and join the threads.
    pub fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
        self.shutdown_engine();
    }

    fn shutdown_engine(&mut self) {
        let _ = self.shared.send(engine::Command::Shutdown);
        if let Some(h) = self.engine.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.shared.send(engine::Command::Shutdown);
    }
}

/// Load the start-up adapters and mixtures into `model`'s registry, bind `opts.addr`,
/// and serve on two threads (the engine, and the tokio runtime of the HTTP side).
pub fn start<B: Backend>(model: PretrainedModel<B>, mut opts: ServeOptions) -> Result<Server>
where
    B::Device: Send,
{
    let base_name = opts.base_name.clone().unwrap_or_else(|| {
        model
            .name_or_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "base".into())
    });
    let tokenizer = model.tokenizer()?.clone();
    let mut registry = Registry::new(&base_name, model.model);
    for (name, dir) in &opts.adapters {
        let e = Entry::adapter(registry.base(), name, dir)?;
        registry.insert(e)?;
    }
    for (name, dir) in &opts.mixtures {
        let e = Entry::mixture(registry.base(), name, dir)?;
        registry.insert(e)?;
    }
    let mut dirs = Vec::new();
    for d in &opts.limits.adapter_dirs {
        dirs.push(d.canonicalize().map_err(|e| ServeError::Io {
            what: format!("--adapter-dir {}", d.display()),
            source: e,
        })?);
    }
    opts.limits.adapter_dirs = dirs;
    let cfg = registry.base().config();
    let (tx, rx) = std::sync::mpsc::channel();
    let shared = Arc::new(Shared {
        limits: opts.limits.clone(),
        tokenizer,
        chat_template: model.chat_template,
        generation: model.generation_config,
        context: cfg.max_position_embeddings,
        vocab: cfg.vocab_size,
        models: RwLock::new(Vec::new()),
        metrics: Metrics::default(),
        tx: Mutex::new(tx),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    let listener = std::net::TcpListener::bind(opts.addr).map_err(|e| ServeError::Io {
        what: format!("binding {}", opts.addr),
        source: e,
    })?;
    let addr = listener.local_addr().map_err(|e| ServeError::Io {
        what: "reading the bound address".into(),
        source: e,
    })?;
    listener.set_nonblocking(true).map_err(|e| ServeError::Io {
        what: "configuring the listener".into(),
        source: e,
    })?;
    let engine = engine::Engine::new(registry, rx, shared.clone(), opts.engine.clone());
    let engine = std::thread::Builder::new()
        .name("legora-engine".into())
        .spawn(move || engine.run())
        .map_err(|e| ServeError::Io {
            what: "starting the engine thread".into(),
            source: e,
        })?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = http::router(shared.clone());
    let http = std::thread::Builder::new()
        .name("legora-http".into())
        .spawn(move || serve_http(listener, app, stop_rx))
        .map_err(|e| ServeError::Io {
            what: "starting the HTTP thread".into(),
            source: e,
        })?;
    Ok(Server {
        addr,
        shared,
        stop: Some(stop_tx),
        http: Some(http),
        engine: Some(engine),
    })
}

/// The tokio runtime of the HTTP side, until `stop` fires.
fn serve_http(
    listener: std::net::TcpListener,
    app: axum::Router,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<()> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| ServeError::Io { what, source }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .enable_time()
        .build()
        .map_err(io("starting the tokio runtime"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(io("the listener"))?;
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.await;
            })
            .await
            .map_err(io("serving"))
    })
}
