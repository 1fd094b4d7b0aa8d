//! Multi-task sampling: which task the next training row comes from, and which of its
//! examples, reproducibly from a seed and resumable from a saved [`SamplerState`].
//!
//! Each task walks through its own shuffled order of examples (a fresh permutation per
//! epoch of that task, seeded by the run seed, the task *name* and the epoch), so a
//! task sees the same example order whatever the other tasks are. The task of each row
//! is drawn from the mixing distribution:
//!
//! | mixing | `p_i` |
//! | --- | --- |
//! | `proportional` | `n_i / Σ n` (examples-proportional, T5) |
//! | `uniform` | `1 / K` |
//! | `temperature` (T) | `n_i^(1/T) / Σ n^(1/T)` (T = 1 proportional, T → ∞ uniform) |
//! | `balanced` | no draw: every batch holds `batch_size / K` rows of each task, in task order |
//!
//! `balanced` makes concurrent task-routed expert training equal to training each expert
//! alone on its own rows (same per-task order, same per-batch count).

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::rng::{derive_seed, stable_hash, Rng};

/// How tasks are mixed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mixing")]
pub enum Mixing {
    /// `p_i ∝ n_i`.
    Proportional,
    /// `p_i = 1/K`.
    Uniform,
    /// `p_i ∝ n_i^(1/T)`.
    Temperature {
        /// T > 0.
        temperature: f64,
    },
    /// `batch_size / K` rows of every task in every batch.
    Balanced,
}

impl Mixing {
    /// Parse a run-file name (`proportional`, `uniform`, `temperature`, `balanced`);
    /// `temperature` takes `t` (required for it, ignored otherwise).
    pub fn from_name(name: &str, t: Option<f64>) -> Result<Self> {
        match name {
            "proportional" => Ok(Self::Proportional),
            "uniform" => Ok(Self::Uniform),
            "balanced" => Ok(Self::Balanced),
            "temperature" => {
                let t = t.ok_or_else(|| {
                    DataError::config(
                        "temperature",
                        "a number > 0 for mixing = \"temperature\"",
                        "nothing",
                    )
                })?;
                let m = Self::Temperature { temperature: t };
                m.validate()?;
                Ok(m)
            }
            other => Err(DataError::config(
                "mixing",
                "one of \"proportional\", \"uniform\", \"temperature\", \"balanced\"",
                format!("\"{other}\""),
            )),
        }
    }

    fn validate(&self) -> Result<()> {
        if let Self::Temperature { temperature } = self {
            if !(*temperature > 0.0 && temperature.is_finite()) {
                return Err(DataError::config(
                    "temperature",
                    "a finite number > 0",
                    temperature,
                ));
            }
        }
        Ok(())
    }

    /// The task probabilities for tasks of `sizes` examples (they sum to 1; an empty
    /// task gets 0). `balanced` reports its long-run shares, `1/K`.
    pub fn probabilities(&self, sizes: &[usize]) -> Result<Vec<f64>> {
        self.validate()?;
        let w: Vec<f64> = sizes
            .iter()
            .map(|&n| {
                if n == 0 {
                    return 0.0;
                }
                match self {
                    Self::Proportional => n as f64,
                    Self::Uniform | Self::Balanced => 1.0,
                    Self::Temperature { temperature } => (n as f64).powf(1.0 / temperature),
                }
            })
            .collect();
        let total: f64 = w.iter().sum();
        if total <= 0.0 {
            return Err(DataError::EmptyTask {
                task: "(all tasks)".into(),
                what: "training examples".into(),
            });
        }
        Ok(w.into_iter().map(|x| x / total).collect())
    }
}

/// Where one task is in its example order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCursor {
    /// Completed passes over the task.
    pub epoch: u64,
    /// Next position in the current epoch's permutation.
    pub pos: usize,
}

/// Everything needed to continue sampling exactly where it stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    /// The run seed the sampler was built with.
    pub seed: u64,
    /// The task-draw generator.
    pub rng: Rng,
    /// Per-task cursors, in task order.
    pub cursors: Vec<TaskCursor>,
    /// Rows handed out so far.
    pub drawn: u64,
}

/// Draws `(task, example index)` pairs.
#[derive(Debug, Clone)]
pub struct MultiTaskSampler {
    names: Vec<String>,
    sizes: Vec<usize>,
    probs: Vec<f64>,
    mixing: Mixing,
    state: SamplerState,
    perms: Vec<Vec<usize>>,
}

impl MultiTaskSampler {
    /// A sampler over tasks given as `(name, number of examples)`.
    pub fn new(tasks: &[(String, usize)], mixing: Mixing, seed: u64) -> Result<Self> {
        if tasks.is_empty() {
            return Err(DataError::config("tasks", "at least one task", 0));
        }
        for (name, n) in tasks {
            if *n == 0 {
                return Err(DataError::EmptyTask {
                    task: name.clone(),
                    what: "training examples".into(),
                });
            }
        }
        let sizes: Vec<usize> = tasks.iter().map(|t| t.1).collect();
        let probs = mixing.probabilities(&sizes)?;
        let mut s = Self {
            names: tasks.iter().map(|t| t.0.clone()).collect(),
            sizes,
            probs,
            mixing,
            state: SamplerState {
                seed,
                rng: Rng::new(derive_seed(seed, &[stable_hash("task-mixing")])),
                cursors: vec![TaskCursor { epoch: 0, pos: 0 }; tasks.len()],
                drawn: 0,
            },
            perms: Vec::new(),
        };
        s.rebuild_perms();
        Ok(s)
    }

    fn perm(&self, task: usize, epoch: u64) -> Vec<usize> {
        let seed = derive_seed(self.state.seed, &[stable_hash(&self.names[task]), epoch]);
        Rng::new(seed).permutation(self.sizes[task])
    }

    fn rebuild_perms(&mut self) {
        self.perms = (0..self.sizes.len())
            .map(|t| self.perm(t, self.state.cursors[t].epoch))
            .collect();
    }

    /// Task probabilities in use.
    pub fn probabilities(&self) -> &[f64] {
        &self.probs
    }

    /// The mixing rule.
    pub fn mixing(&self) -> Mixing {
        self.mixing
    }

    /// Task names, in index order.
    pub fn task_names(&self) -> &[String] {
        &self.names
    }

    /// The next example of `task` in its order (advancing its cursor).
    pub fn next_of(&mut self, task: usize) -> usize {
        let c = &mut self.state.cursors[task];
        if c.pos == self.sizes[task] {
            c.epoch += 1;
            c.pos = 0;
            let epoch = c.epoch;
            self.perms[task] = self.perm(task, epoch);
        }
        let c = &mut self.state.cursors[task];
        let idx = self.perms[task][c.pos];
        c.pos += 1;
        self.state.drawn += 1;
        idx
    }

    /// The next `(task, example index)`: a task drawn by the mixing probabilities
    /// (`balanced`: cycling through tasks), then that task's next example.
    pub fn draw(&mut self) -> (usize, usize) {
        let task = match self.mixing {
            Mixing::Balanced => (self.state.drawn % self.sizes.len() as u64) as usize,
            _ => self.state.rng.weighted(&self.probs),
        };
        (task, self.next_of(task))
    }

    /// The `(task, example)` pairs of one batch of `batch_size` rows. With `balanced`,
    /// `batch_size` must be a multiple of the number of tasks; rows come grouped by task.
    pub fn next_batch(&mut self, batch_size: usize) -> Result<Vec<(usize, usize)>> {
        if batch_size == 0 {
            return Err(DataError::config("batch_size", ">= 1", 0));
        }
        if self.mixing == Mixing::Balanced {
            let k = self.sizes.len();
            if batch_size % k != 0 {
                return Err(DataError::config(
                    "batch_size",
                    format!("a multiple of the number of tasks ({k}) with mixing = \"balanced\""),
                    batch_size,
                ));
            }
            let mut out = Vec::with_capacity(batch_size);
            for t in 0..k {
                for _ in 0..batch_size / k {
                    out.push((t, self.next_of(t)));
                }
            }
            return Ok(out);
        }
        Ok((0..batch_size).map(|_| self.draw()).collect())
    }

    /// The state to save in a checkpoint.
    pub fn state(&self) -> &SamplerState {
        &self.state
    }

    /// Continue from a saved state (same tasks, sizes and seed required).
    pub fn restore(&mut self, state: SamplerState) -> Result<()> {
        if state.cursors.len() != self.sizes.len() {
            return Err(DataError::state(
                "cursors (number of tasks)",
                self.sizes.len(),
                state.cursors.len(),
            ));
        }
        for (t, c) in state.cursors.iter().enumerate() {
            if c.pos > self.sizes[t] {
                return Err(DataError::state(
                    format!("cursors[{t}].pos (task `{}`)", self.names[t]),
                    format!("<= {}", self.sizes[t]),
                    c.pos,
                ));
            }
        }
        self.state = state;
        self.rebuild_perms();
        Ok(())
    }
}
