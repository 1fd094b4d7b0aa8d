//! Training progress: indicatif bars on a terminal, plain log lines off one (a pipe, a
//! file, nohup, CI) so that `legora train … > log.txt 2>&1` shows where a run is while it
//! runs.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use legora::train::{EvalMetrics, EvalProgress, StageSummary, TrainCallback, TrainMetrics};

/// Seconds between two progress lines off a terminal (`LEGORA_PROGRESS_SECS`, default 10).
pub const INTERVAL_ENV: &str = "LEGORA_PROGRESS_SECS";

/// Progress of the training stages, one bar (or one stream of lines) per stage.
pub struct Progress {
    sink: Sink,
}

enum Sink {
    /// A terminal: a bar per stage.
    Bar(Option<ProgressBar>),
    /// Anything else: a line every `every` (and at a stage's first and last step).
    Lines {
        every: Duration,
        last: Option<Instant>,
        stage: String,
        start: Instant,
        start_step: usize,
    },
}

impl Default for Progress {
    fn default() -> Self {
        Self::new(std::io::stderr().is_terminal())
    }
}

impl Progress {
    /// Bars when `terminal`, else log lines.
    pub fn new(terminal: bool) -> Self {
        let secs = std::env::var(INTERVAL_ENV)
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .unwrap_or(10.0);
        let sink = if terminal {
            Sink::Bar(None)
        } else {
            Sink::Lines {
                every: Duration::from_secs_f64(secs),
                last: None,
                stage: String::new(),
                start: Instant::now(),
                start_step: 0,
            }
        };
        Self { sink }
    }
}

/// `1h02m03s`, `4m05s`, `6s`.
fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

fn bar(stage: &str, start_step: usize, total_steps: usize, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{prefix:>12}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{msg}}  ({{elapsed}} < {{eta}})"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(stage.to_string());
    bar.set_position(start_step as u64);
    bar
}

fn eval_line(m: &EvalMetrics) -> String {
    format!(
        "{:>12} step {:>5}: val_loss {:.4}{}",
        m.stage,
        m.step,
        m.val_loss,
        m.routing
            .as_ref()
            .and_then(|r| r.accuracy)
            .map(|a| format!("  routing accuracy {a:.3}"))
            .unwrap_or_default()
    )
}

impl TrainCallback for Progress {
    fn on_stage_start(&mut self, stage: &str, start_step: usize, total_steps: usize) {
        match &mut self.sink {
            Sink::Bar(b) => *b = Some(bar(stage, start_step, total_steps, "steps")),
            Sink::Lines {
                last,
                stage: name,
                start,
                start_step: first,
                ..
            } => {
                eprintln!("{stage}: starting at step {start_step} of {total_steps}");
                *last = None;
                *name = stage.to_string();
                *start = Instant::now();
                *first = start_step;
            }
        }
    }

    fn on_step(&mut self, m: &TrainMetrics) {
        match &mut self.sink {
            Sink::Bar(Some(bar)) => {
                bar.set_position(m.step as u64);
                bar.set_message(format!(
                    "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                    m.loss, m.lr, m.tokens_per_second
                ));
            }
            Sink::Bar(None) => {}
            Sink::Lines {
                every,
                last,
                stage,
                start,
                start_step,
            } => {
                let due = last.is_none_or(|t| t.elapsed() >= *every) || m.step == m.total_steps;
                if !due {
                    return;
                }
                *last = Some(Instant::now());
                let done = m.step.saturating_sub(*start_step).max(1) as f64;
                let per_step = start.elapsed().as_secs_f64() / done;
                let eta = per_step * m.total_steps.saturating_sub(m.step) as f64;
                eprintln!(
                    "{stage}: step {}/{}  loss {:.4}  lr {:.2e}  {:.0} tok/s  elapsed {}  eta {}",
                    m.step,
                    m.total_steps,
                    m.loss,
                    m.lr,
                    m.tokens_per_second,
                    duration(start.elapsed().as_secs_f64()),
                    duration(eta)
                );
            }
        }
    }

    fn on_eval(&mut self, m: &EvalMetrics) {
        match &self.sink {
            Sink::Bar(Some(bar)) => bar.println(eval_line(m)),
            Sink::Bar(None) => {}
            Sink::Lines { .. } => eprintln!("{}", eval_line(m)),
        }
    }

    fn on_eval_progress(&mut self, p: &EvalProgress) {
        let first = p.done == 0;
        match &mut self.sink {
            Sink::Bar(b) => {
                if first {
                    if let Some(old) = b.take() {
                        old.finish_and_clear();
                    }
                    let name = format!("eval {}/{}", p.pair, p.pairs);
                    let bar = bar(&name, 0, p.total, "samples");
                    bar.set_message(format!("{} on {}", p.variant, p.task));
                    *b = Some(bar);
                }
                if let Some(bar) = b {
                    bar.set_position(p.done as u64);
                    if p.done == p.total && p.pair == p.pairs {
                        bar.finish_and_clear();
                    }
                }
            }
            Sink::Lines {
                every, last, start, ..
            } => {
                if first {
                    *start = Instant::now();
                }
                let due = first || last.is_none_or(|t| t.elapsed() >= *every) || p.done == p.total;
                if !due {
                    return;
                }
                *last = Some(Instant::now());
                let secs = start.elapsed().as_secs_f64();
                let rate = p.done as f64 / secs.max(1e-9);
                let eta = if p.done == 0 {
                    "?".to_string()
                } else {
                    duration(p.total.saturating_sub(p.done) as f64 / rate)
                };
                eprintln!(
                    "eval {}/{}: {} on {}  {}/{} samples  {:.2} samples/s  elapsed {}  eta {}",
                    p.pair,
                    p.pairs,
                    p.variant,
                    p.task,
                    p.done,
                    p.total,
                    rate,
                    duration(secs),
                    eta
                );
            }
        }
    }

    fn on_stage_end(&mut self, s: &StageSummary) {
        match &mut self.sink {
            Sink::Bar(b) => {
                if let Some(bar) = b.take() {
                    bar.finish_with_message(format!("{:?}", s.stop));
                }
            }
            Sink::Lines { .. } => eprintln!(
                "{}: ended after {}/{} steps ({:?}) in {}",
                s.stage,
                s.steps,
                s.total_steps,
                s.stop,
                duration(s.elapsed_s)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::duration;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(5.4), "5s");
        assert_eq!(duration(245.0), "4m05s");
        assert_eq!(duration(3723.0), "1h02m03s");
        assert_eq!(duration(-1.0), "0s");
    }
}
