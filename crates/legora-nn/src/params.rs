//! PEFT's `print_trainable_parameters()` for any burn module.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Trainable vs total parameter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ParamReport {
    /// Parameters that receive gradients.
    pub trainable: usize,
    /// All float parameters.
    pub total: usize,
}

impl ParamReport {
    /// `100 · trainable / total`.
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.total as f64
        }
    }
}

impl std::fmt::Display for ParamReport {
    /// PEFT's format: `trainable params: 1,024 || all params: 65,536 || trainable%: 1.5625`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable),
            thousands(self.total),
            self.percent()
        )
    }
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

struct Counter(ParamReport);

impl<B: Backend> ModuleVisitor<B> for Counter {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let n = param.shape().num_elements();
        self.0.total += n;
        if param.is_require_grad() {
            self.0.trainable += n;
        }
    }
}

/// Count trainable and total float parameters of `module`.
///
/// Trainability is the parameter's `require_grad` flag, which only autodiff backends
/// track: call it on the module as instantiated for training (`Autodiff<B>`).
pub fn trainable_parameters<B: Backend, M: Module<B>>(module: &M) -> ParamReport {
    let mut c = Counter(ParamReport::default());
    module.visit(&mut c);
    c.0
}
