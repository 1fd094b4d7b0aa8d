//! OpenAI request bodies, their checks, and the incremental text of a completion.

use std::sync::Arc;

use legora_hub::Message;
use legora_models::GenerationConfig;
use serde::Deserialize;

use crate::error::{Result, ServeError};
use crate::state::Shared;

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several (OpenAI allows up to 4).
    Many(Vec<String>),
}

/// `prompt` of `/v1/completions`: text, one-element text list, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text (special tokens are added as the tokenizer does).
    Text(String),
    /// A list of texts (only one is supported: `n` completions of one prompt).
    Texts(Vec<String>),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Debug, Clone, Deserialize)]
pub struct Sampling {
    /// Base, adapter, mixture, or `mixture/expert`.
    pub model: String,
    /// Tokens to generate at most.
    pub max_tokens: Option<u64>,
    /// The newer name of `max_tokens` (chat).
    pub max_completion_tokens: Option<u64>,
    /// 0: greedy; > 0: sampling at this temperature.
    pub temperature: Option<f64>,
    /// Nucleus mass in (0, 1].
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens (0: off).
    pub top_k: Option<u64>,
    /// CTRL repetition penalty (1: off).
    pub repetition_penalty: Option<f64>,
    /// Stop strings (not part of the returned text).
    pub stop: Option<Stop>,
    /// RNG seed of sampling.
    pub seed: Option<u64>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Stream settings.
    pub stream_options: Option<StreamOptions>,
    /// Completions per prompt (only 1).
    pub n: Option<u64>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Model and sampling fields.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Model and sampling fields.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `POST /v1/adapters`.
#[derive(Debug, Clone, Deserialize)]
pub struct LoadAdapterRequest {
    /// Its model name.
    pub name: String,
    /// A PEFT adapter folder under one of the `--adapter-dir` folders.
    pub path: String,
}

/// Parse a JSON body into `T` (a 400 naming the problem otherwise).
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body)
        .map_err(|e| ServeError::Invalid(format!("the request body is not valid: {e}")))
}

impl Sampling {
    /// The stop strings.
    pub fn stops(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }

    /// The generation config of this request: the model folder's, overridden by the
    /// fields given (as `legora generate`'s flags do), with a token budget that fits
    /// the context after `prompt_len` tokens.
    pub fn generation(&self, shared: &Shared, prompt_len: usize) -> Result<GenerationConfig> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ServeError::Invalid("`n`: only 1 is supported".into()));
        }
        let stops = self.stops();
        if stops.len() > 4 {
            return Err(ServeError::Invalid(format!(
                "`stop`: at most 4 strings, found {}",
                stops.len()
            )));
        }
        let mut g = shared.generation.clone();
        let asked = self.max_completion_tokens.or(self.max_tokens);
        let cap = shared.limits.max_tokens;
        if let Some(n) = asked {
            if n > cap as u64 {
                return Err(ServeError::Invalid(format!(
                    "`max_tokens` is {n}, the server allows at most {cap}"
                )));
            }
        }
        let room = shared.context.saturating_sub(prompt_len);
        let want = asked.map(|n| n as usize).unwrap_or_else(|| g.max_new());
        g.max_new_tokens = Some(want.min(room).min(cap));
        if self.top_k.is_some() || self.top_p.is_some() {
            g.do_sample = true;
        }
        if let Some(t) = self.temperature {
            if !(0.0..=100.0).contains(&t) {
                return Err(ServeError::Invalid(format!(
                    "`temperature` is {t}, expected a value in [0, 100]"
                )));
            }
            g.do_sample = t > 0.0;
            g.temperature = Some(t);
        }
        if let Some(k) = self.top_k {
            g.top_k = Some(k.min(shared.vocab as u64) as usize);
        }
        if let Some(p) = self.top_p {
            g.top_p = Some(p);
        }
        if let Some(r) = self.repetition_penalty {
            g.repetition_penalty = Some(r);
        }
        if let Some(s) = self.seed {
            g.seed = Some(s);
        }
        g.validate()
            .map_err(|e| ServeError::Invalid(format!("sampling settings: {e}")))?;
        Ok(g)
    }
}

/// Check a prompt's token ids against the vocabulary and the context.
pub fn check_prompt(ids: &[u32], shared: &Shared) -> Result<()> {
    if ids.is_empty() {
        return Err(ServeError::Invalid(
            "the prompt is empty after tokenization".into(),
        ));
    }
    if let Some(t) = ids.iter().find(|&&t| t as usize >= shared.vocab) {
        return Err(ServeError::Invalid(format!(
            "`prompt`: token id {t} is outside the vocabulary (vocab_size = {})",
            shared.vocab
        )));
    }
    if ids.len() >= shared.context {
        return Err(ServeError::Invalid(format!(
            "the prompt has {} tokens; the model's context is {} tokens (it must leave room \
             for at least one new token)",
            ids.len(),
            shared.context
        )));
    }
    Ok(())
}

/// The text of a completion as its tokens arrive: decoded in full each time (so
/// multi-token characters come out whole), cut at the first stop string, holding back
/// a tail that could begin one; deltas concatenate to the final text.
pub struct TextState {
    shared: Arc<Shared>,
    stops: Vec<String>,
    ids: Vec<u32>,
    sent: usize,
    text: String,
    /// A stop string was found (the text ends before it).
    pub stopped: bool,
}

impl TextState {
    /// An empty completion.
    pub fn new(shared: Arc<Shared>, stops: Vec<String>) -> Self {
        Self {
            shared,
            stops,
            ids: Vec::new(),
            sent: 0,
            text: String::new(),
            stopped: false,
        }
    }

    /// Tokens so far.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// Add a token; returns the text that is safe to send now.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let mut text = legora_hub::decode(&self.shared.tokenizer, &self.ids)?;
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
            self.stopped = true;
            self.text = text;
            return Ok(self.take(self.text.len()));
        }
        self.text = text;
        if self.text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let mut safe = self.text.len();
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if self.text.ends_with(&s[..k]) {
                    safe = safe.min(self.text.len() - k);
                }
            }
        }
        Ok(self.take(safe))
    }

    /// The rest of the text, at the end.
    pub fn finish(&mut self) -> String {
        self.take(self.text.len())
    }

    /// The whole text.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take(&mut self, upto: usize) -> String {
        if upto <= self.sent || !self.text.is_char_boundary(upto) {
            return String::new();
        }
        // A later decode may rewrite earlier text; then only what still extends
        // what was sent goes out.
        match self.text.get(self.sent..upto) {
            Some(d) => {
                let d = d.to_string();
                self.sent = upto;
                d
            }
            None => String::new(),
        }
    }
}
