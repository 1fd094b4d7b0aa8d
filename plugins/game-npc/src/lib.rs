//! # legora game-NPC plugin
//!
//! Formats (qualified names `game-npc/<name>`):
//! - `card`: a Character Card V2 JSON file (`{"spec": "chara_card_v2",
//!   "data": {"name", "description", "personality", "scenario", "first_mes",
//!   "mes_example", ...}}`), or a JSON array of cards. Each card gives chat
//!   records with the persona as system prompt: one for `first_mes` (the
//!   greeting) and one per `<START>` block of `mes_example`.
//! - `dialogue`: JSON Lines of `{"character": "<card name or file stem>",
//!   "messages": [{"role": "user"|"assistant", "content"}]}`. The cards come
//!   as attachments: parameter `cards` (a card file, a folder of them, or a
//!   list), by default the folder `../cards` next to the dialogue file. Each
//!   row becomes a multi-turn chat record: the card's persona as system
//!   prompt, then the turns (ending with the assistant).
//! - `alpaca`: Alpaca `instruction` / `input` / `output` JSON.
//!
//! `{{char}}` / `<BOT>` and `{{user}}` / `<USER>` are replaced by the
//! character's name and by the parameter `user_name` (default `User`).
//! The persona prompt is `You are <name>. <description> Personality:
//! <personality> Scenario: <scenario>` (empty parts left out), preceded by the
//! card's own `system_prompt` when it has one. Records carry `meta.character`,
//! `meta.traits` (the personality's comma-separated parts) and `meta.markers`
//! (phrases the character always uses, from
//! `data.extensions.legora.markers`).
//!
//! Evaluators (predictions are the model's replies):
//! - `in_character` → `in_character_rate` (a reply is in character when it has
//!   no out-of-role phrase, does not give itself another name, and contains
//!   one of the character's markers when `meta.markers` is given), plus
//!   `out_of_role_rate`, `name_kept_rate`, `marker_rate`. Parameter
//!   `out_of_role_phrases` replaces [`OUT_OF_ROLE_PHRASES`].
//! - `diversity` → `distinct_1`, `distinct_2` (distinct n-grams / n-grams over
//!   all replies), `repetition_rate` (mean per-reply share of repeated
//!   n-grams, `1 - distinct/total`, n = parameter `n`, default 2) and
//!   `mean_reply_length` (words).
//! - `persona`: both of the above.
//!
//! Preset `persona`: rsLoRA r=16 on all linear projections with a 4-expert
//! top-2 mixture (personas share experts).

use std::collections::BTreeMap;

use legora_plugin_api::alpaca::{alpaca_format_info, parse_alpaca};
use legora_plugin_api::prelude::*;
use legora_plugin_api::rows::{json_error_message, line_of, strip_bom};
use legora_plugin_api::Attachment;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

/// The game-NPC plugin.
#[derive(Debug, Default, Clone, Copy)]
pub struct GameNpcPlugin;

legora_plugin_api::export_plugin!(GameNpcPlugin);

/// Plugin name.
pub const NAME: &str = "game-npc";

/// Phrases that break character (matched case-insensitively).
pub const OUT_OF_ROLE_PHRASES: &[&str] = &[
    "as an ai",
    "an ai language model",
    "language model",
    "i am an ai",
    "i'm an ai",
    "ai assistant",
    "virtual assistant",
    "i am a chatbot",
    "i'm a chatbot",
    "as a chatbot",
    "openai",
    "chatgpt",
    "i cannot roleplay",
    "i can't roleplay",
];

impl Plugin for GameNpcPlugin {
    fn manifest(&self) -> Manifest {
        let user_name = ParamInfo::new("user_name", "name substituted for {{user}}", json!("User"));
        Manifest::new(NAME, env!("CARGO_PKG_VERSION"))
            .description("In-character NPC dialogue from Character Card V2 personas")
            .format(
                FormatInfo::new(
                    "card",
                    "Character Card V2 JSON (one card or an array); greeting and example dialogues",
                )
                .extensions(&["json"])
                .default_evaluator("persona")
                .param(user_name.clone()),
            )
            .format(
                FormatInfo::new(
                    "dialogue",
                    "dialogue JSONL {character, messages} referring to Character Card V2 cards",
                )
                .extensions(&["jsonl"])
                .default_evaluator("persona")
                .attachment(AttachmentInfo {
                    option: "cards".into(),
                    description: "Character Card V2 files (a file, a folder or a list)".into(),
                    default: Some("../cards".into()),
                    extensions: vec!["json".into()],
                })
                .param(user_name),
            )
            .format(alpaca_format_info("persona"))
            .evaluator(
                EvaluatorInfo::new(
                    "in_character",
                    "share of replies that keep the persona (name, markers) and never step out of role",
                    &["in_character_rate", "out_of_role_rate", "name_kept_rate", "marker_rate"],
                )
                .lower_is_better(&["out_of_role_rate"])
                .param(ParamInfo::new(
                    "out_of_role_phrases",
                    "phrases that break character (replaces the built-in list)",
                    Value::Null,
                )),
            )
            .evaluator(
                EvaluatorInfo::new(
                    "diversity",
                    "distinct-1/2 over all replies, per-reply repetition rate, mean reply length in words",
                    &["distinct_1", "distinct_2", "repetition_rate", "mean_reply_length"],
                )
                .primary("distinct_2")
                .lower_is_better(&["repetition_rate"])
                .param(ParamInfo::new("n", "n-gram size of repetition_rate", json!(2))),
            )
            .evaluator(EvaluatorInfo::new(
                "persona",
                "in_character and diversity together",
                &[
                    "in_character_rate",
                    "out_of_role_rate",
                    "name_kept_rate",
                    "marker_rate",
                    "distinct_1",
                    "distinct_2",
                    "repetition_rate",
                    "mean_reply_length",
                ],
            )
            .lower_is_better(&["out_of_role_rate", "repetition_rate"]))
            .preset(PresetInfo::new(
                "persona",
                "rsLoRA r=16 on all projections, 4 experts routed top-2 shared by the personas",
            ))
    }

    fn parse(&self, request: &ParseRequest) -> Result<ParseOutput, PluginError> {
        let task = request.task_or(&format!("{NAME}/{}", request.format));
        let user = request.param_str("user_name").unwrap_or("User").to_string();
        match request.format.as_str() {
            "card" => parse_cards(request, &task, &user),
            "dialogue" => parse_dialogue(request, &task, &user),
            "alpaca" => parse_alpaca(request, &task),
            other => Err(PluginError::UnknownFormat { name: other.into() }),
        }
    }

    fn evaluate(&self, request: &EvalRequest) -> Result<EvalOutput, PluginError> {
        match request.evaluator.as_str() {
            "in_character" => in_character(request),
            "diversity" => diversity(request),
            "persona" => {
                let mut out = in_character(request)?;
                let more = diversity(request)?;
                out.metrics.extend(more.metrics);
                out.warnings.extend(more.warnings);
                Ok(out)
            }
            other => Err(PluginError::UnknownEvaluator { name: other.into() }),
        }
    }

    fn preset(&self, name: &str) -> Result<Preset, PluginError> {
        match name {
            "persona" => Ok(persona_preset()),
            other => Err(PluginError::UnknownPreset { name: other.into() }),
        }
    }
}

// ---------------------------------------------------------------------------
// Cards
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
struct CardV2 {
    spec: String,
    data: CardData,
}

#[derive(Deserialize)]
struct CardData {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    personality: String,
    #[serde(default)]
    scenario: String,
    #[serde(default)]
    first_mes: String,
    #[serde(default)]
    mes_example: String,
    #[serde(default)]
    system_prompt: String,
    #[serde(default)]
    extensions: Map<String, Value>,
}

/// A character ready to play: its system prompt and evaluation facts.
#[derive(Debug, Clone, PartialEq)]
pub struct Persona {
    /// Character name.
    pub name: String,
    /// The system prompt built from the card.
    pub system: String,
    /// Personality traits (comma-separated parts of `personality`).
    pub traits: Vec<String>,
    /// Phrases the character always uses.
    pub markers: Vec<String>,
    first_mes: String,
    mes_example: String,
}

fn substitute(text: &str, name: &str, user: &str) -> String {
    let mut s = text.to_string();
    for pat in ["{{char}}", "{{Char}}", "{{CHAR}}", "<BOT>", "<bot>"] {
        s = s.replace(pat, name);
    }
    for pat in ["{{user}}", "{{User}}", "{{USER}}", "<USER>", "<user>"] {
        s = s.replace(pat, user);
    }
    s
}

fn sentence(text: &str) -> String {
    let t = text.trim();
    if t.is_empty() || t.ends_with(['.', '!', '?', '"']) {
        t.to_string()
    } else {
        format!("{t}.")
    }
}

fn persona(card: CardV2, user: &str) -> Result<Persona, String> {
    if card.spec != "chara_card_v2" {
        return Err(format!(
            "`spec` is `{}`, expected `chara_card_v2`",
            card.spec
        ));
    }
    let d = card.data;
    let name = d.name.trim().to_string();
    if name.is_empty() {
        return Err("empty `data.name`".into());
    }
    let sub = |t: &str| substitute(t, &name, user);
    let mut system = format!("You are {name}.");
    if !d.description.trim().is_empty() {
        system.push(' ');
        system.push_str(&sentence(&sub(&d.description)));
    }
    if !d.personality.trim().is_empty() {
        system.push_str(" Personality: ");
        system.push_str(&sentence(&sub(&d.personality)));
    }
    if !d.scenario.trim().is_empty() {
        system.push_str(" Scenario: ");
        system.push_str(&sentence(&sub(&d.scenario)));
    }
    if !d.system_prompt.trim().is_empty() {
        let own = sub(&d.system_prompt).replace("{{original}}", "");
        system = format!("{}\n{system}", own.trim());
    }
    let traits = d
        .personality
        .split([',', ';', '.'])
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.contains('"') && t.split_whitespace().count() <= 3)
        .map(|t| t.to_lowercase())
        .collect();
    let markers = match d.extensions.get("legora").and_then(|l| l.get("markers")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| "`extensions.legora.markers` must hold strings".to_string())
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err("`extensions.legora.markers` must be a list of strings".into()),
    };
    Ok(Persona {
        system,
        traits,
        markers,
        first_mes: sub(&d.first_mes),
        mes_example: d.mes_example,
        name,
    })
}

impl Persona {
    fn meta(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("character".into(), json!(self.name));
        m.insert("traits".into(), json!(self.traits));
        m.insert("markers".into(), json!(self.markers));
        m
    }

    fn record(&self, task: &str, turns: Vec<Message>) -> Record {
        let mut messages = vec![Message::new(Role::System, self.system.clone())];
        messages.extend(turns);
        let mut record = Record::chat(task, messages);
        record.meta = self.meta();
        record
    }

    /// Example dialogues of `mes_example`, one per `<START>` block.
    fn examples(&self, user: &str) -> Vec<Vec<Message>> {
        let text = self.mes_example.replace("<start>", "<START>");
        let speakers: Vec<(String, Role)> = [
            ("{{user}}:", Role::User),
            ("{{User}}:", Role::User),
            ("<USER>:", Role::User),
            ("{{char}}:", Role::Assistant),
            ("{{Char}}:", Role::Assistant),
            ("<BOT>:", Role::Assistant),
        ]
        .into_iter()
        .map(|(p, r)| (p.to_string(), r))
        .chain([
            (format!("{user}:"), Role::User),
            (format!("{}:", self.name), Role::Assistant),
        ])
        .collect();
        let mut blocks = Vec::new();
        for block in text.split("<START>") {
            let mut turns: Vec<Message> = Vec::new();
            for line in block.lines() {
                let trimmed = line.trim_start();
                match speakers
                    .iter()
                    .find(|(p, _)| trimmed.starts_with(p.as_str()))
                {
                    Some((prefix, role)) => turns.push(Message::new(
                        *role,
                        substitute(trimmed[prefix.len()..].trim(), &self.name, user),
                    )),
                    None => {
                        if let Some(last) = turns.last_mut() {
                            if !trimmed.trim().is_empty() {
                                last.content.push('\n');
                                last.content.push_str(&substitute(
                                    trimmed.trim(),
                                    &self.name,
                                    user,
                                ));
                            }
                        }
                    }
                }
            }
            while turns.last().is_some_and(|m| m.role != Role::Assistant) {
                turns.pop();
            }
            if !turns.is_empty() {
                blocks.push(turns);
            }
        }
        blocks
    }
}

/// One card of a file: (row, line, persona or message).
type CardRow = (u64, u64, Result<Persona, String>);

/// Reads the cards of one file (a card object or an array of cards).
/// Returns (row, line, result) per card.
fn read_cards<'t>(text: &'t str, user: &str) -> Result<Vec<CardRow>, (u64, String)> {
    let body = strip_bom(text);
    let trimmed = body.trim_start();
    let items: Vec<&'t RawValue> = if trimmed.starts_with('[') {
        serde_json::from_str(body).map_err(|e| {
            (
                e.line() as u64,
                format!(
                    "not a JSON array of cards: {}",
                    json_error_message(&e, false)
                ),
            )
        })?
    } else {
        vec![serde_json::from_str::<&RawValue>(body).map_err(|e| {
            (
                e.line() as u64,
                format!("not a JSON card: {}", json_error_message(&e, false)),
            )
        })?]
    };
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            let line = line_of(text, raw.get());
            let result = serde_json::from_str::<CardV2>(raw.get())
                .map_err(|e| json_error_message(&e, false))
                .and_then(|card| persona(card, user));
            (i as u64 + 1, line, result)
        })
        .collect())
}

fn parse_cards(request: &ParseRequest, task: &str, user: &str) -> Result<ParseOutput, PluginError> {
    let mut sink = RowSink::new(request);
    let text = sink.text()?;
    let cards = read_cards(text, user).map_err(|(line, msg)| sink.fatal(Some(line), msg))?;
    for (row, line, result) in cards {
        match result {
            Ok(p) => {
                if !p.first_mes.trim().is_empty() {
                    sink.push(p.record(
                        task,
                        vec![Message::new(Role::Assistant, p.first_mes.trim())],
                    ));
                }
                for turns in p.examples(user) {
                    sink.push(p.record(task, turns));
                }
            }
            Err(msg) => sink.reject(Some(line), Some(row), msg),
        }
    }
    sink.finish()
}

// ---------------------------------------------------------------------------
// Dialogues
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
struct DialogueRow {
    character: String,
    messages: Vec<Message>,
}

fn file_stem(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    base.rsplit_once('.')
        .map_or(base, |(stem, _)| stem)
        .to_lowercase()
}

fn load_cast(
    attachments: &[Attachment],
    user: &str,
) -> Result<BTreeMap<String, Persona>, PluginError> {
    let fail = |file: &str, line: Option<u64>, row: Option<u64>, message: String| {
        PluginError::file_error(legora_plugin_api::RowError {
            file: file.to_string(),
            line,
            row,
            message,
        })
    };
    let mut cast = BTreeMap::new();
    for a in attachments {
        let text = std::str::from_utf8(&a.data)
            .map_err(|_| fail(&a.name, None, None, "invalid UTF-8".into()))?;
        let cards =
            read_cards(text, user).map_err(|(line, msg)| fail(&a.name, Some(line), None, msg))?;
        let single = cards.len() == 1;
        for (row, line, result) in cards {
            let p = result.map_err(|msg| fail(&a.name, Some(line), Some(row), msg))?;
            let key = p.name.to_lowercase();
            if cast.contains_key(&key) {
                return Err(fail(
                    &a.name,
                    Some(line),
                    Some(row),
                    format!("a second card named `{}`", p.name),
                ));
            }
            if single {
                cast.entry(file_stem(&a.name)).or_insert_with(|| p.clone());
            }
            cast.insert(key, p);
        }
    }
    Ok(cast)
}

fn parse_dialogue(
    request: &ParseRequest,
    task: &str,
    user: &str,
) -> Result<ParseOutput, PluginError> {
    let mut sink = RowSink::new(request);
    let cast = load_cast(&request.attachments, user)?;
    if cast.is_empty() {
        return Err(sink.fatal(
            None,
            "no character cards: pass `cards` (a Character Card V2 file, a folder or a list) \
             or put them in ../cards next to the dialogue file",
        ));
    }
    sink.jsonl(|row: DialogueRow, _| {
        let Some(p) = cast.get(&row.character.trim().to_lowercase()) else {
            let known: Vec<&str> = cast.values().map(|p| p.name.as_str()).take(5).collect();
            return Err(format!(
                "unknown character `{}` (cards: {}{})",
                row.character,
                known.join(", "),
                if cast.len() > 5 { ", ..." } else { "" }
            ));
        };
        if row.messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        if let Some(i) = row.messages.iter().position(|m| m.role == Role::System) {
            return Err(format!(
                "messages[{i}] is a system turn; the persona comes from the card"
            ));
        }
        if row.messages.last().map(|m| m.role) != Some(Role::Assistant) {
            return Err("the last message must be the character's (assistant) reply".into());
        }
        let turns = row
            .messages
            .into_iter()
            .map(|m| Message::new(m.role, substitute(&m.content, &p.name, user)))
            .collect();
        Ok(vec![p.record(task, turns)])
    });
    sink.finish()
}

// ---------------------------------------------------------------------------
// Evaluators
// ---------------------------------------------------------------------------

const NOT_NAMES: &[&str] = &[
    "Not",
    "Sorry",
    "Here",
    "So",
    "Just",
    "The",
    "A",
    "An",
    "Fine",
    "Glad",
    "Happy",
    "Afraid",
    "Sure",
    "Ready",
    "Busy",
    "Still",
    "Always",
    "Only",
    "Good",
    "Well",
    "Your",
    "Very",
    "No",
    "Yes",
    "Too",
    "Quite",
    "Really",
    "Certainly",
    "Indeed",
    "Also",
    "From",
    "In",
    "At",
    "Of",
];

/// False when the reply names itself with a capitalized word that is not part
/// of `name` (`My name is Gandalf`, `I am Gandalf`, `call me Gandalf`).
pub fn keeps_name(reply: &str, name: &str) -> bool {
    let own: Vec<String> = metrics::words(name);
    let lower = reply.to_ascii_lowercase();
    for pattern in ["my name is ", "call me ", "i am ", "i'm "] {
        let mut from = 0;
        while let Some(pos) = lower[from..].find(pattern) {
            let start = from + pos + pattern.len();
            from = start;
            let at_word_start = from - pattern.len() == 0
                || !lower.as_bytes()[from - pattern.len() - 1].is_ascii_alphanumeric();
            if !at_word_start {
                continue;
            }
            let word: String = reply[start..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '\'' || *c == '-')
                .collect();
            let capitalized = word.chars().next().is_some_and(char::is_uppercase);
            if capitalized
                && !NOT_NAMES.contains(&word.as_str())
                && !own.contains(&word.to_lowercase())
            {
                return false;
            }
        }
    }
    true
}

fn contains_phrase(haystack_words: &[String], phrase: &str) -> bool {
    let needle = metrics::words(phrase);
    !needle.is_empty()
        && haystack_words
            .windows(needle.len())
            .any(|w| w == needle.as_slice())
}

fn in_character(request: &EvalRequest) -> Result<EvalOutput, PluginError> {
    let phrases: Vec<String> = match request.params.get("out_of_role_phrases") {
        None | Some(Value::Null) => OUT_OF_ROLE_PHRASES.iter().map(|s| s.to_string()).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_lowercase))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                PluginError::invalid_request("`out_of_role_phrases` must hold strings")
            })?,
        Some(_) => {
            return Err(PluginError::invalid_request(
                "`out_of_role_phrases` must be a list of strings",
            ))
        }
    };
    let n = request.len();
    if n == 0 {
        return Ok(EvalOutput::new(0).warn("no examples"));
    }
    let (mut ok, mut oor, mut named, mut marked) = (0usize, 0usize, 0usize, 0usize);
    for (i, reply) in request.predictions.iter().enumerate() {
        let meta = request.meta.get(i);
        let name = meta
            .and_then(|m| m.get("character"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let markers: Vec<&str> = meta
            .and_then(|m| m.get("markers"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let words = metrics::words(reply);
        let out_of_role = phrases.iter().any(|p| contains_phrase(&words, p));
        let name_ok = name.is_empty() || keeps_name(reply, name);
        let marker_ok = markers.is_empty() || markers.iter().any(|m| contains_phrase(&words, m));
        oor += usize::from(out_of_role);
        named += usize::from(name_ok);
        marked += usize::from(marker_ok);
        ok += usize::from(!out_of_role && name_ok && marker_ok);
    }
    let f = |k: usize| k as f64 / n as f64;
    Ok(EvalOutput::new(n)
        .metric("in_character_rate", f(ok))
        .metric("out_of_role_rate", f(oor))
        .metric("name_kept_rate", f(named))
        .metric("marker_rate", f(marked)))
}

fn diversity(request: &EvalRequest) -> Result<EvalOutput, PluginError> {
    let n_gram = match request.params.get("n") {
        None | Some(Value::Null) => 2,
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .ok_or_else(|| PluginError::invalid_request("`n` must be a positive integer"))?
            as usize,
    };
    let n = request.len();
    if n == 0 {
        return Ok(EvalOutput::new(0).warn("no examples"));
    }
    let tokens: Vec<Vec<String>> = request
        .predictions
        .iter()
        .map(|p| metrics::words(p))
        .collect();
    let mut out = EvalOutput::new(n);
    for (k, name) in [(1, "distinct_1"), (2, "distinct_2")] {
        match metrics::distinct_n(&tokens, k) {
            Some(v) => out = out.metric(name, v),
            None => out = out.warn(format!("{name}: the replies have no {k}-grams")),
        }
    }
    let rep =
        metrics::mean(tokens.iter().map(|t| metrics::repetition_rate(t, n_gram))).unwrap_or(0.0);
    let len = metrics::mean(tokens.iter().map(|t| t.len() as f64)).unwrap_or(0.0);
    Ok(out
        .metric("repetition_rate", rep)
        .metric("mean_reply_length", len))
}

fn persona_preset() -> Preset {
    let mut lora = LoraConfig::new(
        16,
        16.0,
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    );
    lora.lora_dropout = 0.1;
    lora.use_rslora = true;
    let mut mixture = MixtureConfig::new(4, 2);
    mixture.router.jitter_noise = 0.01;
    let mut preset = Preset::new(
        "persona",
        "In-character NPC dialogue: rsLoRA r=16 on all projections, 4 experts routed top-2",
        lora,
    );
    preset.mixture = Some(mixture);
    let object = |v: Value| v.as_object().cloned().unwrap_or_default();
    preset.format_options.insert(
        "game-npc/dialogue".into(),
        object(json!({"user_name": "User"})),
    );
    preset.training = object(json!({"learning_rate": 2e-4, "epochs": 4, "max_seq_len": 384}));
    preset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_checks() {
        assert!(keeps_name("Hmph. I am Brom, the smith.", "Brom Ironfist"));
        assert!(!keeps_name("My name is Gandalf.", "Brom Ironfist"));
        assert!(keeps_name("I am not sure. I'm Sorry.", "Brom Ironfist"));
        assert!(!keeps_name("Well, call me Ishmael", "Brom Ironfist"));
        assert!(keeps_name("Kim am Gandalf", "Brom"));
    }

    #[test]
    fn card_examples_split_on_start() {
        let card: CardV2 = serde_json::from_value(json!({
            "spec": "chara_card_v2",
            "data": {"name": "Brom", "personality": "gruff, loyal",
                     "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Hmph.\nWelcome.\n<START>\n{{user}}: only a question"}
        }))
        .expect("card");
        let p = persona(card, "User").expect("persona");
        assert_eq!(p.traits, vec!["gruff", "loyal"]);
        let ex = p.examples("User");
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0][1].content, "Hmph.\nWelcome.");
        assert_eq!(p.system, "You are Brom. Personality: gruff, loyal.");
    }

    #[test]
    fn preset_is_valid() {
        GameNpcPlugin
            .preset("persona")
            .expect("preset")
            .validate()
            .expect("valid");
    }
}
