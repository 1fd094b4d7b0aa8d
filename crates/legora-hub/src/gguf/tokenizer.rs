//! The tokenizer and chat template of a GGUF file, from its `tokenizer.*` metadata, built
//! as transformers' `integrations/gguf` builds them (so ids match
//! `AutoTokenizer.from_pretrained(dir, gguf_file=...)`):
//!
//! - `tokenizer.ggml.model` = `gpt2`: byte-level BPE (`GPT2Tokenizer`) from
//!   `tokenizer.ggml.tokens` + `tokenizer.ggml.merges`; tokens not spelled in the byte
//!   alphabet are respelled; `tokenizer.ggml.pre` picks the split regex (`llama-bpe`,
//!   `qwen2`, `tekken`, `gpt-4o`, ... as `GGUF_PRE_TOKENIZER_SPLITS`), anything else
//!   (`default`, `gpt-2`) GPT-2's own byte-level split;
//! - `llama`: SentencePiece-style BPE with byte fallback (`LlamaTokenizer`): `▁` Metaspace
//!   (prepended to the first word), merges from the file or, when it has none (llama.cpp
//!   writes none), recovered from the vocabulary and `tokenizer.ggml.scores` as
//!   `generate_merges` does;
//!   - a `phi3` file (`phi3_tokenizer`): the `▁` prefix from a normalizer, so text that
//!     starts with spaces keeps one more (`"  hi"` → `▁▁▁hi`);
//!   - a `gemma3` file (`gemma_tokenizer`): tokens of whitespace stored with real spaces
//!     are spelled as `▁`s, and recovered merges follow the tokens' order in the file,
//!     not their scores;
//! - control tokens (`tokenizer.ggml.token_type` 3) and the bos / eos / unk / pad tokens are
//!   special added tokens, user-defined ones (4) plain added tokens;
//! - `tokenizer.ggml.add_bos_token` (default: true for `llama`, false for `gpt2`) and
//!   `add_eos_token` (default false) make the post-processor.
//!
//! One deliberate difference: `tokenizer.ggml.add_space_prefix = false` is honoured (no `▁`
//! prepended, as llama.cpp does); transformers ignores the key.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

use super::file::GgufFile;
use crate::error::{HubError, Result};
use crate::tokenizer::ChatTemplate;

/// `TokenType.CONTROL` in llama.cpp's vocabulary.
const CONTROL: i64 = 3;
/// `TokenType.USER_DEFINED`.
const USER_DEFINED: i64 = 4;

/// Llama 3's split (`_LLAMA3_SPLIT`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split (`Qwen2Tokenizer`'s `PRETOKENIZE_REGEX`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5's split.
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken split.
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's split (also Llama 4's).
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// transformers' `GGUF_PRE_TOKENIZER_SPLITS`: `tokenizer.ggml.pre` → split regex.
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// GPT-2's `bytes_to_unicode`: the printable character each byte is spelled with.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).expect("Latin-1")
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("in the BMP")
        };
    }
    table
}

/// The `tokenizer.*` keys read, checked for shape (lengths, id ranges).
struct Vocab<'a> {
    model: &'a str,
    pre: Option<&'a str>,
    tokens: &'a [String],
    types: Option<Vec<i64>>,
    scores: Option<Vec<f32>>,
    merges: Option<&'a [String]>,
    bos: Option<usize>,
    eos: Option<usize>,
    unk: Option<usize>,
    pad: Option<usize>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
}

fn read_vocab(file: &GgufFile) -> Result<Vocab<'_>> {
    let err = |key: &str, expected: String, found: String| HubError::GgufMetadata {
        path: file.path().to_path_buf(),
        key: key.to_string(),
        expected,
        found,
    };
    let model = file.require_str("tokenizer.ggml.model")?;
    let tokens = file.get_strings("tokenizer.ggml.tokens")?.ok_or_else(|| {
        err(
            "tokenizer.ggml.tokens",
            "the token list (ARRAY of STRING)".into(),
            "no such key".into(),
        )
    })?;
    let n = tokens.len();
    let same_len = |key: &str, len: usize| {
        if len == n {
            Ok(())
        } else {
            Err(err(
                key,
                format!("{n} entries (one per token)"),
                len.to_string(),
            ))
        }
    };
    let types = file.get_i64s("tokenizer.ggml.token_type")?;
    if let Some(t) = &types {
        same_len("tokenizer.ggml.token_type", t.len())?;
    }
    let scores = file.get_f32s("tokenizer.ggml.scores")?;
    if let Some(s) = &scores {
        same_len("tokenizer.ggml.scores", s.len())?;
    }
    let id = |key: &str| -> Result<Option<usize>> {
        match file.get_u64(key)? {
            None => Ok(None),
            Some(i) if (i as usize) < n && i <= u32::MAX as u64 => Ok(Some(i as usize)),
            Some(i) => Err(err(key, format!("a token id below {n}"), i.to_string())),
        }
    };
    Ok(Vocab {
        model,
        pre: file.get_str("tokenizer.ggml.pre")?,
        tokens,
        types,
        scores,
        merges: file.get_strings("tokenizer.ggml.merges")?,
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
        // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        add_bos: file
            .get_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(model == "llama"),
        add_eos: file
            .get_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false),
        add_space_prefix: file
            .get_bool("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(true),
    })
}

/// The `tokenizer.json` (the `tokenizers` crate's serialization) this file's metadata
/// describes.
pub fn tokenizer_json(file: &GgufFile) -> Result<Value> {
    let v = read_vocab(file)?;
    let arch = file.get_str("general.architecture")?.unwrap_or_default();
    let mut normalizer = Value::Null;
    let (model, pre_tokenizer, decoder, byte_alphabet) = match v.model {
        "gpt2" => byte_level(file, &v)?,
        "llama" if arch == "phi3" => {
            // phi3_tokenizer: the prefix space from a normalizer, not from Metaspace
            // (`"  hi"` → `▁▁▁hi`, where Metaspace gives `▁▁hi`)
            normalizer = json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
            ]});
            let (model, _, decoder, alphabet) = sentencepiece(file, &v, false)?;
            (model, Value::Null, decoder, alphabet)
        }
        "llama" => sentencepiece(file, &v, arch.starts_with("gemma"))?,
        other => {
            return Err(HubError::GgufMetadata {
                path: file.path().to_path_buf(),
                key: "tokenizer.ggml.model".into(),
                expected: "\"gpt2\" (byte-level BPE) or \"llama\" (SentencePiece BPE)".into(),
                found: format!("\"{other}\""),
            })
        }
    };
    let pre_tokenizer = match v.pre.and_then(split_regex) {
        Some(regex) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]}),
        None => pre_tokenizer,
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(&v, byte_alphabet.as_ref()),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(&v),
        "decoder": decoder,
        "model": model,
    }))
}

type Parts = (Value, Value, Value, Option<HashSet<char>>);

/// `byte_level_tokenizer`: GPT-2's BPE over the byte alphabet.
fn byte_level(file: &GgufFile, v: &Vocab<'_>) -> Result<Parts> {
    let spelling = bytes_to_unicode();
    let alphabet: HashSet<char> = spelling.iter().copied().collect();
    let mut vocab = Map::new();
    let mut ids = HashMap::new();
    let mut keys = Vec::with_capacity(v.tokens.len());
    for (i, t) in v.tokens.iter().enumerate() {
        let key: String = if t.chars().all(|c| alphabet.contains(&c)) {
            t.clone()
        } else {
            t.bytes().map(|b| spelling[b as usize]).collect()
        };
        ids.insert(key.clone(), i);
        vocab.insert(key.clone(), json!(i));
        keys.push(key);
    }
    let merges = match v.merges {
        Some(m) => file_merges(file, m)?,
        None => generate_merges(&ids, &keys, None),
    };
    let model = json!({
        "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
        "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
        "ignore_merges": false, "vocab": vocab, "merges": merges,
    });
    let pre = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    Ok((model, pre, decoder, Some(alphabet)))
}

/// `sentencepiece_tokenizer` with `LlamaTokenizer`: byte-fallback BPE behind a `▁`
/// Metaspace. For Gemma (`gemma_tokenizer`), a token of spaces (and other whitespace)
/// stored with real spaces is spelled as `▁`s, and merges recovered from the vocabulary
/// follow the tokens' order in the file, not their scores.
fn sentencepiece(file: &GgufFile, v: &Vocab<'_>, gemma: bool) -> Result<Parts> {
    let respelled: Vec<String>;
    let (tokens, scores): (&[String], Option<Vec<f32>>) = if gemma {
        respelled = v
            .tokens
            .iter()
            .map(|t| {
                // "\u2581" * len(t) if " " in t and not t.strip() else t
                if t.contains(' ') && t.chars().all(char::is_whitespace) {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t.clone()
                }
            })
            .collect();
        let positions = (0..respelled.len()).map(|i| -(i as f32)).collect();
        (&respelled, Some(positions))
    } else {
        (v.tokens, v.scores.clone())
    };
    let mut vocab = Map::new();
    let mut ids = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        ids.insert(t.clone(), i);
        vocab.insert(t.clone(), json!(i));
    }
    let merges = match (v.merges, &scores) {
        (Some(m), _) => file_merges(file, m)?,
        (None, Some(scores)) => generate_merges(&ids, tokens, Some(scores)),
        (None, None) => {
            return Err(HubError::GgufMetadata {
                path: file.path().to_path_buf(),
                key: "tokenizer.ggml.scores".into(),
                expected: "token scores (or tokenizer.ggml.merges) to order the merges".into(),
                found: "no such key".into(),
            })
        }
    };
    let model = json!({
        "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
        "ignore_merges": false, "vocab": vocab, "merges": merges,
    });
    let scheme = if v.add_space_prefix { "first" } else { "never" };
    let pre = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": scheme, "split": false});
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if v.add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok((
        model,
        pre,
        json!({"type": "Sequence", "decoders": decoders}),
        None,
    ))
}

/// `tokenizer.ggml.merges` entries `"a b"` as pairs.
fn file_merges(file: &GgufFile, merges: &[String]) -> Result<Value> {
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split(' ').collect::<Vec<_>>()[..] {
            [a, b] => Ok(json!([a, b])),
            _ => Err(HubError::GgufMetadata {
                path: file.path().to_path_buf(),
                key: format!("tokenizer.ggml.merges[{i}]"),
                expected: "two tokens separated by one space".into(),
                found: format!("{m:?}"),
            }),
        })
        .collect::<Result<Vec<_>>>()
        .map(Value::Array)
}

/// transformers' `generate_merges(vocab, vocab_scores)`: every split of every token into
/// two vocabulary pieces, ordered by (left id, right id) within the token, then stably by
/// `(score, len(left), len(right))` — descending with scores (SentencePiece), ascending by
/// token id without.
fn generate_merges(
    ids: &HashMap<String, usize>,
    tokens: &[String],
    scores: Option<&Vec<f32>>,
) -> Value {
    // dict(zip(tokens, scores)) / the vocab dict: first occurrence fixes the order, the last
    // one the value.
    let mut order: Vec<&str> = Vec::new();
    let mut score_of: HashMap<&str, f64> = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        let s = match scores {
            Some(s) => s[i] as f64,
            None => ids.get(t.as_str()).copied().unwrap_or(i) as f64,
        };
        if score_of.insert(t.as_str(), s).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for t in order {
        let score = score_of[t];
        let mut local: Vec<(&str, &str, f64)> = t
            .char_indices()
            .skip(1)
            .map(|(at, _)| t.split_at(at))
            .filter(|(l, r)| ids.contains_key(*l) && ids.contains_key(*r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (ids[*l], ids[*r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f64)| (m.2, m.0.chars().count(), m.1.chars().count());
    let cmp = |a: &(&str, &str, f64), b: &(&str, &str, f64)| {
        let (ka, kb) = (key(a), key(b));
        ka.0.total_cmp(&kb.0)
            .then(ka.1.cmp(&kb.1))
            .then(ka.2.cmp(&kb.2))
    };
    if scores.is_some() {
        merges.sort_by(|a, b| cmp(b, a));
    } else {
        merges.sort_by(cmp);
    }
    Value::Array(merges.into_iter().map(|(l, r, _)| json!([l, r])).collect())
}

/// Control tokens and the named special tokens (special), user-defined tokens (not).
fn added_tokens(v: &Vocab<'_>, byte_alphabet: Option<&HashSet<char>>) -> Value {
    let mut special: Vec<usize> = [v.bos, v.eos, v.unk, v.pad].into_iter().flatten().collect();
    let mut plain = Vec::new();
    if let Some(types) = &v.types {
        for (i, (t, &ty)) in v.tokens.iter().zip(types).enumerate() {
            // a byte-level "control" token outside the byte alphabet is a llama.cpp mislabel
            let spelled = byte_alphabet.is_none_or(|a| t.chars().all(|c| a.contains(&c)));
            if ty == CONTROL && spelled {
                special.push(i);
            } else if ty == USER_DEFINED {
                plain.push(i);
            }
        }
    }
    special.sort_unstable();
    special.dedup();
    plain.retain(|i| special.binary_search(i).is_err());
    let entry = |i: usize, is_special: bool| {
        json!({"id": i, "content": v.tokens[i], "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": is_special})
    };
    let mut all: Vec<(usize, Value)> = special.iter().map(|&i| (i, entry(i, true))).collect();
    all.extend(plain.iter().map(|&i| (i, entry(i, false))));
    all.sort_by_key(|(i, _)| *i);
    Value::Array(all.into_iter().map(|(_, e)| e).collect())
}

/// `TokenizersBackend.update_post_processor`: `[bos] $A [eos]` (and the pair form).
fn post_processor(v: &Vocab<'_>) -> Value {
    let bos = v
        .bos
        .filter(|_| v.add_bos)
        .map(|i| (v.tokens[i].as_str(), i));
    let eos = v
        .eos
        .filter(|_| v.add_eos)
        .map(|i| (v.tokens[i].as_str(), i));
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (ty, part, out) in [(0, "A", &mut single), (1, "B", &mut pair)] {
        if let Some((b, _)) = bos {
            out.push(special(b, ty));
        }
        out.push(seq(part, ty));
        if let Some((e, _)) = eos {
            out.push(special(e, ty));
        }
    }
    let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
    let mut tokens = Map::new();
    for (t, i) in [bos, eos].into_iter().flatten() {
        tokens.insert(t.into(), json!({"id": t, "ids": [i], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": tokens})
}

/// The file's tokenizer (see the module docs).
pub fn gguf_tokenizer(file: &GgufFile) -> Result<Tokenizer> {
    let json = tokenizer_json(file)?;
    let text = serde_json::to_string(&json).map_err(|e| HubError::Tokenizer {
        path: file.path().to_path_buf(),
        message: e.to_string(),
    })?;
    text.parse::<Tokenizer>().map_err(|e| HubError::Tokenizer {
        path: file.path().to_path_buf(),
        message: format!("building the tokenizer from GGUF metadata: {e}"),
    })
}

/// `tokenizer.chat_template`, with the bos / eos token texts it may refer to (`None` when
/// the file has no template).
pub fn gguf_chat_template(file: &GgufFile) -> Result<Option<ChatTemplate>> {
    let Some(source) = file.get_str("tokenizer.chat_template")? else {
        return Ok(None);
    };
    let tokens = file.get_strings("tokenizer.ggml.tokens")?.unwrap_or(&[]);
    let text = |key: &str| -> Result<Option<String>> {
        Ok(file
            .get_u64(key)?
            .and_then(|i| tokens.get(i as usize))
            .cloned())
    };
    Ok(Some(ChatTemplate {
        source: source.to_string(),
        bos_token: text("tokenizer.ggml.bos_token_id")?,
        eos_token: text("tokenizer.ggml.eos_token_id")?,
        path: file.path().to_path_buf(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
    }

    #[test]
    fn merges_recovered_from_scores() {
        // tokens a b c ab abc (scores: higher merges first): "ab" (score -1) before "abc" (-2)
        // → merges [a b] then [ab c] (abc also splits as a + bc, but bc is not a token).
        let tokens: Vec<String> = ["a", "b", "c", "ab", "abc"].map(String::from).to_vec();
        let ids = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i))
            .collect();
        let scores = vec![0.0, 0.0, 0.0, -1.0, -2.0];
        let m = generate_merges(&ids, &tokens, Some(&scores));
        assert_eq!(m, json!([["a", "b"], ["ab", "c"]]));
    }
}
