//! # legora-config
//!
//! The settings every legora crate and file format shares, written once and free of
//! burn (so the plugin ABI crate can use them too):
//!
//! - [`LoraConfig`]: PEFT's `adapter_config.json` with PEFT's names and defaults,
//!   [`TargetModules`], [`AdapterSpec`] (one adapter on one module);
//! - [`RouterConfig`], [`RoutingStrategy`], [`RouterPooling`]: MixLoRA's router settings;
//! - [`Message`], [`Role`]: one chat message;
//! - [`Proj`] (the one list of a decoder layer's projections) and [`SlotId`] (where an
//!   adapter slot sits, shown and parsed as its HF module path).
//!
//! legora-nn, legora-hub (`adapter_config.json`, `moe_config.json`), legora-plugin-api
//! (plugin presets) and legora-train (the run file's `[lora]` and `[moe]`) all use these
//! types; legora-nn re-exports them.

mod chat;
mod error;
mod lora;
mod proj;
mod router;

pub use chat::{Message, Role};
pub use error::{ConfigError, Result};
pub use lora::{
    AdapterSpec, InitLoraWeights, LayersPattern, LayersToTransform, LoraConfig, TargetModules,
    DEFAULT_TARGETS, KEPT_AS_IS, MAX_RANK, NOT_IMPLEMENTED,
};
pub use proj::{Proj, SlotId};
pub use router::{RouterConfig, RouterPooling, RoutingStrategy};
