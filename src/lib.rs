//! # legora
//!
//! Train, stack and serve **mixtures of LoRA experts** on any [burn](https://burn.dev)
//! backend. This facade re-exports the workspace crates; most users only need
//! `use legora::prelude::*;`.
//!
//! - [`config`]: the shared settings: PEFT's `LoraConfig`, `RouterConfig`, the projections
//!   (`Proj`) and slot ids (`SlotId`), chat messages.
//! - [`nn`]: `LoraLinear`, `Router`, `MoeLinear` and the expert selection `Experts`.
//! - [`kernels`]: the hot ops (LoRA linear, attention, RMSNorm, RoPE, SwiGLU, NLL,
//!   dropout): fused CPU kernels on burn-flex, a burn-ops reference path elsewhere.
//! - [`models`]: Llama / Qwen2 / Mistral with adapter slots, KV-cache generation, scoring.
//! - [`hub`]: HF model folders, PEFT adapter folders, mixture folders, merged export, and
//!   the PEFT-like facade (`PretrainedModel`, `get_peft_model`, `PeftModel`).
//! - [`data`]: prompt templates, tokenization with loss masks, multi-task sampling, batching.
//! - [`train`]: the run file, the training stages (experts → router → eval), checkpoints,
//!   metrics, plots and reports.
//! - [`plugin_api`] / [`plugin_host`]: the C plugin ABI and the host that loads plugins.
//!
//! Backends are cargo features: `flex` (default, CPU), `ndarray`, `wgpu`, `cuda`; the
//! [`backend`] module names the ones compiled in.

pub use legora_config as config;
pub use legora_data as data;
pub use legora_hub as hub;
pub use legora_kernels as kernels;
pub use legora_models as models;
pub use legora_nn as nn;
pub use legora_plugin_api as plugin_api;
pub use legora_plugin_host as plugin_host;
pub use legora_train as train;

/// The burn backends compiled into this build (each behind its cargo feature).
pub mod backend {
    pub use burn::backend::Autodiff;
    #[cfg(feature = "cuda")]
    pub use burn::backend::Cuda;
    #[cfg(feature = "flex")]
    pub use burn::backend::Flex;
    #[cfg(feature = "ndarray")]
    pub use burn::backend::NdArray;
    #[cfg(feature = "wgpu")]
    pub use burn::backend::Wgpu;
}

/// The names most programs use.
pub mod prelude {
    pub use legora_config::{
        AdapterSpec, InitLoraWeights, LoraConfig, Message, Proj, Role, RouterConfig, RouterPooling,
        RoutingStrategy, SlotId, TargetModules,
    };

    pub use legora_nn::{
        trainable_parameters, Combination, Experts, LoraAdapter, LoraLinear, MajoritySignMethod,
        MergeOptions, MoeLinear, NnError, ParamReport, Router, RouterOutput,
    };

    pub use legora_models::{
        CausalLm, CausalLmOutput, Config, GenerationConfig, HeadOutput, KvCache, LmInput,
        LossOutput, ModelError, Routing, Score, Slot,
    };

    pub use legora_hub::{
        get_peft_model, load_adapter, load_mixture, save_adapter, save_mixture, ChatTemplate,
        FloatDtype, HubError, MoeConfig, PeftModel, PretrainedModel,
    };
}
