//! Prompt templates: a [`Record`] becomes text segments, each marked as trained
//! (loss) or not.
//!
//! - [`Template::Alpaca`]: Stanford Alpaca's prompt (the seed's `train.json` layout),
//!   word for word, with and without input.
//! - [`Template::ChatMl`]: `<|im_start|>role\n…<|im_end|>` turns (Qwen / OpenAI ChatML).
//! - [`Template::Raw`]: prompt and completion concatenated, no decoration.
//! - [`Template::Custom`]: anything implementing [`PromptTemplate`], e.g. the model's own
//!   `chat_template` rendered by the hub ([`Rendered::from_prompt_and_full`] turns a
//!   "generation prompt" rendering and a "full conversation" rendering into segments).
//!
//! Which text is trained: the completion of a completion record, the label of a
//! classification record without completion, and the assistant turns of a chat record
//! (all of them with ChatML, as TRL's `assistant_only_loss`; the last one with Alpaca and
//! Raw, which have no multi-turn layout).

use std::fmt;
use std::sync::Arc;

use legora_plugin_api::{Message, Record, Role};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// One piece of rendered text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// The text.
    pub text: String,
    /// Whether its tokens carry loss.
    pub train: bool,
}

/// A record rendered to text: segments in order, some trained.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Rendered {
    /// The segments, concatenated in order to give the full text.
    pub segments: Vec<Segment>,
}

impl Rendered {
    /// Append a segment (empty text is skipped).
    pub fn push(&mut self, text: impl Into<String>, train: bool) {
        let text = text.into();
        if !text.is_empty() {
            self.segments.push(Segment { text, train });
        }
    }

    /// A prompt (no loss) followed by a completion (loss).
    pub fn prompt_completion(prompt: impl Into<String>, completion: impl Into<String>) -> Self {
        let mut r = Self::default();
        r.push(prompt, false);
        r.push(completion, true);
        r
    }

    /// Build from two renderings of a chat template: `prompt` with the generation prompt
    /// (everything before the answer) and `full` with the answer. `full` must start with
    /// `prompt`; the rest is the trained completion.
    pub fn from_prompt_and_full(prompt: &str, full: &str) -> std::result::Result<Self, String> {
        match full.strip_prefix(prompt) {
            Some(completion) => Ok(Self::prompt_completion(prompt, completion)),
            None => Err(format!(
                "the full rendering does not start with the prompt rendering \
                 (they differ from byte {})",
                prompt
                    .bytes()
                    .zip(full.bytes())
                    .take_while(|(a, b)| a == b)
                    .count()
            )),
        }
    }

    /// The full text.
    pub fn text(&self) -> String {
        self.segments.iter().map(|s| s.text.as_str()).collect()
    }

    /// Everything before the last trained segment (the generation prompt); the whole
    /// text when nothing is trained.
    pub fn prompt(&self) -> String {
        let end = self
            .segments
            .iter()
            .rposition(|s| s.train)
            .unwrap_or(self.segments.len());
        self.segments[..end]
            .iter()
            .map(|s| s.text.as_str())
            .collect()
    }

    /// The last trained segment (the reference answer), if any.
    pub fn completion(&self) -> Option<&str> {
        self.segments
            .iter()
            .rev()
            .find(|s| s.train)
            .map(|s| s.text.as_str())
    }

    /// Whether any segment carries loss.
    pub fn has_target(&self) -> bool {
        self.segments.iter().any(|s| s.train)
    }
}

/// Turns records into [`Rendered`] text. Implement it to plug in a model's own
/// chat template.
pub trait PromptTemplate: Send + Sync {
    /// Render one record. A record without an answer (no completion, label, or final
    /// assistant turn) renders as a generation prompt with no trained segment.
    fn render(&self, record: &Record) -> std::result::Result<Rendered, String>;

    /// A short name for logs and errors.
    fn name(&self) -> &str {
        "custom"
    }
}

/// A [`PromptTemplate`] from a closure.
pub struct FnTemplate<F> {
    name: String,
    f: F,
}

impl<F> FnTemplate<F>
where
    F: Fn(&Record) -> std::result::Result<Rendered, String> + Send + Sync,
{
    /// Wrap `f` under `name`.
    pub fn new(name: impl Into<String>, f: F) -> Self {
        Self {
            name: name.into(),
            f,
        }
    }
}

impl<F> PromptTemplate for FnTemplate<F>
where
    F: Fn(&Record) -> std::result::Result<Rendered, String> + Send + Sync,
{
    fn render(&self, record: &Record) -> std::result::Result<Rendered, String> {
        (self.f)(record)
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// The prompt formats legora knows, plus a hook for any other.
#[derive(Clone, Default)]
pub enum Template {
    /// Stanford Alpaca.
    #[default]
    Alpaca,
    /// ChatML (`<|im_start|>` / `<|im_end|>`).
    ChatMl,
    /// Prompt then completion, nothing added.
    Raw,
    /// A user-supplied template (e.g. the model's `chat_template`).
    Custom(Arc<dyn PromptTemplate>),
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Template {
    type Err = DataError;

    /// `alpaca`, `chatml` or `raw`. (`model` — the model's own chat template — is
    /// resolved by whoever owns the tokenizer files and passed as [`Template::Custom`].)
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "alpaca" => Ok(Self::Alpaca),
            "chatml" => Ok(Self::ChatMl),
            "raw" => Ok(Self::Raw),
            other => Err(DataError::config(
                "template",
                "one of \"alpaca\", \"chatml\", \"raw\" (or \"model\" where the model's chat template is available)",
                format!("\"{other}\""),
            )),
        }
    }
}

/// Stanford Alpaca's `PROMPT_DICT["prompt_input"]` (tatsu-lab/stanford_alpaca, train.py).
pub const ALPACA_PROMPT_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";

/// Stanford Alpaca's `PROMPT_DICT["prompt_no_input"]`.
pub const ALPACA_PROMPT_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:";

/// The Alpaca prompt for an instruction and an optional input (blank = none).
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        ALPACA_PROMPT_NO_INPUT.replace("{instruction}", instruction)
    } else {
        ALPACA_PROMPT_INPUT
            .replacen("{instruction}", instruction, 1)
            .replacen("{input}", input, 1)
    }
}

impl Template {
    /// The template's name (`alpaca`, `chatml`, `raw`, or the custom name).
    pub fn name(&self) -> &str {
        match self {
            Template::Alpaca => "alpaca",
            Template::ChatMl => "chatml",
            Template::Raw => "raw",
            Template::Custom(t) => t.name(),
        }
    }

    /// Render a record. `index` only serves error messages.
    pub fn render(&self, record: &Record, index: usize) -> Result<Rendered> {
        let r = match self {
            Template::Alpaca => render_alpaca(record),
            Template::ChatMl => render_chatml(record),
            Template::Raw => render_raw(record),
            Template::Custom(t) => t.render(record),
        };
        r.map_err(|message| DataError::Record {
            task: record.task.clone(),
            index,
            message: format!("{} template: {message}", self.name()),
        })
    }
}

/// The answer of a completion-shaped record: its completion, else its label.
fn completion_target(record: &Record) -> Option<&str> {
    record.completion.as_deref().or(record.label.as_deref())
}

/// Split a chat into (turns before the answer, the answer if the chat ends with an
/// assistant turn).
fn split_chat(messages: &[Message]) -> (&[Message], Option<&str>) {
    match messages.split_last() {
        Some((last, head)) if last.role == Role::Assistant => (head, Some(&last.content)),
        _ => (messages, None),
    }
}

fn meta_str<'a>(record: &'a Record, key: &str) -> Option<&'a str> {
    record.meta.get(key).and_then(|v| v.as_str())
}

fn render_alpaca(record: &Record) -> std::result::Result<Rendered, String> {
    let (instruction, input, answer): (String, String, Option<&str>) = if record.is_chat() {
        // instruction = the last user turn; input = what came before it (system prompt
        // and earlier turns, as "role: content" lines); answer = a final assistant turn.
        let (context, answer) = split_chat(&record.messages);
        let user = context
            .iter()
            .rposition(|m| m.role == Role::User)
            .ok_or("chat record has no user message")?;
        let before: Vec<String> = context[..user]
            .iter()
            .map(|m| {
                if m.role == Role::System {
                    m.content.clone()
                } else {
                    format!("{}: {}", m.role, m.content)
                }
            })
            .collect();
        (context[user].content.clone(), before.join("\n"), answer)
    } else {
        // A plugin may keep Alpaca's separate fields in `meta`; otherwise the prompt is
        // the instruction.
        let (instruction, input) = match meta_str(record, "instruction") {
            Some(i) => (
                i.to_string(),
                meta_str(record, "input").unwrap_or("").to_string(),
            ),
            None => (
                record
                    .prompt
                    .clone()
                    .ok_or("record has neither `messages` nor `prompt`")?,
                String::new(),
            ),
        };
        (instruction, input, completion_target(record))
    };
    let mut r = Rendered::default();
    r.push(alpaca_prompt(&instruction, &input), false);
    if let Some(a) = answer {
        r.push(a, true);
    }
    Ok(r)
}

fn chatml_turn(role: Role, content: &str) -> String {
    format!("<|im_start|>{role}\n{content}<|im_end|>")
}

fn render_chatml(record: &Record) -> std::result::Result<Rendered, String> {
    let messages: Vec<Message> = if record.is_chat() {
        record.messages.clone()
    } else {
        let prompt = record
            .prompt
            .as_deref()
            .ok_or("record has neither `messages` nor `prompt`")?;
        let mut m = vec![Message::new(Role::User, prompt)];
        if let Some(c) = completion_target(record) {
            m.push(Message::new(Role::Assistant, c));
        }
        m
    };
    // "<|im_start|>assistant\n" is prompt; "content<|im_end|>" is trained; the "\n"
    // between turns belongs to the next (untrained) piece, so a sequence ends right
    // after the last trained `<|im_end|>`.
    let mut r = Rendered::default();
    let mut pending = String::new();
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            pending.push('\n');
        }
        if m.role == Role::Assistant {
            pending.push_str("<|im_start|>assistant\n");
            r.push(std::mem::take(&mut pending), false);
            r.push(format!("{}<|im_end|>", m.content), true);
        } else {
            pending.push_str(&chatml_turn(m.role, &m.content));
        }
    }
    if messages.last().map(|m| m.role) != Some(Role::Assistant) {
        // add_generation_prompt=True
        pending.push_str("\n<|im_start|>assistant\n");
    }
    r.push(pending, false);
    Ok(r)
}

fn render_raw(record: &Record) -> std::result::Result<Rendered, String> {
    if record.is_chat() {
        let (context, answer) = split_chat(&record.messages);
        let mut prompt: String = context
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let mut r = Rendered::default();
        if answer.is_some() && !prompt.is_empty() {
            prompt.push('\n');
        }
        r.push(prompt, false);
        if let Some(a) = answer {
            r.push(a, true);
        }
        Ok(r)
    } else {
        let prompt = record
            .prompt
            .as_deref()
            .ok_or("record has neither `messages` nor `prompt`")?;
        let mut r = Rendered::default();
        r.push(prompt, false);
        if let Some(c) = completion_target(record) {
            r.push(c, true);
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(msgs: &[(Role, &str)]) -> Record {
        Record::chat(
            "t",
            msgs.iter().map(|(r, c)| Message::new(*r, *c)).collect(),
        )
    }

    #[test]
    fn alpaca_is_stanford_alpaca_word_for_word() {
        let rec = Record::completion("shop", "处理退货申请", "已为您发起全额退款");
        let r = Template::Alpaca.render(&rec, 0).unwrap();
        assert_eq!(
            r.prompt(),
            "Below is an instruction that describes a task. Write a response that \
             appropriately completes the request.\n\n### Instruction:\n处理退货申请\n\n### Response:"
        );
        assert_eq!(r.completion(), Some("已为您发起全额退款"));
        let rec = Record::completion("shop", "ignored", "已为您发起全额退款")
            .with_meta("instruction", "处理退货申请")
            .with_meta("input", "商品已破损");
        let r = Template::Alpaca.render(&rec, 0).unwrap();
        assert_eq!(
            r.prompt(),
            "Below is an instruction that describes a task, paired with an input that \
             provides further context. Write a response that appropriately completes the \
             request.\n\n### Instruction:\n处理退货申请\n\n### Input:\n商品已破损\n\n### Response:"
        );
    }

    #[test]
    fn alpaca_chat_uses_last_user_turn_as_instruction() {
        let rec = chat(&[
            (Role::System, "You are Grom, a blacksmith."),
            (Role::User, "hi"),
            (Role::Assistant, "Hm."),
            (Role::User, "Sell me a sword"),
            (Role::Assistant, "Forty gold."),
        ]);
        let r = Template::Alpaca.render(&rec, 0).unwrap();
        assert_eq!(
            r.prompt(),
            alpaca_prompt(
                "Sell me a sword",
                "You are Grom, a blacksmith.\nuser: hi\nassistant: Hm."
            )
        );
        assert_eq!(r.completion(), Some("Forty gold."));
    }

    #[test]
    fn chatml_trains_every_assistant_turn() {
        let rec = chat(&[
            (Role::System, "S"),
            (Role::User, "a"),
            (Role::Assistant, "b"),
            (Role::User, "c"),
            (Role::Assistant, "d"),
        ]);
        let r = Template::ChatMl.render(&rec, 0).unwrap();
        assert_eq!(
            r.text(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n\
             <|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n\
             <|im_start|>assistant\nd<|im_end|>"
        );
        let trained: Vec<&str> = r
            .segments
            .iter()
            .filter(|s| s.train)
            .map(|s| s.text.as_str())
            .collect();
        assert_eq!(trained, ["b<|im_end|>", "d<|im_end|>"]);
        assert!(r.prompt().ends_with("<|im_start|>assistant\n"));
        // a prompt-only record gets the generation prompt
        let rec = chat(&[(Role::User, "q")]);
        let r = Template::ChatMl.render(&rec, 0).unwrap();
        assert_eq!(
            r.text(),
            "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!r.has_target());
    }

    #[test]
    fn label_is_the_target_without_completion_and_errors_name_the_record() {
        let mut rec = Record::completion("fin", "Is this fraud?", "x");
        rec.completion = None;
        rec.label = Some("yes".into());
        let r = Template::Raw.render(&rec, 3).unwrap();
        assert_eq!(r.completion(), Some("yes"));
        let e = Template::Alpaca
            .render(&chat(&[(Role::Assistant, "x")]), 7)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "task `t`, record 7: alpaca template: chat record has no user message"
        );
    }

    #[test]
    fn custom_templates_and_prompt_full_split() {
        let t = Template::Custom(Arc::new(FnTemplate::new("mine", |r: &Record| {
            Rendered::from_prompt_and_full(
                &format!("Q: {}\nA:", r.prompt.as_deref().unwrap_or("")),
                &format!(
                    "Q: {}\nA: {}",
                    r.prompt.as_deref().unwrap_or(""),
                    r.completion.as_deref().unwrap_or("")
                ),
            )
        })));
        let r = t.render(&Record::completion("t", "2+2", "4"), 0).unwrap();
        assert_eq!(r.prompt(), "Q: 2+2\nA:");
        assert_eq!(r.completion(), Some(" 4"));
        assert_eq!(t.name(), "mine");
        assert!(Rendered::from_prompt_and_full("abc", "abd").is_err());
        assert!("jinja"
            .parse::<Template>()
            .unwrap_err()
            .to_string()
            .contains("\"jinja\""));
    }
}
