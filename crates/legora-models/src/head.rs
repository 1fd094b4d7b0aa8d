//! The output head as a training loss reads it: where `lm_head` is a plain frozen weight
//! (no adapter, no bias), the loss gets the final hidden states and that weight, and the
//! next-token NLL is computed without the `[tokens, vocab]` logits
//! ([`legora_kernels::linear_next_token_nll`]; Liger's fused linear cross-entropy).

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use legora_kernels::FrozenWeight;

use crate::decoder::{aux_loss, CausalLm, Ctx, LmInput, Routing};
use crate::error::Result;
use crate::slot::Slot;

/// What the output head gives a loss.
// One per forward pass: the size gap between the variants is of no consequence.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum HeadOutput<B: Backend> {
    /// Next-token logits `[batch, seq, vocab]` (an `lm_head` with adapters or a bias).
    Logits(Tensor<B, 3>),
    /// The final (normed) hidden states `[batch, seq, hidden]` and the frozen `lm_head`
    /// weight `[vocab, hidden]` they are to be multiplied by.
    Hidden {
        /// `[batch, seq, hidden]`.
        hidden: Tensor<B, 3>,
        /// `lm_head.weight`, in its storage format.
        lm_head: FrozenWeight<B>,
    },
}

impl<B: Backend> HeadOutput<B> {
    /// Per-token negative log-likelihood of the shifted targets (see
    /// [`legora_kernels::next_token_nll`]); from hidden states, a chunk of rows at a time.
    ///
    /// # Shapes
    /// - ids: `batch · (seq − 1)` → `[batch · (seq − 1)]`
    pub fn token_nll(self, ids: &[i64]) -> Tensor<B, 1> {
        match self {
            HeadOutput::Logits(logits) => legora_kernels::next_token_nll(logits, ids),
            HeadOutput::Hidden { hidden, lm_head } => {
                legora_kernels::linear_next_token_nll(hidden, &lm_head, ids)
            }
        }
    }

    /// The logits `[batch, seq, vocab]` (computed, from hidden states).
    pub fn logits(self) -> Tensor<B, 3> {
        match self {
            HeadOutput::Logits(logits) => logits,
            HeadOutput::Hidden { hidden, lm_head } => {
                let [b, s, d] = hidden.dims();
                let [v, _] = lm_head.dims();
                legora_kernels::frozen_linear(hidden.reshape([b * s, d]), &lm_head, None)
                    .reshape([b, s, v])
            }
        }
    }

    /// The device of the output.
    pub fn device(&self) -> B::Device {
        match self {
            HeadOutput::Logits(t) => t.device(),
            HeadOutput::Hidden { hidden, .. } => hidden.device(),
        }
    }
}

/// What [`CausalLm::forward_for_loss`] returns.
#[derive(Debug, Clone)]
pub struct LossOutput<B: Backend> {
    /// The output head.
    pub head: HeadOutput<B>,
    /// One entry per router that ran (empty without mixtures, or with task ids).
    pub routing: Vec<Routing<B>>,
}

impl<B: Backend> LossOutput<B> {
    /// Σ aux-loss + z-loss over every router, `[1]`; `None` when no router ran.
    pub fn aux_loss(&self) -> Option<Tensor<B, 1>> {
        aux_loss(&self.routing)
    }
}

impl<B: Backend> CausalLm<B> {
    /// [`CausalLm::forward`] for a training loss: the same pass, but where `lm_head` is
    /// a plain frozen weight the head's output is the final hidden states and that weight
    /// ([`HeadOutput::Hidden`]), so that the loss never holds the `[tokens, vocab]`
    /// logits.
    ///
    /// # Shapes
    /// - as [`CausalLm::forward`]; the head: logits `[batch, seq, vocab]` or hidden states
    ///   `[batch, seq, hidden]`
    pub fn forward_for_loss(&self, input: LmInput<B>) -> Result<LossOutput<B>> {
        let (ctx, h, mut routing) = self.decoder(input, None)?;
        let head = self.head_for_loss(h, &ctx, &mut routing)?;
        Ok(LossOutput { head, routing })
    }

    /// The final norm, then `lm_head` unless it is a plain frozen weight.
    ///
    /// # Shapes
    /// - h: `[batch, seq, hidden]` → logits `[batch, seq, vocab]` or `[batch, seq, hidden]`
    pub(crate) fn head_for_loss(
        &self,
        h: Tensor<B, 3>,
        ctx: &Ctx<B>,
        routing: &mut Vec<Routing<B>>,
    ) -> Result<HeadOutput<B>> {
        match &self.lm_head {
            Slot::Linear(l) if l.bias.is_none() => Ok(HeadOutput::Hidden {
                hidden: self.model.norm.forward(h),
                lm_head: l.weight.clone(),
            }),
            _ => Ok(HeadOutput::Logits(self.head(h, ctx, routing)?)),
        }
    }
}
