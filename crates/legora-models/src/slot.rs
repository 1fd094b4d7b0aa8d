//! Adapter slots: every projection of the model is a [`Proj`], which holds a plain
//! frozen linear, a [`LoraLinear`] (named PEFT adapters) or a [`MoeLinear`] (a mixture
//! of LoRA experts). Which one is chosen by PEFT-style matching on the HF module path.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use legora_nn::{LoraLinear, MoeLinear, RouterOutput};

use crate::error::{ModelError, Result};

/// A frozen `nn.Linear` in HF layout: `weight [out, in]`, optional `bias [out]`.
#[derive(Module, Debug)]
pub struct FrozenLinear<B: Backend> {
    /// `[out, in]`, no gradient.
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]`, no gradient.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> FrozenLinear<B> {
    /// Wrap a weight (and bias) as frozen parameters.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight: Param::from_tensor(weight).set_require_grad(false),
            bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)),
        }
    }

    /// `x·Wᵀ + b`.
    ///
    /// # Shapes
    /// - x: `[..., in]` → `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        plain_linear(x, &self.weight, &self.bias)
    }
}

/// `x·Wᵀ + b` over the last dimension.
///
/// # Shapes
/// - x: `[..., in]`, weight `[out, in]`, bias `[out]` → `[..., out]`
fn plain_linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: &Param<Tensor<B, 2>>,
    bias: &Option<Param<Tensor<B, 1>>>,
) -> Tensor<B, D> {
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let n = dims[..D - 1].iter().product::<usize>();
    let w = weight.val();
    let d_out = w.dims()[0];
    let mut y = x.reshape([n, d_in]).matmul(w.transpose());
    if let Some(b) = bias {
        y = y + b.val().unsqueeze_dim(0);
    }
    dims[D - 1] = d_out;
    y.reshape(dims)
}

/// One projection of the model: the adapter slot.
#[derive(Module, Debug)]
pub enum Proj<B: Backend> {
    /// No adapter.
    Linear(FrozenLinear<B>),
    /// Named LoRA adapters (PEFT `lora.Linear`).
    Lora(LoraLinear<B>),
    /// A mixture of LoRA experts.
    Moe(MoeLinear<B>),
}

/// Gates a mixture slot receives from its decoder layer (task-routed or layer router).
#[derive(Debug, Clone, Default)]
pub(crate) struct GateCtx<B: Backend> {
    /// Gates `[N, E]` shared by the layer's mixture slots.
    pub gates: Option<Tensor<B, 2>>,
    /// 1 = real token, 0 = padding, `[N]` (for routers owned by a slot).
    pub mask: Option<Tensor<B, 1>>,
    /// Task-routed with every row on this one expert: mixture slots run it alone.
    pub expert: Option<usize>,
    /// Task-routed: the expert of every token `[N]`; mixture slots run each token
    /// through its own expert only.
    pub row_experts: Option<std::sync::Arc<[usize]>>,
}

impl<B: Backend> Proj<B> {
    /// A plain frozen slot.
    pub fn linear(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Proj::Linear(FrozenLinear::new(weight, bias))
    }

    /// The current base weight `[out, in]` (with any merged adapters folded in).
    pub fn weight(&self) -> Tensor<B, 2> {
        match self {
            Proj::Linear(l) => l.weight.val(),
            Proj::Lora(l) => l.weight.val(),
            Proj::Moe(m) => m.weight.val(),
        }
    }

    /// The base bias `[out]`.
    pub fn bias(&self) -> Option<Tensor<B, 1>> {
        let b = match self {
            Proj::Linear(l) => &l.bias,
            Proj::Lora(l) => &l.bias,
            Proj::Moe(m) => &m.bias,
        };
        b.as_ref().map(|p| p.val())
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        let [o, i] = self.weight().dims();
        (i, o)
    }

    /// The LoRA layer of this slot, turning a plain slot into one with no adapters.
    /// A mixture slot is refused: a module is either LoRA or a mixture.
    pub fn as_lora_mut(&mut self, path: &str) -> Result<&mut LoraLinear<B>> {
        if let Proj::Linear(l) = self {
            let lora = LoraLinear::new(l.weight.val(), l.bias.as_ref().map(|b| b.val()))
                .map_err(ModelError::layer(path))?;
            *self = Proj::Lora(lora);
        }
        match self {
            Proj::Lora(l) => Ok(l),
            _ => Err(ModelError::InvalidState(format!(
                "{path} holds a mixture of experts: LoRA adapters and a mixture cannot share a module"
            ))),
        }
    }

    /// The mixture layer of this slot, turning a plain slot into one with no experts.
    /// A slot with LoRA adapters is refused.
    pub fn as_moe_mut(&mut self, path: &str) -> Result<&mut MoeLinear<B>> {
        match self {
            Proj::Linear(l) => {
                let moe = MoeLinear::new(l.weight.val(), l.bias.as_ref().map(|b| b.val()))
                    .map_err(ModelError::layer(path))?;
                *self = Proj::Moe(moe);
            }
            Proj::Lora(l) if l.adapter_names().is_empty() => {
                let moe = MoeLinear::new(l.weight.val(), l.bias.as_ref().map(|b| b.val()))
                    .map_err(ModelError::layer(path))?;
                *self = Proj::Moe(moe);
            }
            _ => {}
        }
        match self {
            Proj::Moe(m) => Ok(m),
            _ => Err(ModelError::InvalidState(format!(
                "{path} holds LoRA adapters: LoRA adapters and a mixture cannot share a module"
            ))),
        }
    }

    /// Fold active LoRA adapters into the weight and drop every adapter (PEFT
    /// `merge_and_unload`). Mixtures cannot be merged (their gates depend on the token).
    pub fn merge_and_unload(&mut self, path: &str) -> Result<()> {
        let merged = match self {
            Proj::Linear(_) => return Ok(()),
            Proj::Lora(l) => {
                let l = l.clone();
                let (w, b) = l.merge_and_unload().map_err(ModelError::layer(path))?;
                Proj::linear(w, b)
            }
            Proj::Moe(_) => {
                return Err(ModelError::InvalidState(format!(
                    "{path} holds a mixture of experts, which cannot be merged into one weight \
                     (its gates depend on each token); export the experts instead"
                )))
            }
        };
        *self = merged;
        Ok(())
    }

    /// Drop every adapter / expert without merging (PEFT `unload`).
    pub fn unload(&mut self) {
        let plain = match self {
            Proj::Linear(_) => return,
            Proj::Lora(l) => {
                let mut l = l.clone();
                l.unmerge();
                Proj::linear(l.weight.val(), l.bias.map(|b| b.val()))
            }
            Proj::Moe(m) => Proj::linear(m.weight.val(), m.bias.as_ref().map(|b| b.val())),
        };
        *self = plain;
    }

    /// Whether the slot holds any adapter or expert.
    pub fn is_adapted(&self) -> bool {
        match self {
            Proj::Linear(_) => false,
            Proj::Lora(l) => !l.adapter_names().is_empty(),
            Proj::Moe(m) => m.num_experts() > 0,
        }
    }

    /// Apply the slot. Mixture slots use the layer's gates, else their own router.
    ///
    /// # Shapes
    /// - x: `[batch, seq, in]` → (`[batch, seq, out]`, the slot router's output over
    ///   `batch·seq` tokens when the slot routed itself)
    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &GateCtx<B>,
        path: &dyn Fn() -> String,
    ) -> Result<(Tensor<B, 3>, Option<RouterOutput<B>>)> {
        match self {
            Proj::Linear(l) => Ok((l.forward(x), None)),
            Proj::Lora(l) => Ok((l.forward(x), None)),
            Proj::Moe(m) => {
                if m.num_experts() == 0 {
                    return Ok((plain_linear(x, &m.weight, &m.bias), None));
                }
                match (&ctx.gates, &m.router) {
                    (Some(g), _) if g.dims()[1] == m.num_experts() => {
                        if let Some(e) = ctx.expert {
                            // one-hot gates on `e` for every token: expert `e` alone
                            let y = m.forward_expert(x, e).map_err(ModelError::layer(path()))?;
                            return Ok((y, None));
                        }
                        let y = match &ctx.row_experts {
                            Some(rows) => m.forward_tasks(x, rows),
                            None => m.forward(x, g.clone()),
                        };
                        Ok((y.map_err(ModelError::layer(path()))?, None))
                    }
                    (_, Some(_)) => {
                        let (y, out) = m
                            .forward_routed(x, ctx.mask.clone())
                            .map_err(ModelError::layer(path()))?;
                        Ok((y, Some(out)))
                    }
                    (Some(g), None) => Err(ModelError::Input(format!(
                        "{}: the layer's gates have {} experts, this mixture has {}",
                        path(),
                        g.dims()[1],
                        m.num_experts()
                    ))),
                    (None, None) => Err(ModelError::Input(format!(
                        "{}: a mixture slot needs gates: pass task ids, or give the layer \
                         (or the slot) a router",
                        path()
                    ))),
                }
            }
        }
    }
}
