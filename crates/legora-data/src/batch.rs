//! Padded batches and sequence packing.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::rng::Rng;
use crate::tokenize::{Example, Tokenize, IGNORE_INDEX};

/// A padded batch, row-major `[batch_size, seq_len]` host arrays.
///
/// Padding is on the right (training). A packed row holds several sequences: tokens of
/// sequence `k` of a row have `sequence_ids == k` and positions restarting at 0, so the
/// model must attend only within the same sequence (block-diagonal causal mask).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Rows.
    pub batch_size: usize,
    /// Columns (longest row, rounded up by the batcher's padding rule).
    pub seq_len: usize,
    /// Token ids, pad id after each row's end.
    pub input_ids: Vec<u32>,
    /// Targets (HF convention, unshifted); padding is [`IGNORE_INDEX`].
    pub labels: Vec<i64>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u32>,
    /// Position of each token within its own sequence (0 on padding).
    pub position_ids: Vec<u32>,
    /// Index of the packed sequence each token belongs to within its row (0 when not
    /// packed; padding repeats the last index and is masked by `attention_mask`).
    pub sequence_ids: Vec<u32>,
    /// Task (= expert) index of each row.
    pub task_ids: Vec<usize>,
}

impl Batch {
    /// Number of labels that carry loss, counting the HF shift (the first token of each
    /// row is never predicted).
    pub fn num_target_tokens(&self) -> usize {
        let mut n = 0;
        for b in 0..self.batch_size {
            let row = &self.labels[b * self.seq_len..(b + 1) * self.seq_len];
            n += row.iter().skip(1).filter(|l| **l != IGNORE_INDEX).count();
        }
        n
    }

    /// Number of real (non-padding) tokens.
    pub fn num_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|m| **m != 0).count()
    }

    /// Whether any row holds more than one sequence.
    pub fn is_packed(&self) -> bool {
        self.sequence_ids.iter().any(|s| *s != 0)
    }

    /// `input_ids` of row `b`.
    pub fn row_ids(&self, b: usize) -> &[u32] {
        &self.input_ids[b * self.seq_len..(b + 1) * self.seq_len]
    }

    /// `labels` of row `b`.
    pub fn row_labels(&self, b: usize) -> &[i64] {
        &self.labels[b * self.seq_len..(b + 1) * self.seq_len]
    }

    /// The given rows, in order, with the columns after their last real token dropped
    /// (at least one column is kept).
    pub fn select_rows(&self, rows: &[usize]) -> Batch {
        let s = self.seq_len;
        let end = rows
            .iter()
            .filter_map(|&r| {
                self.attention_mask[r * s..(r + 1) * s]
                    .iter()
                    .rposition(|m| *m != 0)
            })
            .max()
            .map_or(1, |last| last + 1);
        // the first `end` columns of the chosen rows of a `[batch, s]` field
        fn pick<T: Copy>(v: &[T], rows: &[usize], s: usize, end: usize) -> Vec<T> {
            rows.iter()
                .flat_map(|&r| v[r * s..r * s + end].iter().copied())
                .collect()
        }
        Batch {
            batch_size: rows.len(),
            seq_len: end,
            input_ids: pick(&self.input_ids, rows, s, end),
            labels: pick(&self.labels, rows, s, end),
            attention_mask: pick(&self.attention_mask, rows, s, end),
            position_ids: pick(&self.position_ids, rows, s, end),
            sequence_ids: pick(&self.sequence_ids, rows, s, end),
            task_ids: rows.iter().map(|&r| self.task_ids[r]).collect(),
        }
    }

    /// Rank `rank`'s rows of `world` data-parallel peers: a contiguous run of rows, the
    /// first `batch_size % world` ranks holding one more (a rank may hold none), trimmed
    /// as [`select_rows`](Self::select_rows) trims.
    pub fn shard(&self, rank: usize, world: usize) -> Batch {
        let world = world.max(1);
        let (base, extra) = (self.batch_size / world, self.batch_size % world);
        let start = rank * base + rank.min(extra);
        let len = if rank < world {
            base + usize::from(rank < extra)
        } else {
            0
        };
        let rows: Vec<usize> = (start..(start + len).min(self.batch_size)).collect();
        self.select_rows(&rows)
    }

    /// The counts a loss over this batch is normalised by (see [`BatchTotals`]).
    pub fn totals(&self) -> BatchTotals {
        let (b, s) = (self.batch_size, self.seq_len);
        let tasks = self.task_ids.iter().copied().max().map_or(1, |m| m + 1);
        let mut t = BatchTotals {
            target_tokens: 0,
            real_tokens: 0,
            task_target_tokens: vec![0; tasks],
            task_real_tokens: vec![0; tasks],
        };
        for r in 0..b {
            let task = self.task_ids.get(r).copied().unwrap_or(0);
            let targets = self.labels[r * s..(r + 1) * s]
                .iter()
                .skip(1)
                .filter(|l| **l != IGNORE_INDEX)
                .count();
            let real = self.attention_mask[r * s..(r + 1) * s]
                .iter()
                .filter(|m| **m != 0)
                .count();
            t.target_tokens += targets;
            t.real_tokens += real;
            t.task_target_tokens[task] += targets;
            t.task_real_tokens[task] += real;
        }
        t
    }

    /// One batch per task present (in order of first appearance), each trimmed to its own
    /// longest row: the same rows in fewer padded tokens when tasks differ in length.
    pub fn split_by_task(&self) -> Vec<Batch> {
        let mut order: Vec<usize> = Vec::new();
        for &t in &self.task_ids {
            if !order.contains(&t) {
                order.push(t);
            }
        }
        order
            .into_iter()
            .map(|t| {
                let rows: Vec<usize> = (0..self.batch_size)
                    .filter(|&r| self.task_ids[r] == t)
                    .collect();
                self.select_rows(&rows)
            })
            .collect()
    }
}

/// The token counts of a whole batch that a loss over it (or over one of its
/// [shards](Batch::shard)) is normalised by. A data-parallel peer computes its shard's
/// loss with the whole batch's totals, so the peers' losses — and gradients — sum to
/// the whole batch's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchTotals {
    /// Labels that carry loss, after the HF shift.
    pub target_tokens: usize,
    /// Real (non-padding) tokens.
    pub real_tokens: usize,
    /// `target_tokens` per task id.
    pub task_target_tokens: Vec<usize>,
    /// `real_tokens` per task id.
    pub task_real_tokens: Vec<usize>,
}

impl BatchTotals {
    /// Target tokens of task `task` (0 when the batch has none).
    pub fn task_targets(&self, task: usize) -> usize {
        self.task_target_tokens.get(task).copied().unwrap_or(0)
    }

    /// Real tokens of task `task` (0 when the batch has none).
    pub fn task_real(&self, task: usize) -> usize {
        self.task_real_tokens.get(task).copied().unwrap_or(0)
    }

    /// Tasks with at least one real token.
    pub fn tasks_present(&self) -> usize {
        self.task_real_tokens.iter().filter(|n| **n > 0).count()
    }
}

/// Collates [`Example`]s into a [`Batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batcher {
    /// Id written into padding.
    pub pad_id: u32,
    /// Pad every batch to this length instead of its longest row.
    pub pad_to: Option<usize>,
    /// Round the padded length up to a multiple of this (e.g. 8 for tensor cores).
    pub pad_to_multiple_of: Option<usize>,
}

impl Batcher {
    /// Pad to the longest row with `pad_id`.
    pub fn new(pad_id: u32) -> Self {
        Self {
            pad_id,
            pad_to: None,
            pad_to_multiple_of: None,
        }
    }

    /// Pad with the tokenizer's pad id, else its EOS, else 0 (padding carries no loss
    /// and no attention, so its id only has to be valid).
    pub fn for_tokenizer(tokenizer: &dyn Tokenize) -> Self {
        Self::new(tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0))
    }

    /// Stack examples, right-padded.
    pub fn collate(&self, examples: &[&Example]) -> Result<Batch> {
        if examples.is_empty() {
            return Err(DataError::config("batch", "at least one example", 0));
        }
        let longest = examples.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut seq_len = match self.pad_to {
            Some(n) if n < longest => {
                return Err(DataError::config(
                    "pad_to",
                    format!("at least the longest row ({longest})"),
                    n,
                ))
            }
            Some(n) => n,
            None => longest,
        };
        if let Some(m) = self.pad_to_multiple_of.filter(|m| *m > 1) {
            seq_len = seq_len.div_ceil(m) * m;
        }
        let b = examples.len();
        let mut batch = Batch {
            batch_size: b,
            seq_len,
            input_ids: vec![self.pad_id; b * seq_len],
            labels: vec![IGNORE_INDEX; b * seq_len],
            attention_mask: vec![0; b * seq_len],
            position_ids: vec![0; b * seq_len],
            sequence_ids: vec![0; b * seq_len],
            task_ids: Vec::with_capacity(b),
        };
        for (r, ex) in examples.iter().enumerate() {
            let total: usize = ex.seq_lens.iter().sum();
            if total != ex.len() || ex.labels.len() != ex.len() {
                return Err(DataError::config(
                    "example",
                    format!(
                        "input_ids, labels and Σ seq_lens of equal length ({})",
                        ex.len()
                    ),
                    format!("labels {}, Σ seq_lens {total}", ex.labels.len()),
                ));
            }
            let base = r * seq_len;
            batch.input_ids[base..base + ex.len()].copy_from_slice(&ex.input_ids);
            batch.labels[base..base + ex.len()].copy_from_slice(&ex.labels);
            let mut t = base;
            for (k, &len) in ex.seq_lens.iter().enumerate() {
                for p in 0..len {
                    batch.attention_mask[t] = 1;
                    batch.position_ids[t] = p as u32;
                    batch.sequence_ids[t] = k as u32;
                    t += 1;
                }
            }
            let last = ex.seq_lens.len().saturating_sub(1) as u32;
            for s in &mut batch.sequence_ids[t..base + seq_len] {
                *s = last;
            }
            batch.task_ids.push(ex.task);
        }
        Ok(batch)
    }
}

/// Pack examples of one task into rows of at most `max_len` tokens: examples are taken
/// in a seeded random order and appended to the current row while they fit (next-fit),
/// never split. Each packed row records its sequence lengths.
pub fn pack(examples: &[Example], max_len: usize, seed: u64) -> Result<Vec<Example>> {
    if max_len == 0 {
        return Err(DataError::config("max_seq_len", ">= 1", 0));
    }
    let mut order: Vec<usize> = (0..examples.len()).collect();
    Rng::new(seed).shuffle(&mut order);
    let mut rows: Vec<Example> = Vec::new();
    let mut cur: Option<Example> = None;
    for i in order {
        let ex = &examples[i];
        if ex.len() > max_len {
            return Err(DataError::config(
                "max_seq_len",
                format!("at least every example's length ({})", ex.len()),
                max_len,
            ));
        }
        match cur.as_mut() {
            Some(row) if row.task == ex.task && row.len() + ex.len() <= max_len => {
                row.input_ids.extend_from_slice(&ex.input_ids);
                let start = row.labels.len();
                row.labels.extend_from_slice(&ex.labels);
                // the first token of a packed sequence is never predicted from the
                // previous sequence
                row.labels[start] = IGNORE_INDEX;
                row.seq_lens.extend_from_slice(&ex.seq_lens);
            }
            _ => {
                if let Some(row) = cur.take() {
                    rows.push(row);
                }
                cur = Some(ex.clone());
            }
        }
    }
    rows.extend(cur);
    Ok(rows)
}
