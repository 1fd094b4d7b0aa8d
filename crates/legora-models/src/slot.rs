//! Adapter slots: every projection of the model is a [`Slot`], which holds a plain
//! frozen linear, a [`LoraLinear`] (named PEFT adapters) or a [`MoeLinear`] (a mixture
//! of LoRA experts). Which one is chosen by PEFT-style matching on the HF module path;
//! where a slot sits is its [`SlotId`].

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use legora_kernels::quant::Format;
use legora_kernels::FrozenWeight;
use legora_nn::{Experts, LoraLinear, MoeLinear, RouterOutput, SlotId};

use crate::error::{ModelError, Result};

/// A frozen `nn.Linear` in HF layout: `weight [out, in]`, optional `bias [out]`.
#[derive(Module, Debug)]
pub struct FrozenLinear<B: Backend> {
    /// `[out, in]` in its storage format (f32, bf16, f16, int8, NF4, FP4), no gradient;
    /// [`FrozenWeight::val`] gives it as f32.
    pub weight: FrozenWeight<B>,
    /// `[out]`, no gradient.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> FrozenLinear<B> {
    /// Wrap a weight (and bias) as frozen parameters.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self::from_frozen(FrozenWeight::dense(weight), bias)
    }

    /// Wrap a weight kept in its storage format (and a bias) as frozen parameters.
    pub fn from_frozen(weight: FrozenWeight<B>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight,
            bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)),
        }
    }

    /// `x·Wᵀ + b`.
    ///
    /// # Shapes
    /// - x: `[..., in]` → `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        legora_nn::frozen_forward(x, &self.weight, &self.bias)
    }
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

    /// A plain frozen slot over a weight kept in its storage format.
    pub fn frozen(weight: FrozenWeight<B>, bias: Option<Tensor<B, 1>>) -> Self {
        Slot::Linear(FrozenLinear::from_frozen(weight, bias))
    }

    /// The current base weight `[out, in]` as f32 (with any merged adapters folded in;
    /// dequantized when stored quantized).
    pub fn weight(&self) -> Tensor<B, 2> {
        self.frozen_weight().val()
    }

    /// The base weight in its storage format.
    pub fn frozen_weight(&self) -> &FrozenWeight<B> {
        match self {
            Slot::Linear(l) => &l.weight,
            Slot::Lora(l) => &l.weight,
            Slot::Moe(m) => &m.weight,
        }
    }

    /// The base weight in its storage format, to replace it (e.g. by a quantized copy).
    /// Adapters and experts are kept; the shape must stay the same.
    pub fn frozen_weight_mut(&mut self) -> &mut FrozenWeight<B> {
        match self {
            Slot::Linear(l) => &mut l.weight,
            Slot::Lora(l) => &mut l.weight,
            Slot::Moe(m) => &mut m.weight,
        }
    }

    /// The storage format of the base weight.
    pub fn format(&self) -> Format {
        self.frozen_weight().format()
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
        let [o, i] = self.frozen_weight().dims();
        (i, o)
    }

    /// The LoRA layer of this slot, turning a plain slot into one with no adapters.
    /// A mixture slot is refused: a module is either LoRA or a mixture.
    pub fn as_lora_mut(&mut self, id: SlotId) -> Result<&mut LoraLinear<B>> {
        if let Slot::Linear(l) = self {
            let lora = LoraLinear::from_frozen(l.weight.clone(), l.bias.as_ref().map(|b| b.val()))
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
                let moe =
                    MoeLinear::from_frozen(l.weight.clone(), l.bias.as_ref().map(|b| b.val()))
                        .map_err(ModelError::layer(id))?;
                *self = Slot::Moe(moe);
            }
            Slot::Lora(l) if l.adapter_names().is_empty() => {
                let moe =
                    MoeLinear::from_frozen(l.weight.clone(), l.bias.as_ref().map(|b| b.val()))
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
                Slot::frozen(l.weight, l.bias.map(|b| b.val()))
            }
            Slot::Moe(m) => Slot::frozen(m.weight.clone(), m.bias.as_ref().map(|b| b.val())),
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
            Slot::Moe(m) if m.num_experts() == 0 => {
                Ok((legora_nn::frozen_forward(x, &m.weight, &m.bias), None))
            }
            Slot::Moe(m) => m.forward(x, experts).map_err(ModelError::layer(id)),
        }
    }
}
