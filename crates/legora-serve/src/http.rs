//! The HTTP routes (axum): OpenAI's completions, chat completions and models list, SSE
//! streaming, adapters at run time, `/health` and `/metrics`.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use futures_util::stream::{self, Stream};
use legora_models::GenerationConfig;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::api::{self, ChatRequest, CompletionRequest, LoadAdapterRequest, Prompt, TextState};
use crate::engine::{Command, Event, FinishReason, GenRequest};
use crate::error::{Result, ServeError};
use crate::state::Shared;

type St = State<Arc<Shared>>;

/// The routes over `shared`.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/adapters", post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .fallback(not_found)
        .with_state(shared)
}

/// OpenAI's error object with `status`.
fn error_response(route: &str, shared: &Shared, e: &ServeError) -> Response {
    let (status, kind) = e.status();
    shared.metrics.request(route, status);
    let code = match status {
        401 => json!("invalid_api_key"),
        404 => json!("model_not_found"),
        413 => json!("request_too_large"),
        429 => json!("rate_limit_exceeded"),
        _ => Value::Null,
    };
    let body =
        json!({"error": {"message": e.to_string(), "type": kind, "param": null, "code": code}});
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn json_response(route: &str, shared: &Shared, v: Value) -> Response {
    shared.metrics.request(route, 200);
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// 401 unless the request carries the server's key (when it has one).
fn check_key(shared: &Shared, headers: &HeaderMap) -> Result<()> {
    let Some(key) = &shared.limits.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => Err(ServeError::Unauthorized("the API key is not valid".into())),
        None => Err(ServeError::Unauthorized(
            "no API key: send `Authorization: Bearer <key>`".into(),
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The body, at most `max_body_bytes`.
async fn read_body(shared: &Shared, body: Body) -> Result<axum::body::Bytes> {
    let cap = shared.limits.max_body_bytes;
    axum::body::to_bytes(body, cap)
        .await
        .map_err(|_| ServeError::TooLarge(format!("the request body is over {cap} bytes")))
}

async fn health() -> &'static str {
    "ok"
}

async fn not_found(State(s): St) -> Response {
    error_response(
        "other",
        &s,
        &ServeError::NotFound(
            "no such route (see /v1/models, /v1/completions, \
             /v1/chat/completions, /v1/adapters, /health, /metrics)"
                .into(),
        ),
    )
}

async fn metrics(State(s): St, headers: HeaderMap) -> Response {
    if let Err(e) = check_key(&s, &headers) {
        return error_response("/metrics", &s, &e);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn models(State(s): St, headers: HeaderMap) -> Response {
    if let Err(e) = check_key(&s, &headers) {
        return error_response("/v1/models", &s, &e);
    }
    let data: Vec<Value> = s
        .models
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(id, kind)| {
            json!({"id": id, "object": "model", "created": s.created, "owned_by": "legora",
                   "kind": kind})
        })
        .collect();
    json_response("/v1/models", &s, json!({"object": "list", "data": data}))
}

/// Which endpoint a generation answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn route(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        }
    }
}

async fn chat(State(s): St, headers: HeaderMap, body: Body) -> Response {
    match chat_request(&s, &headers, body).await {
        Ok((ids, req)) => generate(s, Kind::Chat, ids, req.sampling).await,
        Err(e) => error_response(Kind::Chat.route(), &s, &e),
    }
}

async fn chat_request(
    s: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Vec<u32>, ChatRequest)> {
    check_key(s, headers)?;
    let req: ChatRequest = api::parse(&read_body(s, body).await?)?;
    if req.messages.is_empty() {
        return Err(ServeError::Invalid("`messages` is empty".into()));
    }
    let template = s.chat_template.as_ref().ok_or_else(|| {
        ServeError::Invalid(
            "the model has no chat template: use /v1/completions with a prompt".into(),
        )
    })?;
    let text = template.render(&req.messages, true)?;
    // The rendered template holds its special tokens (no BOS added again).
    let ids = legora_hub::encode(&s.tokenizer, &text, false)?;
    Ok((ids, req))
}

async fn completions(State(s): St, headers: HeaderMap, body: Body) -> Response {
    match completion_request(&s, &headers, body).await {
        Ok((ids, req)) => generate(s, Kind::Completion, ids, req.sampling).await,
        Err(e) => error_response(Kind::Completion.route(), &s, &e),
    }
}

async fn completion_request(
    s: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Vec<u32>, CompletionRequest)> {
    check_key(s, headers)?;
    let req: CompletionRequest = api::parse(&read_body(s, body).await?)?;
    let ids = match &req.prompt {
        Prompt::Text(t) => legora_hub::encode(&s.tokenizer, t, true)?,
        Prompt::Texts(v) if v.len() == 1 => legora_hub::encode(&s.tokenizer, &v[0], true)?,
        Prompt::Texts(v) => {
            return Err(ServeError::Invalid(format!(
                "`prompt`: one prompt per request is supported, found {}",
                v.len()
            )))
        }
        Prompt::Tokens(t) => t.clone(),
    };
    Ok((ids, req))
}

/// Everything a response needs besides the tokens.
struct Job {
    shared: Arc<Shared>,
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    prompt_tokens: usize,
    stops: Vec<String>,
    /// Shared with the engine's [`GenRequest::stop_matched`].
    stop_matched: Arc<AtomicBool>,
    include_usage: bool,
    start: Instant,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Check, queue, and answer (whole or streamed).
async fn generate(s: Arc<Shared>, kind: Kind, ids: Vec<u32>, sampling: api::Sampling) -> Response {
    let start = Instant::now();
    let checked = api::check_prompt(&ids, &s)
        .and_then(|_| sampling.generation(&s, ids.len()))
        .and_then(|g| {
            let known = s
                .models
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|(n, _)| *n == sampling.model);
            if known {
                Ok(g)
            } else {
                Err(ServeError::NotFound(format!(
                    "the model `{}` does not exist (see GET /v1/models)",
                    sampling.model
                )))
            }
        });
    let gen: GenerationConfig = match checked {
        Ok(g) => g,
        Err(e) => return error_response(kind.route(), &s, &e),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let stop_matched = Arc::new(AtomicBool::new(false));
    let request = GenRequest {
        model: sampling.model.clone(),
        prompt: ids.clone(),
        gen,
        events: tx,
        stop_matched: stop_matched.clone(),
    };
    if let Err(e) = enqueue(&s, request) {
        return error_response(kind.route(), &s, &e);
    }
    s.metrics
        .prompt_tokens
        .fetch_add(ids.len() as u64, Ordering::Relaxed);
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let job = Job {
        shared: s.clone(),
        kind,
        id: match kind {
            Kind::Chat => format!("chatcmpl-{n}"),
            Kind::Completion => format!("cmpl-{n}"),
        },
        model: sampling.model.clone(),
        created: now(),
        prompt_tokens: ids.len(),
        stops: sampling.stops(),
        stop_matched,
        include_usage: sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
        start,
    };
    if sampling.stream {
        s.metrics.request(kind.route(), 200);
        stream_response(job, rx).into_response()
    } else {
        whole_response(job, rx).await
    }
}

/// Put a request in the engine's queue (429 when it is full).
fn enqueue(s: &Shared, request: GenRequest) -> Result<()> {
    let q = &s.metrics.queue;
    let cap = s.limits.max_queue as u64;
    if q.fetch_add(1, Ordering::Relaxed) >= cap {
        q.fetch_sub(1, Ordering::Relaxed);
        return Err(ServeError::Busy(format!(
            "the server is at capacity ({cap} requests waiting); retry later"
        )));
    }
    let r = s.send(Command::Generate(Box::new(request)));
    if r.is_err() {
        q.fetch_sub(1, Ordering::Relaxed);
    }
    r
}

/// Timing of one request's tokens (TTFT, inter-token latency).
struct Clock {
    last: Option<Instant>,
}

impl Clock {
    fn tick(&mut self, job: &Job) {
        let now = Instant::now();
        let m = &job.shared.metrics;
        match self.last {
            None => m.ttft.observe((now - job.start).as_secs_f64()),
            Some(t) => m.itl.observe((now - t).as_secs_f64()),
        }
        m.completion_tokens.fetch_add(1, Ordering::Relaxed);
        self.last = Some(now);
    }
}

fn usage(job: &Job, completion: usize) -> Value {
    json!({"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
           "total_tokens": job.prompt_tokens + completion})
}

async fn whole_response(job: Job, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let s = job.shared.clone();
    let mut text = TextState::new(s.clone(), job.stops.clone());
    let mut clock = Clock { last: None };
    let reason = loop {
        match rx.recv().await {
            Some(Event::Token(t)) => {
                clock.tick(&job);
                if let Err(e) = text.push(t) {
                    return error_response(job.kind.route(), &s, &e);
                }
                if text.stopped {
                    job.stop_matched.store(true, Ordering::Relaxed);
                    break FinishReason::Stop;
                }
            }
            Some(Event::Done(r)) => break r,
            Some(Event::Error(e)) => return error_response(job.kind.route(), &s, &e),
            None => return error_response(job.kind.route(), &s, &ServeError::EngineStopped),
        }
    };
    drop(rx);
    let content = text.text().to_string();
    let choice = match job.kind {
        Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": content},
                             "logprobs": null, "finish_reason": reason.as_str()}),
        Kind::Completion => json!({"index": 0, "text": content, "logprobs": null,
                                   "finish_reason": reason.as_str()}),
    };
    let object = match job.kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    let body = json!({"id": job.id, "object": object, "created": job.created,
                      "model": job.model, "choices": [choice],
                      "usage": usage(&job, text.tokens())});
    json_response(job.kind.route(), &s, body)
}

/// One streamed chunk.
fn chunk(job: &Job, delta: Option<&str>, first: bool, reason: Option<FinishReason>) -> SseEvent {
    let reason = reason.map(FinishReason::as_str);
    let v = match job.kind {
        Kind::Chat => {
            let mut d = serde_json::Map::new();
            if first {
                d.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = delta {
                d.insert("content".into(), json!(t));
            }
            json!({"id": job.id, "object": "chat.completion.chunk", "created": job.created,
                   "model": job.model,
                   "choices": [{"index": 0, "delta": d, "logprobs": null, "finish_reason": reason}]})
        }
        Kind::Completion => json!({"id": job.id, "object": "text_completion",
            "created": job.created, "model": job.model,
            "choices": [{"index": 0, "text": delta.unwrap_or(""), "logprobs": null,
                         "finish_reason": reason}]}),
    };
    SseEvent::default().data(v.to_string())
}

/// The state of a streamed response.
struct Streaming {
    job: Job,
    rx: mpsc::UnboundedReceiver<Event>,
    clock: Clock,
    text: TextState,
    sent: bool,
    /// Events ready to go out, in order.
    out: std::collections::VecDeque<SseEvent>,
    done: bool,
}

fn stream_response(
    job: Job,
    rx: mpsc::UnboundedReceiver<Event>,
) -> Sse<impl Stream<Item = std::result::Result<SseEvent, Infallible>>> {
    let st = Streaming {
        text: TextState::new(job.shared.clone(), job.stops.clone()),
        job,
        rx,
        clock: Clock { last: None },
        sent: false,
        out: Default::default(),
        done: false,
    };
    let s = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.out.pop_front() {
                return Some((Ok(e), st));
            }
            if st.done {
                return None;
            }
            st.advance().await;
        }
    });
    Sse::new(s).keep_alive(KeepAlive::default())
}

impl Streaming {
    /// Wait for the next engine event and turn it into chunks.
    async fn advance(&mut self) {
        let ev = self.rx.recv().await;
        let finish = |st: &mut Self, reason: FinishReason| {
            let rest = st.text.finish();
            if !rest.is_empty() || !st.sent {
                st.out
                    .push_back(chunk(&st.job, Some(&rest), !st.sent, None));
                st.sent = true;
            }
            st.out.push_back(chunk(&st.job, None, false, Some(reason)));
            if st.job.include_usage {
                let object = match st.job.kind {
                    Kind::Chat => "chat.completion.chunk",
                    Kind::Completion => "text_completion",
                };
                let v = json!({"id": st.job.id, "object": object, "created": st.job.created,
                    "model": st.job.model, "choices": [],
                    "usage": usage(&st.job, st.text.tokens())});
                st.out.push_back(SseEvent::default().data(v.to_string()));
            }
            st.out.push_back(SseEvent::default().data("[DONE]"));
            st.done = true;
        };
        match ev {
            Some(Event::Token(t)) => {
                self.clock.tick(&self.job);
                match self.text.push(t) {
                    Ok(delta) => {
                        if self.text.stopped {
                            self.job.stop_matched.store(true, Ordering::Relaxed);
                            finish(self, FinishReason::Stop);
                            self.rx.close();
                        } else if !delta.is_empty() {
                            let first = !self.sent;
                            self.out
                                .push_back(chunk(&self.job, Some(&delta), first, None));
                            self.sent = true;
                        }
                    }
                    Err(e) => self.fail(&e),
                }
            }
            Some(Event::Done(r)) => finish(self, r),
            Some(Event::Error(e)) => self.fail(&e),
            None => self.fail(&ServeError::EngineStopped),
        }
    }

    fn fail(&mut self, e: &ServeError) {
        let (_, kind) = e.status();
        let v = json!({"error": {"message": e.to_string(), "type": kind, "param": null,
                                 "code": null}});
        self.out.push_back(SseEvent::default().data(v.to_string()));
        self.out.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
        self.rx.close();
    }
}

/// The canonical `path` when it lies under one of `dirs` (symlinks resolved), else why
/// not.
pub fn adapter_path(dirs: &[PathBuf], path: &str) -> Result<PathBuf> {
    let forbidden = |reason: &str| ServeError::Forbidden {
        path: PathBuf::from(path),
        reason: reason.to_string(),
    };
    if dirs.is_empty() {
        return Err(forbidden(
            "loading adapters at run time is off: start the server with --adapter-dir",
        ));
    }
    let p = Path::new(path);
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        dirs[0].join(p)
    };
    let canon = p
        .canonicalize()
        .map_err(|e| ServeError::NotFound(format!("{}: {e}", p.display())))?;
    if dirs.iter().any(|d| canon.starts_with(d)) {
        Ok(canon)
    } else {
        Err(forbidden(
            "the folder (symlinks resolved) is outside every --adapter-dir",
        ))
    }
}

async fn load_adapter(State(s): St, headers: HeaderMap, body: Body) -> Response {
    const ROUTE: &str = "/v1/adapters";
    let r = async {
        check_key(&s, &headers)?;
        let req: LoadAdapterRequest = api::parse(&read_body(&s, body).await?)?;
        let path = adapter_path(&s.limits.adapter_dirs, &req.path)?;
        let (tx, rx) = oneshot::channel();
        s.send(Command::LoadAdapter {
            name: req.name.clone(),
            path,
            reply: tx,
        })?;
        rx.await.map_err(|_| ServeError::EngineStopped)??;
        Ok::<_, ServeError>(req.name)
    }
    .await;
    match r {
        Ok(name) => json_response(
            ROUTE,
            &s,
            json!({"id": name, "object": "adapter", "loaded": true}),
        ),
        Err(e) => error_response(ROUTE, &s, &e),
    }
}

async fn unload_adapter(
    State(s): St,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Response {
    const ROUTE: &str = "/v1/adapters/{name}";
    let r = async {
        check_key(&s, &headers)?;
        let (tx, rx) = oneshot::channel();
        s.send(Command::Unload {
            name: name.clone(),
            reply: tx,
        })?;
        rx.await.map_err(|_| ServeError::EngineStopped)?
    }
    .await;
    match r {
        Ok(()) => json_response(
            ROUTE,
            &s,
            json!({"id": name, "object": "adapter", "deleted": true}),
        ),
        Err(e) => error_response(ROUTE, &s, &e),
    }
}
