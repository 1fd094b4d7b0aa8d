//! `metrics.jsonl`: one JSON object per line, `"kind": "train"` per logged optimizer
//! step and `"kind": "eval"` per validation.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Routing statistics of a mixture, as the model reports them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RoutingStats {
    /// Layer (module path) names, one per row of `load`.
    pub layers: Vec<String>,
    /// Share of routed token slots per expert, `[layer][expert]` (rows sum to 1).
    pub load: Vec<Vec<f64>>,
    /// Share of each task's tokens whose top expert is the task's own expert.
    pub accuracy: Option<f64>,
    /// Mean entropy (nats) of the router's distribution per token.
    pub entropy: Option<f64>,
}

impl RoutingStats {
    /// Weighted mean of several stats (e.g. over validation batches); layers must agree.
    pub fn weighted_mean(items: &[(RoutingStats, f64)]) -> Option<RoutingStats> {
        let (first, _) = items.first()?;
        let total: f64 = items.iter().map(|(_, w)| w).sum();
        if total <= 0.0 {
            return None;
        }
        let mut load = vec![vec![0.0; first.load.first().map_or(0, Vec::len)]; first.load.len()];
        let mut acc = (0.0, 0.0);
        let mut ent = (0.0, 0.0);
        for (s, w) in items {
            if s.load.len() != load.len() {
                return None;
            }
            for (row, src) in load.iter_mut().zip(&s.load) {
                if row.len() != src.len() {
                    return None;
                }
                for (a, b) in row.iter_mut().zip(src) {
                    *a += b * w / total;
                }
            }
            if let Some(a) = s.accuracy {
                acc = (acc.0 + a * w, acc.1 + w);
            }
            if let Some(e) = s.entropy {
                ent = (ent.0 + e * w, ent.1 + w);
            }
        }
        Some(RoutingStats {
            layers: first.layers.clone(),
            load,
            accuracy: (acc.1 > 0.0).then(|| acc.0 / acc.1),
            entropy: (ent.1 > 0.0).then(|| ent.0 / ent.1),
        })
    }
}

/// One logged optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainMetrics {
    /// Stage name.
    pub stage: String,
    /// Optimizer steps completed (1-based for the step just taken).
    pub step: usize,
    /// Steps planned.
    pub total_steps: usize,
    /// Passes over the training rows so far.
    pub epoch: f64,
    /// Objective (mean over the accumulated micro-batches).
    pub loss: f64,
    /// Named loss terms reported by the model (`lm_loss`, `aux_loss`, ...).
    pub terms: BTreeMap<String, f64>,
    /// Learning rate used for this step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens that carried loss in this step.
    pub target_tokens: usize,
    /// Real (non-padding) tokens processed per second in this step.
    pub tokens_per_second: f64,
    /// Seconds since the stage started (this process).
    pub elapsed_s: f64,
}

/// One validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Stage name.
    pub stage: String,
    /// Optimizer steps completed.
    pub step: usize,
    /// Token-weighted mean validation loss (the model's `lm_loss` term, else its loss).
    pub val_loss: f64,
    /// The same per task.
    pub task_losses: BTreeMap<String, f64>,
    /// Routing statistics on the validation data, when the model reports them.
    pub routing: Option<RoutingStats>,
    /// Whether this is the best validation loss so far.
    pub is_best: bool,
}

/// A line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetricLine {
    /// A training step.
    Train(TrainMetrics),
    /// A validation.
    Eval(EvalMetrics),
}

/// Appends lines to `metrics.jsonl`.
#[derive(Debug, Clone)]
pub struct MetricsWriter {
    path: PathBuf,
}

impl MetricsWriter {
    /// A writer appending to `path` (created with its folder when missing).
    pub fn new(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        }
        Ok(Self { path })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Current length in bytes (0 when missing).
    pub fn len(&self) -> u64 {
        fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// Whether the file is empty or missing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cut the file back to `len` bytes (used on resume), and further back to the end
    /// of its last complete line: a line torn by a kill is dropped, never kept half.
    pub fn truncate(&self, len: u64) -> Result<()> {
        if !self.path.exists() {
            return Ok(());
        }
        let bytes = legora_hub::io::read_regular(&self.path)?;
        let keep = (len as usize).min(bytes.len());
        let keep = bytes[..keep]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let f = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| TrainError::io(&self.path, e))?;
        f.set_len(keep as u64)
            .map_err(|e| TrainError::io(&self.path, e))
    }

    /// Append one line.
    pub fn write(&self, line: &MetricLine) -> Result<()> {
        let mut text = serde_json::to_string(line).map_err(|e| TrainError::Json {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        text.push('\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| TrainError::io(&self.path, e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

/// Read every line of a `metrics.jsonl` file.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricLine>> {
    let f = fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    let mut out = Vec::new();
    let lines: Vec<String> = BufReader::new(f)
        .lines()
        .collect::<std::io::Result<_>>()
        .map_err(|e| TrainError::io(path, e))?;
    let n = lines.len();
    for (i, line) in lines.into_iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        // a last line torn by a kill (the run resumes and writes it again) is skipped
        if i + 1 == n && serde_json::from_str::<MetricLine>(&line).is_err() {
            break;
        }
        out.push(serde_json::from_str(&line).map_err(|e| TrainError::Json {
            path: path.to_path_buf(),
            message: format!("line {}: {e}", i + 1),
        })?);
    }
    Ok(out)
}
