//! Learning-rate schedules: linear warmup, then cosine, linear or constant, as Hugging
//! Face transformers' `get_{cosine,linear,constant}_schedule_with_warmup` (optimizer
//! step `s`, 0-based, uses `lr(s)`), with an optional floor (`min_lr_ratio`, as
//! `cosine_with_min_lr`).

use serde::{Deserialize, Serialize};

/// The decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Half a cosine from the peak to the floor.
    Cosine,
    /// A straight line from the peak to the floor.
    Linear,
    /// The peak throughout.
    Constant,
}

impl std::str::FromStr for ScheduleKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cosine" => Ok(Self::Cosine),
            "linear" => Ok(Self::Linear),
            "constant" | "constant_with_warmup" => Ok(Self::Constant),
            other => Err(format!(
                "expected one of \"cosine\", \"linear\", \"constant\", found \"{other}\""
            )),
        }
    }
}

/// A learning-rate schedule over `total` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Warmup steps (lr rises linearly from 0).
    pub warmup: usize,
    /// All steps.
    pub total: usize,
    /// Decay shape.
    pub kind: ScheduleKind,
    /// Floor as a share of `peak`.
    pub min_ratio: f64,
}

impl LrSchedule {
    /// A schedule.
    pub fn new(peak: f64, warmup: usize, total: usize, kind: ScheduleKind) -> Self {
        Self {
            peak,
            warmup,
            total,
            kind,
            min_ratio: 0.0,
        }
    }

    /// Set the floor.
    pub fn with_min_ratio(mut self, r: f64) -> Self {
        self.min_ratio = r;
        self
    }

    /// The multiplier of `peak` at step `step` (HF's `lr_lambda`).
    pub fn factor(&self, step: usize) -> f64 {
        if step < self.warmup {
            return step as f64 / self.warmup.max(1) as f64;
        }
        let progress =
            (step - self.warmup) as f64 / (self.total.saturating_sub(self.warmup)).max(1) as f64;
        let decay = match self.kind {
            ScheduleKind::Constant => return 1.0,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
            ScheduleKind::Linear => (1.0 - progress).max(0.0),
        };
        self.min_ratio + (1.0 - self.min_ratio) * decay
    }

    /// The learning rate at step `step`.
    pub fn lr(&self, step: usize) -> f64 {
        self.peak * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn hand_values() {
        // peak 1e-3, 10 warmup steps, 110 total: 100 decay steps.
        let cos = LrSchedule::new(1e-3, 10, 110, ScheduleKind::Cosine);
        close(cos.lr(0), 0.0);
        close(cos.lr(5), 0.5e-3); // 5/10
        close(cos.lr(10), 1e-3); // progress 0: cos 0 = 1
        close(
            cos.lr(35),
            1e-3 * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos()),
        ); // 0.25
        close(cos.lr(60), 0.5e-3); // progress 0.5: (1 + cos π/2)/2
        close(cos.lr(110), 0.0); // progress 1
        let lin = LrSchedule::new(1e-3, 10, 110, ScheduleKind::Linear);
        close(lin.lr(3), 0.3e-3);
        close(lin.lr(10), 1e-3);
        close(lin.lr(35), 0.75e-3);
        close(lin.lr(85), 0.25e-3);
        close(lin.lr(200), 0.0);
        let cst = LrSchedule::new(1e-3, 4, 50, ScheduleKind::Constant);
        close(cst.lr(2), 0.5e-3);
        close(cst.lr(49), 1e-3);
        // floor: 0.1 + 0.9 · 0.5 at half way
        let floor = LrSchedule::new(2.0, 0, 100, ScheduleKind::Cosine).with_min_ratio(0.1);
        close(floor.lr(50), 2.0 * (0.1 + 0.9 * 0.5));
        close(floor.lr(100), 0.2);
        // no warmup: the first step runs at the peak
        close(LrSchedule::new(3.0, 0, 10, ScheduleKind::Linear).lr(0), 3.0);
        assert!("step"
            .parse::<ScheduleKind>()
            .unwrap_err()
            .contains("\"step\""));
    }
}
