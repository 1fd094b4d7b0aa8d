//! Router settings with MixLoRA's names: how gate logits become expert weights, the
//! auxiliary losses, and what each token's router reads.

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Result};

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

impl RoutingStrategy {
    /// The config name (`topk`, `dense`, `switch`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::TopK => "topk",
            Self::Dense => "dense",
            Self::Switch => "switch",
        }
    }
}

impl std::fmt::Display for RoutingStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RoutingStrategy {
    type Err = ConfigError;

    /// Accepts legora's names and MixLoRA's (`mixlora`, `mixlora-switch`).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "topk" | "top_k" | "top-k" | "mixlora" => Ok(Self::TopK),
            "dense" | "soft" => Ok(Self::Dense),
            "switch" | "mixlora-switch" => Ok(Self::Switch),
            other => Err(ConfigError::invalid(
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

impl std::fmt::Display for RouterPooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RouterPooling {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "token" => Ok(Self::Token),
            "prefix_mean" => Ok(Self::PrefixMean),
            other => Err(ConfigError::invalid(
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

impl Default for RouterConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
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

/// Router settings with MixLoRA's config names. Every default is written once, on its
/// field; [`RouterConfig::default`] has `num_experts = 0` (to be set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Number of experts `E` (in a run file: the number of tasks, set by legora).
    #[serde(default)]
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
            ..Self::default()
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
            return Err(ConfigError::invalid(
                "num_experts",
                ">= 1",
                self.num_experts,
            ));
        }
        if self.routing_strategy == RoutingStrategy::TopK
            && (self.top_k == 0 || self.top_k > self.num_experts)
        {
            return Err(ConfigError::invalid(
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
                return Err(ConfigError::invalid(field, "a finite number >= 0", v));
            }
        }
        if !(self.router_init_range > 0.0 && self.router_init_range.is_finite()) {
            return Err(ConfigError::invalid(
                "router_init_range",
                "a finite number > 0",
                self.router_init_range,
            ));
        }
        if !(0.0..1.0).contains(&self.jitter_noise) {
            return Err(ConfigError::invalid(
                "jitter_noise",
                "a value in [0, 1)",
                self.jitter_noise,
            ));
        }
        Ok(())
    }
}
