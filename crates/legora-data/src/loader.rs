//! From records to an endless, resumable stream of training batches.

use legora_plugin_api::Record;
use serde::{Deserialize, Serialize};

use crate::batch::{pack, Batch, Batcher};
use crate::error::{DataError, Result};
use crate::rng::{derive_seed, stable_hash};
use crate::sampler::{Mixing, MultiTaskSampler, SamplerState};
use crate::template::Template;
use crate::tokenize::{tokenize_rendered, Example, Tokenize, TokenizeOptions, TokenizeStats};

/// Render and tokenize the records of task number `task`.
///
/// Records whose trained tokens are all cut by truncation are dropped and counted.
pub fn prepare_task(
    records: &[Record],
    task: usize,
    template: &Template,
    tokenizer: &dyn Tokenize,
    opts: &TokenizeOptions,
) -> Result<(Vec<Example>, TokenizeStats)> {
    let mut out = Vec::with_capacity(records.len());
    let mut stats = TokenizeStats::default();
    for (i, rec) in records.iter().enumerate() {
        let rendered = template.render(rec, i)?;
        match tokenize_rendered(&rendered, task, tokenizer, opts)? {
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

/// What a checkpoint stores about the data stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// The sampler (RNG, per-task cursors).
    pub sampler: SamplerState,
    /// Batches produced so far.
    pub batches: u64,
}

/// The training stream of one stage: per-task examples, a [`MultiTaskSampler`], a
/// [`Batcher`]. Deterministic given the seed; [`state`](Self::state) /
/// [`restore`](Self::restore) continue it exactly.
#[derive(Debug, Clone)]
pub struct Loader {
    tasks: Vec<Vec<Example>>,
    sampler: MultiTaskSampler,
    batcher: Batcher,
    batch_size: usize,
    batches: u64,
}

impl Loader {
    /// A loader over `(task name, examples)`; every example's `task` must equal its
    /// position in `tasks`. With `pack = Some(max_len)` each task's examples are packed
    /// into rows first (deterministically from the seed).
    pub fn new(
        tasks: Vec<(String, Vec<Example>)>,
        mixing: Mixing,
        seed: u64,
        batcher: Batcher,
        batch_size: usize,
        pack_to: Option<usize>,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(DataError::config("batch_size", ">= 1", 0));
        }
        let mut names = Vec::with_capacity(tasks.len());
        let mut rows = Vec::with_capacity(tasks.len());
        for (t, (name, examples)) in tasks.into_iter().enumerate() {
            if let Some(ex) = examples.iter().find(|e| e.task != t) {
                return Err(DataError::config(
                    format!("task index of an example of `{name}`"),
                    t.to_string(),
                    ex.task,
                ));
            }
            let examples = match pack_to {
                Some(max_len) => pack(
                    &examples,
                    max_len,
                    derive_seed(seed, &[stable_hash(&name), stable_hash("pack")]),
                )?,
                None => examples,
            };
            names.push((name, examples.len()));
            rows.push(examples);
        }
        let sampler = MultiTaskSampler::new(&names, mixing, seed)?;
        Ok(Self {
            tasks: rows,
            sampler,
            batcher,
            batch_size,
            batches: 0,
        })
    }

    /// The next batch.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let picks = self.sampler.next_batch(self.batch_size)?;
        let rows: Vec<&Example> = picks.iter().map(|&(t, i)| &self.tasks[t][i]).collect();
        self.batches += 1;
        self.batcher.collate(&rows)
    }

    /// Rows per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Training rows of all tasks (after packing).
    pub fn num_rows(&self) -> usize {
        self.tasks.iter().map(Vec::len).sum()
    }

    /// Batches per epoch: `ceil(rows / batch_size)`.
    pub fn batches_per_epoch(&self) -> usize {
        self.num_rows().div_ceil(self.batch_size)
    }

    /// The sampler (probabilities, names).
    pub fn sampler(&self) -> &MultiTaskSampler {
        &self.sampler
    }

    /// Where the stream is.
    pub fn state(&self) -> LoaderState {
        LoaderState {
            sampler: self.sampler.state().clone(),
            batches: self.batches,
        }
    }

    /// Continue from a saved state.
    pub fn restore(&mut self, state: LoaderState) -> Result<()> {
        self.sampler.restore(state.sampler)?;
        self.batches = state.batches;
        Ok(())
    }
}

/// Fixed evaluation batches: examples in order, `batch_size` at a time.
pub fn eval_batches(
    examples: &[Example],
    batch_size: usize,
    batcher: &Batcher,
) -> Result<Vec<Batch>> {
    if batch_size == 0 {
        return Err(DataError::config("batch_size", ">= 1", 0));
    }
    examples
        .chunks(batch_size)
        .map(|c| batcher.collate(&c.iter().collect::<Vec<_>>()))
        .collect()
}
