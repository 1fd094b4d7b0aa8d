//! tokenizer.json (through the `tokenizers` crate) and chat templates (minijinja).
//!
//! The template is read from `chat_template.jinja` (transformers ≥ 4.43 writes it there)
//! or from `chat_template` in tokenizer_config.json (a string, or a list of
//! `{name, template}` of which `default` is used), and rendered as transformers'
//! `apply_chat_template` does: `trim_blocks` and `lstrip_blocks` on, `bos_token` /
//! `eos_token` and `raise_exception` in scope, Python string methods available.

pub use legora_config::{Message, Role};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{HubError, Result};
use crate::io::read_required;

/// Load `dir/tokenizer.json`.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    let bytes = read_required(&path, "tokenizer (tokenizer.json)")?;
    tokenizer_from_bytes(&path, &bytes)
}

/// Parse tokenizer.json bytes read from `path`. The `tokenizers` crate panics on some
/// malformed files instead of returning an error (found by fuzzing: a decoder entry of
/// the wrong shape while parsing; a post-processor template naming a special token it
/// does not define, at the first encode). Parsing is contained, and a loaded tokenizer
/// must encode and decode a probe text before it is accepted, so both are reported
/// here as [`HubError::Tokenizer`] instead of failing later.
pub fn tokenizer_from_bytes(path: &Path, bytes: &[u8]) -> Result<Tokenizer> {
    let tokenizer = unpanicked(path, "parsing", || Tokenizer::from_bytes(bytes))?
        .map_err(|e| tokenizer_error(path, e))?;
    probe(&tokenizer, path)?;
    Ok(tokenizer)
}

/// Encode and decode [`PROBE_TEXT`]: a panic refuses the tokenizer; an ordinary error
/// (a vocabulary without an unknown token, say) does not, as the text a user gives
/// may well encode.
fn probe(tokenizer: &Tokenizer, path: &Path) -> Result<()> {
    let ids = unpanicked(path, "encoding", || tokenizer.encode(PROBE_TEXT, true))?
        .map(|e| e.get_ids().to_vec())
        .unwrap_or_default();
    unpanicked(path, "decoding", || tokenizer.decode(&ids, true))?.ok();
    Ok(())
}

/// The text a freshly loaded tokenizer must encode and decode without panicking.
const PROBE_TEXT: &str = "Hello, world! 123";

/// Encode `text` (with the tokenizer's special tokens, as `tokenizer(text)` does).
pub fn encode(tokenizer: &Tokenizer, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
    let path = Path::new("tokenizer.json");
    let r = unpanicked(path, "encoding", || {
        tokenizer.encode(text, add_special_tokens)
    })?;
    r.map(|e| e.get_ids().to_vec())
        .map_err(|e| tokenizer_error(path, e))
}

/// Decode ids to text (special tokens skipped).
pub fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    let path = Path::new("tokenizer.json");
    let r = unpanicked(path, "decoding", || tokenizer.decode(ids, true))?;
    r.map_err(|e| tokenizer_error(path, e))
}

/// Run a `tokenizers` call with its panic contained as [`HubError::Tokenizer`] naming
/// `path` and what was being done; the call's own result is returned as it is.
fn unpanicked<T>(path: &Path, what: &str, f: impl FnOnce() -> T) -> Result<T> {
    crate::contain_panic(f).map_err(|panic| HubError::Tokenizer {
        path: path.to_path_buf(),
        message: format!("malformed tokenizer.json ({what} failed: {panic})"),
    })
}

/// A `tokenizers` error as [`HubError::Tokenizer`] for `path`.
fn tokenizer_error(path: &Path, e: tokenizers::Error) -> HubError {
    HubError::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Instructions a chat template may execute in one render (minijinja's fuel). Real
/// templates spend a few thousand per message; a template looping for ever runs out of
/// fuel and fails with [`HubError::Template`] instead of hanging.
pub const TEMPLATE_FUEL: u64 = 10_000_000;

/// Longest rendered chat prompt, in bytes (64 MiB); longer output is refused.
pub const TEMPLATE_MAX_OUTPUT: usize = 64 << 20;

/// An `io::Write` that refuses to grow past [`TEMPLATE_MAX_OUTPUT`].
struct CappedWriter(Vec<u8>);

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > TEMPLATE_MAX_OUTPUT {
            return Err(std::io::Error::other(format!(
                "the rendered prompt is longer than {TEMPLATE_MAX_OUTPUT} bytes"
            )));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A model's chat template with the special tokens it refers to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    /// The Jinja source.
    pub source: String,
    /// `bos_token` text.
    pub bos_token: Option<String>,
    /// `eos_token` text.
    pub eos_token: Option<String>,
    /// Where it was read from.
    pub path: PathBuf,
}

/// A special token in tokenizer_config.json: a string or an `AddedToken` dict.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl ChatTemplate {
    /// Find the template of a model folder (`None` when it has none).
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            crate::io::read_json(&cfg_path, "tokenizer config")?
        } else {
            Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let (source, path) = if jinja.exists() {
            let bytes = read_required(&jinja, "chat template")?;
            let text = String::from_utf8(bytes).map_err(|e| HubError::Template {
                path: jinja.clone(),
                message: format!("not UTF-8: {e}"),
            })?;
            (text, jinja)
        } else {
            match cfg.get("chat_template") {
                Some(Value::String(s)) => (s.clone(), cfg_path.clone()),
                Some(Value::Array(list)) => {
                    let pick = list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .or_else(|| list.first())
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str());
                    match pick {
                        Some(s) => (s.to_string(), cfg_path.clone()),
                        None => return Ok(None),
                    }
                }
                _ => return Ok(None),
            }
        };
        Ok(Some(Self {
            source,
            bos_token: token_text(cfg.get("bos_token")),
            eos_token: token_text(cfg.get("eos_token")),
            path,
        }))
    }

    /// Render `messages` (transformers' `apply_chat_template(..., tokenize=False)`).
    ///
    /// Runs under [`TEMPLATE_FUEL`] and [`TEMPLATE_MAX_OUTPUT`]: a template that loops
    /// too long or writes too much is a [`HubError::Template`].
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let err = |e: minijinja::Error| HubError::Template {
            path: self.path.clone(),
            message: format!("{e:#}"),
        };
        let mut env = minijinja::Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source).map_err(err)?;
        let tmpl = env.get_template("chat").map_err(err)?;
        let mut out = CappedWriter(Vec::new());
        tmpl.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            },
            &mut out,
        )
        .map_err(err)?;
        String::from_utf8(out.0).map_err(|e| HubError::Template {
            path: self.path.clone(),
            message: format!("the rendered prompt is not UTF-8: {e}"),
        })
    }
}
