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
use serde::{Deserialize, Serialize};

use crate::error::{NnError, Result};

/// How router probabilities become gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingStrategy {
    /// Top-k, renormalised.
    TopK,
    /// Soft mixture of all experts.
    Dense,
    /// Top-1 with the raw probability as gate.
    Switch,
}

impl std::str::FromStr for RoutingStrategy {
    type Err = NnError;

    /// Accepts legora's names and MixLoRA's (`mixlora`, `mixlora-switch`).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "topk" | "top_k" | "top-k" | "mixlora" => Ok(Self::TopK),
            "dense" | "soft" => Ok(Self::Dense),
            "switch" | "mixlora-switch" => Ok(Self::Switch),
            other => Err(NnError::config(
                "routing_strategy",
                "one of \"topk\", \"dense\", \"switch\" (or MixLoRA's \"mixlora\", \"mixlora-switch\")",
                format!("\"{other}\""),
            )),
        }
    }
}

impl<'de> Deserialize<'de> for RoutingStrategy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What each token's router reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterPooling {
    /// The token's own hidden state (MixLoRA, Mixtral).
    #[default]
    Token,
    /// The mean of the hidden states of every real token up to and including this one
    /// (causal: position `t` reads positions `≤ t`, so cached decoding routes exactly as
    /// a full forward). Routes a whole prompt consistently once its first words are read.
    PrefixMean,
}

impl RouterPooling {
    /// The config name (`token`, `prefix_mean`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::PrefixMean => "prefix_mean",
        }
    }
}

impl std::str::FromStr for RouterPooling {
    type Err = NnError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "token" => Ok(Self::Token),
            "prefix_mean" => Ok(Self::PrefixMean),
            other => Err(NnError::config(
                "router_pooling",
                "one of \"token\", \"prefix_mean\"",
                format!("\"{other}\""),
            )),
        }
    }
}

impl<'de> Deserialize<'de> for RouterPooling {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn default_top_k() -> usize {
    2
}
fn default_strategy() -> RoutingStrategy {
    RoutingStrategy::TopK
}
fn default_aux() -> f64 {
    0.01
}
fn default_init_range() -> f64 {
    0.02
}

/// Router settings with MixLoRA's config names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterConfig {
    /// Number of experts `E`.
    pub num_experts: usize,
    /// Experts per token for `topk` (default 2).
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// `topk` (default), `dense` or `switch`.
    #[serde(default = "default_strategy")]
    pub routing_strategy: RoutingStrategy,
    /// Load-balancing loss coefficient (default 0.01).
    #[serde(default = "default_aux")]
    pub router_aux_loss_coef: f64,
    /// Std of the gate weight's normal init (default 0.02).
    #[serde(default = "default_init_range")]
    pub router_init_range: f64,
    /// Multiplicative input jitter `U(1−ε, 1+ε)` in training (default 0 = off).
    #[serde(default)]
    pub jitter_noise: f64,
    /// z-loss coefficient (default 0 = off; ST-MoE uses 1e-3).
    #[serde(default)]
    pub router_z_loss_coef: f64,
    /// What the router reads per token (default `token`).
    #[serde(default)]
    pub router_pooling: RouterPooling,
}

impl RouterConfig {
    /// `E` experts with MixLoRA's defaults (top-2, aux 0.01, init 0.02).
    pub fn new(num_experts: usize) -> Self {
        Self {
            num_experts,
            top_k: 2,
            routing_strategy: RoutingStrategy::TopK,
            router_aux_loss_coef: 0.01,
            router_init_range: 0.02,
            jitter_noise: 0.0,
            router_z_loss_coef: 0.0,
            router_pooling: RouterPooling::Token,
        }
    }

    /// Set what the router reads.
    pub fn with_pooling(mut self, pooling: RouterPooling) -> Self {
        self.router_pooling = pooling;
        self
    }

    /// Set the strategy.
    pub fn with_strategy(mut self, s: RoutingStrategy) -> Self {
        self.routing_strategy = s;
        self
    }

    /// Set `top_k`.
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = k;
        self
    }

    /// Set the z-loss coefficient.
    pub fn with_z_loss(mut self, coef: f64) -> Self {
        self.router_z_loss_coef = coef;
        self
    }

    /// Set the aux-loss coefficient.
    pub fn with_aux_loss(mut self, coef: f64) -> Self {
        self.router_aux_loss_coef = coef;
        self
    }

    /// Set the jitter.
    pub fn with_jitter(mut self, eps: f64) -> Self {
        self.jitter_noise = eps;
        self
    }

    /// The number of experts each token actually uses.
    pub fn effective_k(&self) -> usize {
        match self.routing_strategy {
            RoutingStrategy::TopK => self.top_k,
            RoutingStrategy::Dense => self.num_experts,
            RoutingStrategy::Switch => 1,
        }
    }

    /// Check `E ≥ 1`, `1 ≤ k ≤ E`, non-negative coefficients, `jitter ∈ [0, 1)`.
    pub fn validate(&self) -> Result<()> {
        if self.num_experts == 0 {
            return Err(NnError::config("num_experts", ">= 1", self.num_experts));
        }
        if self.routing_strategy == RoutingStrategy::TopK
            && (self.top_k == 0 || self.top_k > self.num_experts)
        {
            return Err(NnError::config(
                "top_k",
                format!("1 <= top_k <= num_experts ({})", self.num_experts),
                self.top_k,
            ));
        }
        for (field, v) in [
            ("router_aux_loss_coef", self.router_aux_loss_coef),
            ("router_z_loss_coef", self.router_z_loss_coef),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(NnError::config(field, "a finite number >= 0", v));
            }
        }
        if !(self.router_init_range > 0.0 && self.router_init_range.is_finite()) {
            return Err(NnError::config(
                "router_init_range",
                "a finite number > 0",
                self.router_init_range,
            ));
        }
        if !(0.0..1.0).contains(&self.jitter_noise) {
            return Err(NnError::config(
                "jitter_noise",
                "a value in [0, 1)",
                self.jitter_noise,
            ));
        }
        Ok(())
    }

    /// Build a router for `hidden`-sized inputs, gate weight ~ N(0, router_init_range).
    pub fn init<B: Backend>(&self, hidden: usize, device: &B::Device) -> Result<Router<B>> {
        self.validate()?;
        let w = Tensor::random(
            [self.num_experts, hidden],
            Distribution::Normal(0.0, self.router_init_range),
            device,
        );
        Router::from_weight(self, w)
    }
}

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

/// The gate `Linear(hidden, E, bias=false)` plus its routing settings.
#[derive(Module, Debug)]
pub struct Router<B: Backend> {
    /// Gate weight `[E, hidden]` (MixLoRA / Mixtral `gate.weight`).
    pub weight: Param<Tensor<B, 2>>,
    /// Top-k.
    pub top_k: usize,
    /// Strategy name (`topk`, `dense`, `switch`).
    pub routing_strategy: String,
    /// Aux-loss coefficient.
    pub router_aux_loss_coef: f64,
    /// z-loss coefficient.
    pub router_z_loss_coef: f64,
    /// Jitter ε.
    pub jitter_noise: f64,
    /// Init std (kept for export).
    pub router_init_range: f64,
    /// What the router reads (`token` or `prefix_mean`, see [`RouterPooling`]).
    pub router_pooling: String,
}

/// `log Σ_e exp(x_e)` along dim 1, stable. `[N, E] → [N]`.
fn logsumexp<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 1> {
    let max = x.clone().max_dim(1).detach();
    let [n, _] = x.dims();
    ((x - max.clone()).exp().sum_dim(1).log() + max).reshape([n])
}

impl<B: Backend> Router<B> {
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
            top_k: config.top_k,
            routing_strategy: serde_json::to_value(config.routing_strategy)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_else(|| "topk".into()),
            router_aux_loss_coef: config.router_aux_loss_coef,
            router_z_loss_coef: config.router_z_loss_coef,
            jitter_noise: config.jitter_noise,
            router_init_range: config.router_init_range,
            router_pooling: config.router_pooling.as_str().to_string(),
        })
    }

    /// Number of experts.
    pub fn num_experts(&self) -> usize {
        self.weight.shape().dims::<2>()[0]
    }

    /// The settings as a [`RouterConfig`].
    pub fn config(&self) -> RouterConfig {
        RouterConfig {
            num_experts: self.num_experts(),
            top_k: self.top_k,
            routing_strategy: self
                .routing_strategy
                .parse()
                .unwrap_or(RoutingStrategy::TopK),
            router_aux_loss_coef: self.router_aux_loss_coef,
            router_init_range: self.router_init_range,
            jitter_noise: self.jitter_noise,
            router_z_loss_coef: self.router_z_loss_coef,
            router_pooling: self.pooling(),
        }
    }

    /// What the router reads per token.
    pub fn pooling(&self) -> RouterPooling {
        self.router_pooling.parse().unwrap_or_default()
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
        let cfg = self.config();
        let x = if self.jitter_noise > 0.0 && B::ad_enabled(&device) {
            let eps = self.jitter_noise;
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
            * (self.router_aux_loss_coef * e as f64);
        let z_loss = if self.router_z_loss_coef > 0.0 {
            let z = logsumexp(logits.clone().cast(DType::F32)).cast(dtype);
            (z.powi_scalar(2) * m).sum() / denom * self.router_z_loss_coef
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
