//! Tokenization with a loss mask: prompt tokens get label [`IGNORE_INDEX`], completion
//! tokens keep their id, an EOS closes the sequence, and long sequences are truncated.
//!
//! Labels follow the Hugging Face convention: `labels` is aligned with `input_ids` (not
//! shifted); the model predicts `labels[t]` from positions `< t`, i.e. compares
//! `logits[t - 1]` with `labels[t]`.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::template::Rendered;

/// Label of a token that carries no loss (PyTorch's `CrossEntropyLoss(ignore_index=-100)`).
pub const IGNORE_INDEX: i64 = -100;

/// What legora needs from a tokenizer. The hub implements it for HF `tokenizer.json`;
/// [`ByteTokenizer`] is a self-contained one for tests and toy models.
pub trait Tokenize {
    /// Token ids of `text`; with `add_special` the tokenizer adds its usual special
    /// tokens (BOS for Llama), as HF's `add_special_tokens=True`.
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>>;
    /// Text of `ids`, special tokens skipped.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// End-of-sequence id, if the tokenizer has one.
    fn eos_id(&self) -> Option<u32>;
    /// Padding id, if the tokenizer has one (batching falls back to EOS, then 0).
    fn pad_id(&self) -> Option<u32>;
    /// Beginning-of-sequence id, if any.
    fn bos_id(&self) -> Option<u32>;
    /// Number of ids (largest id + 1).
    fn vocab_size(&self) -> usize;
}

/// A byte-level tokenizer: ids `0..=255` are bytes, then BOS, EOS and PAD.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// `<s>`.
    pub const BOS: u32 = 256;
    /// `</s>`.
    pub const EOS: u32 = 257;
    /// `<pad>`.
    pub const PAD: u32 = 258;
}

impl Tokenize for ByteTokenizer {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() + 1);
        if add_special {
            ids.push(Self::BOS);
        }
        ids.extend(text.bytes().map(u32::from));
        Ok(ids)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len());
        for &id in ids {
            match id {
                0..=255 => bytes.push(id as u8),
                Self::BOS | Self::EOS | Self::PAD => {}
                other => {
                    return Err(DataError::Tokenizer(format!(
                        "id {other} is outside the byte tokenizer's vocabulary (259)"
                    )))
                }
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn eos_id(&self) -> Option<u32> {
        Some(Self::EOS)
    }

    fn pad_id(&self) -> Option<u32> {
        Some(Self::PAD)
    }

    fn bos_id(&self) -> Option<u32> {
        Some(Self::BOS)
    }

    fn vocab_size(&self) -> usize {
        259
    }
}

/// How rendered text becomes an [`Example`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizeOptions {
    /// Longest sequence kept; longer ones are cut on the right (as HF
    /// `truncation=True`), which may cut the EOS or the whole completion.
    pub max_seq_len: usize,
    /// Let the tokenizer add its special tokens (BOS) before the first segment.
    pub add_special_tokens: bool,
    /// Append EOS (trained) unless the sequence already ends with it.
    pub append_eos: bool,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        Self {
            max_seq_len: 512,
            add_special_tokens: true,
            append_eos: true,
        }
    }
}

impl TokenizeOptions {
    /// Options with the given `max_seq_len` and the defaults otherwise.
    pub fn new(max_seq_len: usize) -> Self {
        Self {
            max_seq_len,
            ..Self::default()
        }
    }
}

/// One tokenized training row (possibly several packed sequences).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Per-token targets (HF convention, unshifted); [`IGNORE_INDEX`] = no loss.
    pub labels: Vec<i64>,
    /// Task index (= expert index in task-routed training).
    pub task: usize,
    /// Lengths of the sequences packed into this row (one entry when not packed);
    /// they sum to `input_ids.len()`.
    pub seq_lens: Vec<usize>,
}

impl Example {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the row has no token.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of tokens that carry loss.
    pub fn num_targets(&self) -> usize {
        self.labels.iter().filter(|l| **l != IGNORE_INDEX).count()
    }
}

/// Counts from [`tokenize_rendered`] over a data set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizeStats {
    /// Examples kept.
    pub kept: usize,
    /// Examples cut to `max_seq_len`.
    pub truncated: usize,
    /// Examples dropped because no trained token was left (empty completion, or the
    /// prompt alone fills `max_seq_len`).
    pub dropped: usize,
}

/// Tokenize one rendered record: each segment is encoded on its own (so the boundary
/// between prompt and completion is exact), special tokens only before the first.
///
/// Returns `None` when no token carries loss after truncation.
pub fn tokenize_rendered(
    rendered: &Rendered,
    task: usize,
    tokenizer: &dyn Tokenize,
    opts: &TokenizeOptions,
) -> Result<Option<(Example, bool)>> {
    if opts.max_seq_len == 0 {
        return Err(DataError::config("max_seq_len", ">= 1", 0));
    }
    let mut input_ids = Vec::new();
    let mut labels = Vec::new();
    for (i, seg) in rendered.segments.iter().enumerate() {
        let ids = tokenizer.encode(&seg.text, i == 0 && opts.add_special_tokens)?;
        for id in ids {
            input_ids.push(id);
            labels.push(if seg.train {
                i64::from(id)
            } else {
                IGNORE_INDEX
            });
        }
    }
    if opts.append_eos {
        if let Some(eos) = tokenizer.eos_id() {
            if input_ids.last() != Some(&eos) {
                input_ids.push(eos);
                labels.push(i64::from(eos));
            }
        }
    }
    let truncated = input_ids.len() > opts.max_seq_len;
    input_ids.truncate(opts.max_seq_len);
    labels.truncate(opts.max_seq_len);
    if labels.iter().all(|l| *l == IGNORE_INDEX) {
        return Ok(None);
    }
    let n = input_ids.len();
    Ok(Some((
        Example {
            input_ids,
            labels,
            task,
            seq_lens: vec![n],
        },
        truncated,
    )))
}

/// Tokenize many rendered records of one task, dropping those with no trained token.
pub fn tokenize_all(
    rendered: &[Rendered],
    task: usize,
    tokenizer: &dyn Tokenize,
    opts: &TokenizeOptions,
) -> Result<(Vec<Example>, TokenizeStats)> {
    let mut out = Vec::with_capacity(rendered.len());
    let mut stats = TokenizeStats::default();
    for r in rendered {
        match tokenize_rendered(r, task, tokenizer, opts)? {
            Some((ex, truncated)) => {
                stats.kept += 1;
                stats.truncated += usize::from(truncated);
                out.push(ex);
            }
            None => stats.dropped += 1,
        }
    }
    Ok((out, stats))
}
