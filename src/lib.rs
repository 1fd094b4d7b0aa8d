//! # legora
//!
//! Train, stack and serve **mixtures of LoRA experts** on any [burn](https://burn.dev)
//! backend. This facade re-exports the workspace crates; most users only need
//! `use legora::prelude::*;`.
//!
//! - [`nn`]: `LoraLinear`, `Router`, `MoeLinear`, PEFT's `LoraConfig`.
//!
//! Backends are cargo features: `flex` (default, CPU), `ndarray`, `wgpu`, `cuda`; the
//! [`backend`] module names the ones compiled in.

pub use legora_nn as nn;

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
    pub use legora_nn::{
        task_gates, trainable_parameters, AdapterSpec, Combination, InitLoraWeights, LoraAdapter,
        LoraConfig, LoraLinear, MoeLinear, NnError, ParamReport, Router, RouterConfig,
        RouterOutput, RoutingStrategy, TargetModules,
    };
}
