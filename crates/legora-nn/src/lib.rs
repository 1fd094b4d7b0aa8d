//! # legora-nn
//!
//! LoRA, router and mixture-of-LoRA-experts layers for [burn](https://burn.dev), generic
//! over any `B: Backend`, with no file I/O.
//!
//! - [`LoraLinear`]: a frozen linear with named PEFT-style adapters, computed in
//!   activation space (`y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`), `merge`/`unmerge`,
//!   `add_weighted_adapter` with every PEFT combination type ([`merge`], on a small
//!   f64 [`svd`]).
//! - [`Router`]: top-k / dense / switch gating with the load-balancing aux loss and z-loss.
//! - [`MoeLinear`]: E experts over one frozen base in two matmuls (stacked ranks), a loop
//!   reference, and task-routed mode for concurrent expert training.
//! - [`LoraConfig`], [`RouterConfig`], [`Proj`], [`SlotId`]: the shared settings of
//!   `legora-config`, re-exported.
//! - [`trainable_parameters`]: PEFT's `print_trainable_parameters()`.
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::tensor::{Distribution, Tensor};
//! use legora_nn::{AdapterSpec, LoraLinear};
//!
//! type B = Autodiff<Flex>;
//! let device = Default::default();
//! let w = Tensor::<B, 2>::random([32, 16], Distribution::Normal(0.0, 0.1), &device);
//! let mut layer = LoraLinear::new(w, None).unwrap();
//! layer.add_adapter("default", &AdapterSpec::new(4, 8.0)).unwrap();
//! let x = Tensor::<B, 3>::random([2, 5, 16], Distribution::Default, &device);
//! assert_eq!(layer.forward(x).dims(), [2, 5, 32]);
//! println!("{}", legora_nn::trainable_parameters(&layer)); // trainable params: 192 || ...
//! ```

mod error;
mod lora;
pub mod merge;
mod moe;
mod params;
pub mod reference;
mod router;
pub mod svd;

pub use error::{NnError, Result};
pub use legora_config::{
    AdapterSpec, ConfigError, InitLoraWeights, LayersPattern, LayersToTransform, LoraConfig, Proj,
    SlotId, TargetModules,
};
pub use lora::{frozen_forward, LoraAdapter, LoraLinear};
pub use merge::{Combination, MajoritySignMethod, MergeOptions};
pub use moe::{Experts, MoeLinear};
pub use params::{trainable_parameters, ParamReport};
pub use router::{Router, RouterConfig, RouterOutput, RouterPooling, RoutingStrategy};
