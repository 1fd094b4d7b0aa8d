//! Mean token negative log-likelihood and perplexity of a token sequence.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::decoder::{CausalLm, LmInput};
use crate::error::{ModelError, Result};

/// The result of [`CausalLm::score`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Mean of `-log p(token | prefix)` over the scored tokens (nats).
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Number of scored (predicted) tokens.
    pub tokens: usize,
}

impl<B: Backend> CausalLm<B> {
    /// Score `ids`: every token but the first is predicted from the ones before it.
    ///
    /// Sequences longer than `max_length` are cut into windows of `max_length` that
    /// overlap by one token, so each token is predicted exactly once (its context
    /// restarts at each window). `task_id` routes task-routed mixtures.
    pub fn score(&self, ids: &[u32], max_length: usize, task_id: Option<usize>) -> Result<Score> {
        if ids.len() < 2 {
            return Err(ModelError::Input(format!(
                "scoring needs at least 2 tokens, got {}",
                ids.len()
            )));
        }
        if max_length < 2 {
            return Err(ModelError::Input(format!(
                "max_length must be >= 2, got {max_length}"
            )));
        }
        let context = self.config().max_position_embeddings;
        if max_length > context {
            return Err(ModelError::Input(format!(
                "max_length {max_length} is past the model's context \
                 (max_position_embeddings = {context})"
            )));
        }
        let vocab = self.config().vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary (vocab_size = {vocab})"
            )));
        }
        let device = self.model.embed_tokens.device();
        let mut total = 0f64;
        let mut count = 0usize;
        let mut start = 0;
        while start + 1 < ids.len() {
            let end = (start + max_length).min(ids.len());
            let chunk = &ids[start..end];
            let s = chunk.len();
            let mut input = LmInput::from_tokens(&[chunk.to_vec()], &device)?;
            if let Some(t) = task_id {
                input = input.with_task_ids(&[t]);
            }
            let logits = self.forward(input)?.logits; // [1, s, vocab]
            let logp = log_softmax(
                logits
                    .narrow(1, 0, s - 1)
                    .reshape([s - 1, vocab])
                    .cast(DType::F32),
                1,
            );
            let targets: Vec<i64> = chunk[1..].iter().map(|&t| t as i64).collect();
            let targets: Tensor<B, 2, Int> =
                Tensor::from_data(TensorData::new(targets, [s - 1, 1]), &device);
            let picked = logp.gather(1, targets).sum();
            let v: f64 = picked
                .into_data()
                .convert::<f64>()
                .into_vec::<f64>()
                .map_err(|e| ModelError::InvalidState(format!("reading scores: {e:?}")))?[0];
            total -= v;
            count += s - 1;
            start = end - 1;
        }
        let mean_nll = total / count as f64;
        if !mean_nll.is_finite() {
            return Err(ModelError::Input(format!(
                "the mean NLL is {mean_nll}: the model (or its adapter) produced non-finite \
                 log-probabilities"
            )));
        }
        Ok(Score {
            mean_nll,
            perplexity: mean_nll.exp(),
            tokens: count,
        })
    }
}
