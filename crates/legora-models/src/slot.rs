//! Adapter slots: every projection of the model is a [`Slot`], which holds a plain
//! frozen linear, a [`LoraLinear`] (named PEFT adapters) or a [`MoeLinear`] (a mixture
//! of LoRA experts). Which one is chosen by PEFT-style matching on the HF module path;
//! where a slot sits is its [`SlotId`].

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use legora_nn::{Experts, LoraLinear, MoeLinear, RouterOutput, SlotId};

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
pub enum Slot<B: Backend> {
    /// No adapter.
    Linear(FrozenLinear<B>),
    /// Named LoRA adapters (PEFT `lora.Linear`).
    Lora(LoraLinear<B>),
    /// A mixture of LoRA experts.
    Moe(MoeLinear<B>),
}

impl<B: Backend> Slot<B> {
    /// A plain frozen slot.
    pub fn linear(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Slot::Linear(FrozenLinear::new(weight, bias))
    }

    /// The current base weight `[out, in]` (with any merged adapters folded in).
    pub fn weight(&self) -> Tensor<B, 2> {
        match self {
            Slot::Linear(l) => l.weight.val(),
            Slot::Lora(l) => l.weight.val(),
            Slot::Moe(m) => m.weight.val(),
        }
    }

    /// The base bias `[out]`.
    pub fn bias(&self) -> Option<Tensor<B, 1>> {
        let b = match self {
            Slot::Linear(l) => &l.bias,
            Slot::Lora(l) => &l.bias,
            Slot::Moe(m) => &m.bias,
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
    pub fn as_lora_mut(&mut self, id: SlotId) -> Result<&mut LoraLinear<B>> {
        if let Slot::Linear(l) = self {
            let lora = LoraLinear::new(l.weight.val(), l.bias.as_ref().map(|b| b.val()))
                .map_err(ModelError::layer(id))?;
            *self = Slot::Lora(lora);
        }
        match self {
            Slot::Lora(l) => Ok(l),
            _ => Err(ModelError::InvalidState(format!(
                "{id} holds a mixture of experts: LoRA adapters and a mixture cannot share a module"
            ))),
        }
    }

    /// The mixture layer of this slot, turning a plain slot into one with no experts.
    /// A slot with LoRA adapters is refused.
    pub fn as_moe_mut(&mut self, id: SlotId) -> Result<&mut MoeLinear<B>> {
        match self {
            Slot::Linear(l) => {
                let moe = MoeLinear::new(l.weight.val(), l.bias.as_ref().map(|b| b.val()))
                    .map_err(ModelError::layer(id))?;
                *self = Slot::Moe(moe);
            }
            Slot::Lora(l) if l.adapter_names().is_empty() => {
                let moe = MoeLinear::new(l.weight.val(), l.bias.as_ref().map(|b| b.val()))
                    .map_err(ModelError::layer(id))?;
                *self = Slot::Moe(moe);
            }
            _ => {}
        }
        match self {
            Slot::Moe(m) => Ok(m),
            _ => Err(ModelError::InvalidState(format!(
                "{id} holds LoRA adapters: LoRA adapters and a mixture cannot share a module"
            ))),
        }
    }

    /// Fold active LoRA adapters into the weight and drop every adapter (PEFT
    /// `merge_and_unload`). Mixtures cannot be merged (their gates depend on the token).
    pub fn merge_and_unload(&mut self, id: SlotId) -> Result<()> {
        let merged = match self {
            Slot::Linear(_) => return Ok(()),
            Slot::Lora(l) => {
                let l = l.clone();
                let (w, b) = l.merge_and_unload().map_err(ModelError::layer(id))?;
                Slot::linear(w, b)
            }
            Slot::Moe(_) => {
                return Err(ModelError::InvalidState(format!(
                    "{id} holds a mixture of experts, which cannot be merged into one weight \
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
            Slot::Linear(_) => return,
            Slot::Lora(l) => {
                let mut l = l.clone();
                l.unmerge();
                Slot::linear(l.weight.val(), l.bias.map(|b| b.val()))
            }
            Slot::Moe(m) => Slot::linear(m.weight.val(), m.bias.as_ref().map(|b| b.val())),
        };
        *self = plain;
    }

    /// Whether the slot holds any adapter or expert.
    pub fn is_adapted(&self) -> bool {
        match self {
            Slot::Linear(_) => false,
            Slot::Lora(l) => !l.adapter_names().is_empty(),
            Slot::Moe(m) => m.num_experts() > 0,
        }
    }

    /// Whether the slot holds a mixture with at least one expert.
    pub fn is_mixture(&self) -> bool {
        matches!(self, Slot::Moe(m) if m.num_experts() > 0)
    }

    /// Apply the slot; a mixture slot uses the experts `experts` selects (its own router
    /// for [`Experts::Router`]).
    ///
    /// # Shapes
    /// - x: `[batch, seq, in]` → (`[batch, seq, out]`, the slot router's output over
    ///   `batch·seq` tokens when the slot routed itself)
    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        experts: &Experts<B>,
        id: SlotId,
    ) -> Result<(Tensor<B, 3>, Option<RouterOutput<B>>)> {
        match self {
            Slot::Linear(l) => Ok((l.forward(x), None)),
            Slot::Lora(l) => Ok((l.forward(x), None)),
            Slot::Moe(m) if m.num_experts() == 0 => Ok((plain_linear(x, &m.weight, &m.bias), None)),
            Slot::Moe(m) => m.forward(x, experts).map_err(ModelError::layer(id)),
        }
    }
}
