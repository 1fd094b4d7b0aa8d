//! The engine: one thread owning the model, running continuous batching.
//!
//! Each iteration admits waiting requests (up to the concurrent-sequence cap), drops
//! sequences whose client went away, and runs ONE [`CausalLm::forward_packed`] over every
//! running sequence: decoding sequences feed their last token, prefilling ones the next
//! chunk of their prompt (within a per-step token budget, so a long prompt does not
//! stall the others). Each sequence samples its next token from its own logits with its
//! own settings and RNG, exactly as [`CausalLm::generate`] does for it alone.
//!
//! [`CausalLm::forward_packed`]: legora_models::CausalLm::forward_packed
//! [`CausalLm::generate`]: legora_models::CausalLm::generate

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::backend::Backend;
use legora_models::{next_token, GenerationConfig, PackedSeq, SeqCache, SeqExperts};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Result, ServeError};
use crate::registry::{Entry, EntryKind, Registry};
use crate::snapshot::Snapshot;
use crate::state::Shared;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (or, decided by the HTTP side, a stop string).
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What the engine tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// A sampled token.
    Token(u32),
    /// The sequence ended (its tokens were all sent).
    Done(FinishReason),
    /// The sequence failed.
    Error(ServeError),
}

/// A generation request, tokenized and checked by the HTTP side.
#[derive(Debug)]
pub struct GenRequest {
    /// The model name (base, adapter, mixture or `mixture/expert`).
    pub model: String,
    /// Prompt token ids (non-empty, shorter than the context).
    pub prompt: Vec<u32>,
    /// Sampling settings; `max_new_tokens` is the token budget.
    pub gen: GenerationConfig,
    /// Where the events go; a closed receiver frees the sequence.
    pub events: mpsc::UnboundedSender<Event>,
    /// Set by the HTTP side when one of the request's stop strings ended the
    /// completion: its receiver then closes because the request is done, not because
    /// the client went away.
    pub stop_matched: Arc<AtomicBool>,
}

impl GenRequest {
    /// Why a sequence whose receiver closed is freed (`/metrics`'
    /// `legora_sequences_freed_total` reason): `finished` after a stop string,
    /// `closed` when the client went away.
    fn closed_reason(&self) -> &'static str {
        match self.stop_matched.load(Ordering::Relaxed) {
            true => "finished",
            false => "closed",
        }
    }
}

/// Messages to the engine thread.
#[derive(Debug)]
pub enum Command {
    /// Generate (counted in the shared queue depth until admitted).
    Generate(Box<GenRequest>),
    /// Load a PEFT adapter folder as model `name`.
    LoadAdapter {
        /// Its model name.
        name: String,
        /// The folder (already checked against `--adapter-dir`).
        path: PathBuf,
        /// The outcome.
        reply: oneshot::Sender<Result<()>>,
    },
    /// Unload a run-time loaded adapter.
    Unload {
        /// Its model name.
        name: String,
        /// The outcome.
        reply: oneshot::Sender<Result<()>>,
    },
    /// Stop the engine.
    Shutdown,
}

/// One running sequence.
struct Seq<B: Backend> {
    req: GenRequest,
    experts: SeqExperts,
    cache: SeqCache<B>,
    /// Prompt then generated tokens.
    seen: Vec<u32>,
    /// Prompt tokens already in the cache.
    fed: usize,
    generated: usize,
    max_new: usize,
    stops: Vec<u32>,
    rng: StdRng,
}

impl<B: Backend> Seq<B> {
    fn prefilling(&self) -> bool {
        self.fed < self.req.prompt.len()
    }
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Running sequences at most.
    pub max_seqs: usize,
    /// New tokens of one step at most (decoding rows count one each).
    pub step_tokens: usize,
    /// Prompt tokens of one sequence in one step at most.
    pub prefill_chunk: usize,
    /// Bytes of run-time loaded adapters at most (least recently used evicted first).
    pub adapter_memory: usize,
}

/// The engine thread's state.
pub struct Engine<B: Backend> {
    registry: Registry<B>,
    rx: Receiver<Command>,
    shared: Arc<Shared>,
    cfg: EngineConfig,
    waiting: VecDeque<GenRequest>,
    active: Vec<Seq<B>>,
    tick: u64,
}

impl<B: Backend> Engine<B> {
    /// An engine over `registry`, fed by `rx`.
    pub fn new(
        registry: Registry<B>,
        rx: Receiver<Command>,
        shared: Arc<Shared>,
        cfg: EngineConfig,
    ) -> Self {
        let engine = Self {
            registry,
            rx,
            shared,
            cfg,
            waiting: VecDeque::new(),
            active: Vec::new(),
            tick: 0,
        };
        engine.publish_models();
        engine
    }

    /// Run until [`Command::Shutdown`] or every sender is gone.
    pub fn run(mut self) {
        loop {
            if !self.receive() {
                break;
            }
            self.admit();
            self.drop_closed();
            if !self.active.is_empty() {
                self.step();
            }
            self.shared
                .metrics
                .active
                .store(self.active.len() as u64, Ordering::Relaxed);
        }
        for s in self.active.drain(..) {
            let _ = s.req.events.send(Event::Error(ServeError::EngineStopped));
        }
    }

    /// Take every pending command (blocking while there is nothing to do). `false`:
    /// stop.
    fn receive(&mut self) -> bool {
        loop {
            let idle = self.active.is_empty() && self.waiting.is_empty();
            let cmd = if idle {
                match self.rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return false,
                }
            } else {
                match self.rx.try_recv() {
                    Ok(c) => c,
                    Err(std::sync::mpsc::TryRecvError::Empty) => return true,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
                }
            };
            match cmd {
                Command::Generate(r) => self.waiting.push_back(*r),
                Command::LoadAdapter { name, path, reply } => {
                    let _ = reply.send(self.load_adapter(&name, &path));
                }
                Command::Unload { name, reply } => {
                    let _ = reply.send(self.unload(&name));
                }
                Command::Shutdown => return false,
            }
        }
    }

    /// Move waiting requests into the running batch while there is room.
    fn admit(&mut self) {
        while self.active.len() < self.cfg.max_seqs {
            let Some(req) = self.waiting.pop_front() else {
                break;
            };
            self.shared.metrics.queue.fetch_sub(1, Ordering::Relaxed);
            if req.events.is_closed() {
                self.shared.metrics.freed(req.closed_reason());
                continue;
            }
            match self.registry.resolve(&req.model) {
                Ok(experts) => {
                    self.registry.touch(&req.model, self.tick);
                    let gen = &req.gen;
                    let seq = Seq {
                        experts,
                        cache: self.registry.model.new_seq_cache(),
                        seen: req.prompt.clone(),
                        fed: 0,
                        generated: 0,
                        max_new: gen.max_new(),
                        stops: gen.stop_tokens(),
                        rng: StdRng::seed_from_u64(gen.seed.unwrap_or(0)),
                        req,
                    };
                    if seq.max_new == 0 {
                        let _ = seq.req.events.send(Event::Done(FinishReason::Length));
                        continue;
                    }
                    self.active.push(seq);
                }
                Err(e) => {
                    let _ = req.events.send(Event::Error(e));
                    self.shared.metrics.freed("error");
                }
            }
        }
    }

    /// Free the sequences whose client went away.
    fn drop_closed(&mut self) {
        let metrics = &self.shared.metrics;
        self.active.retain(|s| {
            let open = !s.req.events.is_closed();
            if !open {
                metrics.freed(s.req.closed_reason());
            }
            open
        });
    }

    /// One packed forward over every running sequence, then one token for each that
    /// asked for logits.
    fn step(&mut self) {
        self.tick += 1;
        let mut budget = self.cfg.step_tokens.max(1);
        // (index into active, tokens range in `seen`, wants logits)
        let mut plan: Vec<(usize, std::ops::Range<usize>, bool)> = Vec::new();
        for (i, s) in self.active.iter().enumerate() {
            if !s.prefilling() && budget > 0 {
                plan.push((i, s.seen.len() - 1..s.seen.len(), true));
                budget -= 1;
            }
        }
        for (i, s) in self.active.iter().enumerate() {
            if s.prefilling() && budget > 0 {
                let n = (s.req.prompt.len() - s.fed)
                    .min(self.cfg.prefill_chunk.max(1))
                    .min(budget);
                plan.push((i, s.fed..s.fed + n, s.fed + n == s.req.prompt.len()));
                budget -= n;
            }
        }
        plan.sort_by_key(|p| p.0);
        let rows: usize = plan.iter().map(|p| p.1.len()).sum();
        self.shared.metrics.record_step(plan.len(), rows);
        let result = {
            let mut seqs = Vec::with_capacity(plan.len());
            let mut caches = Vec::with_capacity(plan.len());
            let mut next = plan.iter().peekable();
            for (i, s) in self.active.iter_mut().enumerate() {
                if let Some((_, range, logits)) = next.next_if(|p| p.0 == i) {
                    let Seq {
                        seen,
                        cache,
                        experts,
                        ..
                    } = s;
                    seqs.push(PackedSeq {
                        tokens: &seen[range.clone()],
                        experts: *experts,
                        logits: *logits,
                    });
                    caches.push(cache);
                }
            }
            self.registry
                .model
                .forward_packed(&seqs, &mut caches, &self.registry.groups)
                .and_then(|l| {
                    let v = l.dims()[1];
                    l.into_data()
                        .convert::<f32>()
                        .into_vec::<f32>()
                        .map(|h| (h, v))
                        .map_err(|e| {
                            legora_models::ModelError::InvalidState(format!(
                                "reading logits: {e:?}"
                            ))
                        })
                })
        };
        match result {
            Ok((host, vocab)) => self.sample(&plan, &host, vocab),
            Err(e) => {
                let msg = e.to_string();
                let failed: Vec<usize> = plan.iter().map(|p| p.0).collect();
                for &i in failed.iter().rev() {
                    let s = self.active.remove(i);
                    let _ = s
                        .req
                        .events
                        .send(Event::Error(ServeError::Invalid(msg.clone())));
                    self.shared.metrics.freed("error");
                }
            }
        }
    }

    /// Advance the planned sequences; sample where logits came back; remove the
    /// finished ones.
    fn sample(&mut self, plan: &[(usize, std::ops::Range<usize>, bool)], host: &[f32], v: usize) {
        let mut row = 0;
        let mut finished = Vec::new();
        for (i, range, logits) in plan {
            let s = &mut self.active[*i];
            if s.prefilling() {
                s.fed += range.len();
            }
            if !*logits {
                continue;
            }
            let mut l = host[row * v..(row + 1) * v].to_vec();
            row += 1;
            let t = next_token(&mut l, &s.seen, &s.req.gen, &mut s.rng);
            s.seen.push(t);
            s.generated += 1;
            if s.req.events.send(Event::Token(t)).is_err() {
                finished.push((*i, s.req.closed_reason()));
                continue;
            }
            let reason = if s.stops.contains(&t) {
                Some(FinishReason::Stop)
            } else if s.generated >= s.max_new {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(r) = reason {
                let _ = s.req.events.send(Event::Done(r));
                finished.push((*i, "finished"));
            }
        }
        for (i, why) in finished.into_iter().rev() {
            self.active.remove(i);
            self.shared.metrics.freed(why);
        }
    }

    fn load_adapter(&mut self, name: &str, path: &Path) -> Result<()> {
        // From a private copy: what is read is what was checked (see `snapshot`).
        let cap = self.cfg.adapter_memory as u64;
        let snap = Snapshot::take(&self.shared.limits.adapter_dirs, path, cap)?;
        let mut entry = Entry::adapter(self.registry.base(), name, snap.dir())
            .map_err(|e| snap.named_as(e, path))?;
        entry.path = path.to_path_buf();
        entry.runtime = true;
        entry.last_used = self.tick;
        self.make_room(entry.bytes)?;
        self.registry.insert(entry)?;
        self.after_rebuild();
        tracing::info!("loaded adapter `{name}` from {}", path.display());
        Ok(())
    }

    /// Evict least recently used run-time adapters that no sequence uses until `bytes`
    /// more fit under the cap.
    fn make_room(&mut self, bytes: usize) -> Result<()> {
        let cap = self.cfg.adapter_memory;
        if bytes > cap {
            return Err(ServeError::Busy(format!(
                "the adapter needs {bytes} bytes, over the adapter memory cap of {cap} bytes"
            )));
        }
        while self.registry.runtime_bytes() + bytes > cap {
            let in_use = |n: &str| {
                let head = |m: &str| m.split('/').next().unwrap_or(m).to_string();
                self.active.iter().any(|s| head(&s.req.model) == n)
                    || self.waiting.iter().any(|r| head(&r.model) == n)
            };
            let victim = self
                .registry
                .entries
                .iter()
                .filter(|e| e.runtime && e.kind == EntryKind::Adapter && !in_use(&e.name))
                .min_by_key(|e| e.last_used)
                .map(|e| e.name.clone());
            match victim {
                Some(v) => {
                    self.registry.remove(&v)?;
                    tracing::info!("evicted adapter `{v}` (adapter memory cap)");
                }
                None => {
                    return Err(ServeError::Busy(format!(
                        "the adapter memory cap ({cap} bytes) is full of adapters in use"
                    )))
                }
            }
        }
        Ok(())
    }

    fn unload(&mut self, name: &str) -> Result<()> {
        match self.registry.entries.iter().find(|e| e.name == name) {
            Some(e) if !e.runtime => {
                return Err(ServeError::Invalid(format!(
                    "`{name}` was loaded at start-up; only adapters loaded through \
                     POST /v1/adapters can be unloaded"
                )))
            }
            None => {
                return Err(ServeError::NotFound(format!(
                    "no adapter named `{name}` is loaded"
                )))
            }
            _ => {}
        }
        self.registry.remove(name)?;
        self.after_rebuild();
        tracing::info!("unloaded adapter `{name}`");
        Ok(())
    }

    /// Re-resolve the running sequences' experts (offsets move); fail those whose
    /// model is gone.
    fn after_rebuild(&mut self) {
        let mut gone = Vec::new();
        for (i, s) in self.active.iter_mut().enumerate() {
            match self.registry.resolve(&s.req.model) {
                Ok(e) => s.experts = e,
                Err(e) => {
                    let _ = s.req.events.send(Event::Error(e));
                    gone.push(i);
                }
            }
        }
        for i in gone.into_iter().rev() {
            self.active.remove(i);
            self.shared.metrics.freed("error");
        }
        self.publish_models();
    }

    fn publish_models(&self) {
        let names = self.registry.model_names();
        self.shared
            .metrics
            .adapters
            .store(self.registry.entries.len() as u64, Ordering::Relaxed);
        *self
            .shared
            .models
            .write()
            .unwrap_or_else(|e| e.into_inner()) = names;
    }
}
