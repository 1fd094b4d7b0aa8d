//! Deterministic train/validation splits.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::rng::{derive_seed, stable_hash, Rng};

/// How much of a task goes to validation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ValSplit {
    /// This many examples.
    Count(usize),
    /// This share of the examples, rounded to the nearest integer, in `[0, 1)`.
    Fraction(f64),
}

/// Indices of a split, each list in increasing (file) order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Training indices.
    pub train: Vec<usize>,
    /// Validation indices.
    pub val: Vec<usize>,
}

/// Split `n` examples of task `task` reproducibly: a permutation seeded by `seed` and the
/// task name picks the validation examples. At least one example always stays in train.
pub fn split_indices(n: usize, val: ValSplit, seed: u64, task: &str) -> Result<Split> {
    let k = match val {
        ValSplit::Count(k) => k,
        ValSplit::Fraction(f) => {
            if !(0.0..1.0).contains(&f) {
                return Err(DataError::config("val_fraction", "a share in [0, 1)", f));
            }
            (n as f64 * f).round() as usize
        }
    };
    if n > 0 && k >= n {
        return Err(DataError::config(
            "val_size",
            format!("fewer than the task's {n} examples (task `{task}`)"),
            k,
        ));
    }
    let mut perm = Rng::new(derive_seed(
        seed,
        &[stable_hash(task), stable_hash("split")],
    ))
    .permutation(n);
    let mut val: Vec<usize> = perm.drain(..k.min(n)).collect();
    val.sort_unstable();
    perm.sort_unstable();
    Ok(Split { train: perm, val })
}

/// Pick the items of `items` at `indices`.
pub fn select<T: Clone>(items: &[T], indices: &[usize]) -> Vec<T> {
    indices.iter().map(|&i| items[i].clone()).collect()
}
