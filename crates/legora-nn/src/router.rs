//! The gating router of a mixture of LoRA experts.
//!
//! `Linear(hidden, E, bias=false)` → softmax (in f32) → strategy:
//! - `topk`: keep the k largest probabilities, renormalise them to sum to 1 (MixLoRA / Mixtral);
//! - `dense`: the full softmax (a soft mixture of every expert);
//! - `switch`: top-1, gate = its probability (Switch Transformer), usually with a z-loss.
//!
//! Load-balancing loss (HF Mixtral's `load_balancing_loss_func`, MixLoRA's form):
//! `aux = coef · E · Σ_e f_e · P_e` with `f_e` the share of (non-padding) tokens that
//! selected expert `e` and `P_e` the mean router probability of `e`. The router z-loss
//! (ST-MoE) is `coef_z · mean_t (logsumexp_e logits_te)²`.

use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, IndexingUpdateOp, Int, Tensor};
pub use legora_config::{RouterConfig, RouterPooling, RoutingStrategy};

use crate::error::{NnError, Result};

/// Everything one routing call produces.
#[derive(Debug, Clone)]
pub struct RouterOutput<B: Backend> {
    /// Gates `[N, E]`: zero for unselected experts.
    pub gates: Tensor<B, 2>,
    /// Raw router logits `[N, E]`.
    pub logits: Tensor<B, 2>,
    /// Softmax probabilities `[N, E]`.
    pub probs: Tensor<B, 2>,
    /// Load-balancing loss, already multiplied by its coefficient; shape `[1]`.
    pub aux_loss: Tensor<B, 1>,
    /// z-loss, already multiplied by its coefficient; shape `[1]`.
    pub z_loss: Tensor<B, 1>,
    /// `f_e`: share of real tokens routed to each expert, `[E]` (sums to k).
    pub load: Tensor<B, 1>,
    /// `P_e`: mean router probability per expert, `[E]` (sums to 1).
    pub importance: Tensor<B, 1>,
}

/// The gate `Linear(hidden, E, bias=false)` plus its routing settings (parsed once, kept
/// out of the module's records: only the weight is a parameter).
#[derive(Module, Debug)]
pub struct Router<B: Backend> {
    /// Gate weight `[E, hidden]` (MixLoRA / Mixtral `gate.weight`).
    pub weight: Param<Tensor<B, 2>>,
    /// Strategy, top-k, loss coefficients, jitter, pooling (`num_experts` = the weight's
    /// first dimension).
    #[module(skip)]
    settings: RouterConfig,
}

/// `log Σ_e exp(x_e)` along dim 1, stable. `[N, E] → [N]`.
fn logsumexp<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 1> {
    let max = x.clone().max_dim(1).detach();
    let [n, _] = x.dims();
    ((x - max.clone()).exp().sum_dim(1).log() + max).reshape([n])
}

impl<B: Backend> Router<B> {
    /// A new router for `hidden`-sized inputs, gate weight ~ N(0, `router_init_range`).
    pub fn init(config: &RouterConfig, hidden: usize, device: &B::Device) -> Result<Self> {
        config.validate()?;
        let w = Tensor::random(
            [config.num_experts, hidden],
            Distribution::Normal(0.0, config.router_init_range),
            device,
        );
        Self::from_weight(config, w)
    }

    /// A router with a given gate weight `[E, hidden]`.
    pub fn from_weight(config: &RouterConfig, weight: Tensor<B, 2>) -> Result<Self> {
        config.validate()?;
        let [e, _] = weight.dims();
        if e != config.num_experts {
            return Err(NnError::shape(
                "router.weight",
                &[config.num_experts, weight.dims()[1]],
                &weight.dims(),
            ));
        }
        Ok(Self {
            weight: Param::from_tensor(weight),
            settings: config.clone(),
        })
    }

    /// Number of experts.
    pub fn num_experts(&self) -> usize {
        self.weight.shape().dims::<2>()[0]
    }

    /// The settings as a [`RouterConfig`].
    pub fn config(&self) -> &RouterConfig {
        &self.settings
    }

    /// What the router reads per token.
    pub fn pooling(&self) -> RouterPooling {
        self.settings.router_pooling
    }

    /// Route tokens.
    ///
    /// `mask` marks real tokens with 1 and padding with 0; padding is excluded from
    /// the aux loss, the z-loss and the load statistics (its gates are still computed).
    ///
    /// # Shapes
    /// - x: `[N, hidden]`, mask: `[N]` → gates/logits/probs `[N, E]`, losses `[1]`, load `[E]`
    pub fn forward(&self, x: Tensor<B, 2>, mask: Option<Tensor<B, 1>>) -> RouterOutput<B> {
        let device = x.device();
        let [n, _] = x.dims();
        let e = self.num_experts();
        let cfg = &self.settings;
        let x = if cfg.jitter_noise > 0.0 && B::ad_enabled(&device) {
            let eps = cfg.jitter_noise;
            let noise = x.random_like(Distribution::Uniform(1.0 - eps, 1.0 + eps));
            x * noise
        } else {
            x
        };
        let logits = x.matmul(self.weight.val().transpose());
        // softmax in f32 whatever the backend's float type (bf16 router logits are too coarse).
        let dtype = logits.dtype();
        let probs = softmax(logits.clone().cast(DType::F32), 1).cast(dtype);

        let k = cfg.effective_k();
        let (gates, selected) = if k == e {
            (probs.clone(), Tensor::<B, 2>::ones([n, e], &device))
        } else {
            let (_, idx): (Tensor<B, 2>, Tensor<B, 2, Int>) =
                probs.clone().detach().topk_with_indices(k, 1);
            let top = probs.clone().gather(1, idx.clone());
            let top = match cfg.routing_strategy {
                RoutingStrategy::Switch => top,
                _ => top.clone() / top.sum_dim(1),
            };
            let zeros = Tensor::<B, 2>::zeros([n, e], &device);
            let gates = zeros
                .clone()
                .scatter(1, idx.clone(), top, IndexingUpdateOp::Add);
            let selected =
                zeros.scatter(1, idx, Tensor::ones([n, k], &device), IndexingUpdateOp::Add);
            (gates, selected)
        };
        let m = mask.unwrap_or_else(|| Tensor::ones([n], &device));
        let denom = m.clone().sum().clamp_min(1.0);
        let m2 = m.clone().unsqueeze_dim::<2>(1);
        let load = (selected * m2.clone()).sum_dim(0).reshape([e]) / denom.clone();
        let importance = (probs.clone() * m2).sum_dim(0).reshape([e]) / denom.clone();
        let aux_loss = (load.clone().detach() * importance.clone()).sum()
            * (cfg.router_aux_loss_coef * e as f64);
        let z_loss = if cfg.router_z_loss_coef > 0.0 {
            let z = logsumexp(logits.clone().cast(DType::F32)).cast(dtype);
            (z.powi_scalar(2) * m).sum() / denom * cfg.router_z_loss_coef
        } else {
            Tensor::zeros([1], &device)
        };
        RouterOutput {
            gates,
            logits,
            probs,
            aux_loss,
            z_loss,
            load,
            importance,
        }
    }
}
