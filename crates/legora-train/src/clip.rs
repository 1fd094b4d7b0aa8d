//! Global-norm gradient clipping over every trainable parameter of a module
//! (`torch.nn.utils.clip_grad_norm_`), and a finiteness check.
//!
//! burn's own `GradientClipping::Norm` clips each parameter by its own norm; PEFT /
//! HF training (`max_grad_norm`) clips by the norm of all gradients together:
//!
//! ```text
//! total = sqrt(Σ_p ‖g_p‖²)      coef = max_norm / (total + 1e-6)      g_p ← g_p · min(1, coef)
//! ```

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

struct SquaredNorms<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sums: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorms<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            self.sums.push(g.powi_scalar(2).sum());
        }
    }
}

struct Scale<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    factor: f64,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads
                .register::<B::InnerBackend, D>(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// The L2 norm of all gradients of `module`'s parameters in `grads` together (one
/// device→host read). NaN or infinite when any gradient is.
pub fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> f64 {
    let mut v = SquaredNorms::<B> {
        grads,
        sums: Vec::new(),
    };
    module.visit(&mut v);
    if v.sums.is_empty() {
        return 0.0;
    }
    let total: Tensor<B::InnerBackend, 1> = Tensor::cat(v.sums, 0).sum();
    let sq = total
        .into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .map(|v| v[0])
        .unwrap_or(f64::NAN);
    sq.sqrt()
}

/// Multiply every gradient of `module` in `grads` by `factor`.
pub fn scale_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    factor: f64,
) {
    let mut v = Scale::<B> {
        grads,
        factor,
        _b: std::marker::PhantomData,
    };
    module.visit(&mut v);
}

/// Clip gradients to a global L2 norm of at most `max_norm` (PyTorch's formula,
/// `coef = max_norm / (norm + 1e-6)`, applied when `< 1`). Returns the norm before
/// clipping; a non-finite norm is returned without touching the gradients.
pub fn clip_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    let norm = global_grad_norm(module, grads);
    if norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            scale_grads(module, grads, coef);
        }
    }
    norm
}

/// The first float value of a one-element tensor as `f64` (a device→host read).
pub fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f64::NAN)
}

struct Take<'a, B: AutodiffBackend> {
    from: &'a mut GradientsParams,
    into: GradientsParams,
    ids: &'a std::collections::HashSet<burn::module::ParamId>,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Take<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.ids.contains(&param.id) {
            if let Some(g) = self.from.remove::<B::InnerBackend, D>(param.id) {
                self.into.register::<B::InnerBackend, D>(param.id, g);
            }
        }
    }
}

/// Move the gradients of the parameters `ids` out of `grads` (for a parameter group
/// with its own learning rate).
pub fn take_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    ids: &std::collections::HashSet<burn::module::ParamId>,
) -> GradientsParams {
    let mut v = Take::<B> {
        from: grads,
        into: GradientsParams::new(),
        ids,
        _b: std::marker::PhantomData,
    };
    module.visit(&mut v);
    v.into
}
