//! Reference implementations the fast paths are tested against.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::error::Result;
use crate::lora::{base_linear, check_dims, flatten, unflatten};
use crate::moe::MoeLinear;

/// A mixture as a plain loop over its experts (MixLoRA style):
/// `x·Wᵀ + b + Σ_e gates_e · expert_e(x)`. The same math as [`MoeLinear::forward`] with
/// [`crate::Experts::Gates`], one product pair per expert; experts without an adapter on
/// the module contribute nothing.
///
/// # Shapes
/// - x: `[..., in]` (N tokens), gates: `[N, E]` → `[..., out]`
pub fn moe_loop<B: Backend, const D: usize>(
    moe: &MoeLinear<B>,
    x: Tensor<B, D>,
    gates: Tensor<B, 2>,
) -> Result<Tensor<B, D>> {
    let (x, dims) = flatten(x);
    let [n, _] = x.dims();
    check_dims("gates", &[n, moe.num_experts()], &gates.dims())?;
    let (_, d_out) = moe.dims();
    let mut y = base_linear(x.clone(), &moe.weight, &moe.bias);
    for e in 0..moe.num_experts() {
        if let Some(expert) = moe.expert(e) {
            let g = gates.clone().narrow(1, e, 1);
            y = y + expert.forward(x.clone()) * g;
        }
    }
    Ok(unflatten(y, dims, d_out))
}
