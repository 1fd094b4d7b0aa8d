//! `report.json` and `report.md`: what each piece of a run is worth, as measured.
//!
//! The writers take plain data: whoever ran the evaluation fills a [`Report`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::checkpoint::write_atomic;
use crate::error::{Result, TrainError};
use crate::metrics::RoutingStats;
use crate::trainer::StageSummary;

/// Metrics of one model variant on one task.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ModelMetrics {
    /// Held-out LM loss on the completion tokens.
    pub val_loss: Option<f64>,
    /// The evaluator's metrics (name → value).
    pub metrics: BTreeMap<String, f64>,
}

/// One task's row group.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TaskReport {
    /// Task (= expert) name.
    pub task: String,
    /// Evaluator used (`<plugin>/<evaluator>`).
    pub evaluator: String,
    /// Held-out examples evaluated.
    pub n_eval: usize,
    /// Per model variant (`base`, `single_lora`, `mixture`, ...).
    pub models: BTreeMap<String, ModelMetrics>,
    /// Share of this task's held-out tokens whose top expert is the task's own.
    pub routing_accuracy: Option<f64>,
    /// Mean routing entropy (nats) on this task's tokens.
    pub routing_entropy: Option<f64>,
    /// Share of this task's routed token slots per expert (expert order).
    pub expert_load: Option<Vec<f64>>,
    /// The evaluator's headline metric and whether higher is better.
    #[serde(default)]
    pub primary_metric: Option<(String, bool)>,
}

impl TaskReport {
    /// The headline metric of `variant` (`None` when not measured).
    pub fn headline(&self, variant: &str) -> Option<f64> {
        let (name, _) = self.primary_metric.as_ref()?;
        self.models.get(variant)?.metrics.get(name).copied()
    }

    /// Whether `a` beats `b` on the headline metric (`None` when either is missing).
    pub fn beats(&self, a: &str, b: &str) -> Option<bool> {
        let higher = self.primary_metric.as_ref()?.1;
        let (x, y) = (self.headline(a)?, self.headline(b)?);
        Some(if higher { x > y } else { x < y })
    }

    /// One line per compared pair: the mixture against the base and the single LoRA,
    /// and the learned router against the oracle routing.
    fn verdicts(&self) -> Vec<String> {
        let Some((metric, higher)) = &self.primary_metric else {
            return Vec::new();
        };
        let dir = if *higher { "higher" } else { "lower" };
        let mut lines = Vec::new();
        for (a, b) in [
            ("mixture", "base"),
            ("mixture", "single_lora"),
            ("oracle", "mixture"),
        ] {
            if let (Some(win), Some(x), Some(y)) =
                (self.beats(a, b), self.headline(a), self.headline(b))
            {
                let verb = if win { "beats" } else { "does not beat" };
                lines.push(format!(
                    "{}: {} {verb} {} on `{metric}` ({dir} is better): {} vs {}",
                    self.task,
                    variant_title(a),
                    variant_title(b),
                    num(x),
                    num(y)
                ));
            }
        }
        lines
    }
}

/// Trainable-parameter counts of a model variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ParamCount {
    /// Parameters trained.
    pub trainable: usize,
    /// All parameters.
    pub total: usize,
}

/// Everything `report.md` shows.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Report {
    /// Run name.
    pub run: String,
    /// Base model (path or name).
    pub base_model: String,
    /// How the base's frozen weights were stored (`"float32"`, `"nf4 projections,
    /// embeddings and lm_head bf16"`, ...).
    #[serde(default)]
    pub base_storage: String,
    /// The burn backend that ran (burn's name for it: `"flex"`, `"fusion<cubecl<wgpu<wgsl>>>"`, ...).
    #[serde(default)]
    pub backend: String,
    /// Expert names in gate order.
    pub experts: Vec<String>,
    /// Model variants in column order (`base`, `single_lora`, `mixture`).
    pub variants: Vec<String>,
    /// Per task.
    pub tasks: Vec<TaskReport>,
    /// Routing on held-out data, per layer (all tasks together).
    pub routing: Option<RoutingStats>,
    /// Trainable parameters per variant.
    pub params: BTreeMap<String, ParamCount>,
    /// The training stages.
    pub stages: Vec<StageSummary>,
    /// Plot files, relative to the report's folder.
    pub plots: Vec<String>,
    /// Free remarks (settings, caveats), printed as a list.
    pub notes: Vec<String>,
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e5) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(num).unwrap_or_else(|| "–".into())
}

fn variant_title(v: &str) -> String {
    match v {
        "base" => "base".into(),
        "single_lora" => "single LoRA".into(),
        "mixture" => "mixture".into(),
        "oracle" => "oracle routing".into(),
        other => other.to_string(),
    }
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

impl Report {
    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("Report serializes")
    }

    /// Read a `report.json`.
    pub fn read_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| TrainError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The "Results per task" table: every metric of every task per variant.
    fn results_table(&self, md: &mut String) {
        let _ = writeln!(md, "## Results per task\n");
        let mut header = String::from("| task | metric |");
        let mut rule = String::from("| --- | --- |");
        for v in &self.variants {
            let _ = write!(header, " {} |", variant_title(v));
            rule.push_str(" ---: |");
        }
        let _ = writeln!(*md, "{header}\n{rule}");
        for t in &self.tasks {
            let mut names: Vec<String> = Vec::new();
            for v in &self.variants {
                if let Some(m) = t.models.get(v) {
                    for k in m.metrics.keys() {
                        if !names.contains(k) {
                            names.push(k.clone());
                        }
                    }
                }
            }
            let task = format!("{} (n={}, {})", cell(&t.task), t.n_eval, cell(&t.evaluator));
            for name in &names {
                let mut row = format!("| {task} | {} |", cell(name));
                for v in &self.variants {
                    let val = t.models.get(v).and_then(|m| m.metrics.get(name)).copied();
                    let _ = write!(row, " {} |", opt(val));
                }
                let _ = writeln!(*md, "{row}");
            }
            if self
                .variants
                .iter()
                .any(|v| t.models.get(v).is_some_and(|m| m.val_loss.is_some()))
            {
                let mut row = format!("| {task} | val loss |");
                for v in &self.variants {
                    let _ = write!(row, " {} |", opt(t.models.get(v).and_then(|m| m.val_loss)));
                }
                let _ = writeln!(*md, "{row}");
            }
        }
        let _ = writeln!(*md);
    }

    /// The readable report.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# legora report: {}\n", self.run);
        let _ = writeln!(md, "Base model: `{}`  ", self.base_model);
        if !self.base_storage.is_empty() {
            let _ = writeln!(md, "Base weights stored as: {}  ", self.base_storage);
        }
        if !self.backend.is_empty() {
            let _ = writeln!(md, "Backend: {}  ", self.backend);
        }
        let _ = writeln!(
            md,
            "Experts (gate order): {}\n",
            self.experts
                .iter()
                .map(|e| format!("`{e}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            md,
            "All numbers are measured on held-out data of each task, as produced by the run; \
             nothing is rounded up or filtered.\n"
        );

        let verdicts: Vec<String> = self.tasks.iter().flat_map(TaskReport::verdicts).collect();
        if !verdicts.is_empty() {
            let _ = writeln!(md, "## Headline metric per task\n");
            let _ = writeln!(
                md,
                "Each task's evaluator names its headline metric. \"oracle routing\" sends every \
                 row to its own task's expert: the gap between it and the mixture is the cost of \
                 the learned router.\n"
            );
            for v in verdicts {
                let _ = writeln!(md, "- {v}");
            }
            let _ = writeln!(md);
        }

        // comparison table
        if self.variants.is_empty() {
            let _ = writeln!(
                md,
                "## Results per task\n\nNot evaluated (the evaluation was off).\n"
            );
        } else {
            self.results_table(&mut md);
        }

        // routing per task
        if self
            .tasks
            .iter()
            .any(|t| t.routing_accuracy.is_some() || t.expert_load.is_some())
        {
            let _ = writeln!(md, "## Routing on held-out data\n");
            let _ = writeln!(
                md,
                "Routing accuracy = share of a task's tokens whose top expert is the task's own \
                 expert; entropy in nats (0 = always one expert, ln E = uniform).\n"
            );
            let mut header = String::from("| task | routing accuracy | entropy |");
            let mut rule = String::from("| --- | ---: | ---: |");
            for e in &self.experts {
                let _ = write!(header, " load → {} |", cell(e));
                rule.push_str(" ---: |");
            }
            let _ = writeln!(md, "{header}\n{rule}");
            for t in &self.tasks {
                let mut row = format!(
                    "| {} | {} | {} |",
                    cell(&t.task),
                    opt(t.routing_accuracy),
                    opt(t.routing_entropy)
                );
                for e in 0..self.experts.len() {
                    let _ = write!(
                        row,
                        " {} |",
                        opt(t.expert_load.as_ref().and_then(|l| l.get(e)).copied())
                    );
                }
                let _ = writeln!(md, "{row}");
            }
            let _ = writeln!(md);
        }

        // load per layer
        if let Some(r) = &self.routing {
            let _ = writeln!(md, "## Load per expert per layer (all held-out tokens)\n");
            let mut header = String::from("| layer |");
            let mut rule = String::from("| --- |");
            for e in &self.experts {
                let _ = write!(header, " {} |", cell(e));
                rule.push_str(" ---: |");
            }
            let _ = writeln!(md, "{header}\n{rule}");
            for (l, row) in r.load.iter().enumerate() {
                let name = r
                    .layers
                    .get(l)
                    .cloned()
                    .unwrap_or_else(|| format!("layer {l}"));
                let mut line = format!("| `{}` |", cell(&name));
                for v in row {
                    let _ = write!(line, " {} |", num(*v));
                }
                let _ = writeln!(md, "{line}");
            }
            if r.accuracy.is_some() || r.entropy.is_some() {
                let _ = writeln!(
                    md,
                    "\nOverall routing accuracy {}, entropy {}.",
                    opt(r.accuracy),
                    opt(r.entropy)
                );
            }
            let _ = writeln!(md);
        }

        if !self.params.is_empty() {
            let _ = writeln!(md, "## Trainable parameters\n");
            let _ = writeln!(
                md,
                "| variant | trainable | all | trainable% |\n| --- | ---: | ---: | ---: |"
            );
            let mut keys: Vec<&String> = self
                .variants
                .iter()
                .filter(|v| self.params.contains_key(*v))
                .collect();
            for k in self.params.keys() {
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
            for k in keys {
                let p = self.params[k];
                let pct = if p.total == 0 {
                    0.0
                } else {
                    100.0 * p.trainable as f64 / p.total as f64
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {pct:.4} |",
                    variant_title(k),
                    p.trainable,
                    p.total
                );
            }
            let _ = writeln!(md);
        }

        if !self.stages.is_empty() {
            let _ = writeln!(md, "## Training stages\n");
            let _ = writeln!(md, "| stage | steps | ended | best val loss (step) | time (s) |\n| --- | ---: | --- | ---: | ---: |");
            for s in &self.stages {
                let ended = match &s.stop {
                    crate::trainer::StopReason::Completed => "completed".to_string(),
                    crate::trainer::StopReason::EarlyStopped { best_step } => {
                        format!("early stop (best at {best_step})")
                    }
                    crate::trainer::StopReason::Interrupted { step } => {
                        format!("interrupted at {step}")
                    }
                };
                let best = match (s.best_val_loss, s.best_step) {
                    (Some(l), Some(st)) => format!("{} ({st})", num(l)),
                    _ => "–".into(),
                };
                let _ = writeln!(
                    md,
                    "| {} | {}/{} | {ended} | {best} | {:.1} |",
                    cell(&s.stage),
                    s.steps,
                    s.total_steps,
                    s.elapsed_s
                );
            }
            let _ = writeln!(md);
        }

        if !self.plots.is_empty() {
            let _ = writeln!(md, "## Plots\n");
            for p in &self.plots {
                let _ = writeln!(md, "![{p}]({p})");
            }
            let _ = writeln!(md);
        }
        if !self.notes.is_empty() {
            let _ = writeln!(md, "## Notes\n");
            for n in &self.notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        md
    }

    /// Write `report.json` and `report.md` into `dir` (atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(&dir.join("report.json"), self.to_json().as_bytes())?;
        write_atomic(&dir.join("report.md"), self.to_markdown().as_bytes())
    }
}
