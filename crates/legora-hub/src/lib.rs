//! # legora-hub
//!
//! Every file format a legora user brings, read and written (no math here; the models
//! live in legora-models):
//!
//! - HF model folders: `config.json`, `model.safetensors` or sharded
//!   `model.safetensors.index.json` (memory-mapped; f32 / f16 / bf16, kept as f32 or, with
//!   [`LoadOptions`], as bf16 / f16 or quantized NF4 / FP4 / int8 tensor by tensor as read,
//!   with transformers' `BitsAndBytesConfig` names; checkpoints transformers saved
//!   quantized with bitsandbytes load as they are), `tokenizer.json`,
//!   `generation_config.json`, the chat template ([`PretrainedModel::from_pretrained`],
//!   [`PretrainedModel::from_pretrained_with`], [`PretrainedModel::save_pretrained`]);
//! - GGUF files (llama.cpp, Ollama): config, tokenizer, chat template from the metadata,
//!   weights dequantized at load ([`gguf`], [`PretrainedModel::from_gguf`]);
//! - PEFT adapter folders, exactly as PEFT writes them ([`load_adapter`],
//!   [`save_adapter`], several named adapters as sub-folders);
//! - mixture folders: `experts/<name>/` PEFT folders + `router.safetensors` +
//!   `moe_config.json` ([`load_mixture`], [`save_mixture`]);
//! - the PEFT-like facade: [`get_peft_model`], [`PeftModel`] (`load_adapter`,
//!   `set_adapter`, `add_weighted_adapter`, `merge_and_unload`, `save_pretrained`).
//!
//! Every write is atomic (temporary file + rename); every error is a [`HubError`] naming
//! the file, and the tensor with its expected and found shape where one is involved.

mod contain;
mod error;
pub mod gguf;
mod hf_cache;
pub mod io;
mod load;
mod model;
mod moe;
mod peft;
mod tokenizer;

pub use contain::contain_panic;
pub use error::{HubError, Result};
pub use gguf::GgufFile;
pub use hf_cache::{hf_cache_dirs, resolve_model, resolve_model_in};
pub use io::{write_atomic, Checkpoint, FloatDtype, SafetensorsFile};
pub use load::{BitsAndBytesConfig, LoadOptions, Quantize};
pub use model::{
    get_peft_model, load_config, load_model_config, PeftModel, PretrainedModel, TOKENIZER_FILES,
};
pub use moe::{load_mixture, save_mixture, MoeConfig, MOE_CONFIG, ROUTER_WEIGHTS};
pub use peft::{
    adapter_dir, derive_config, list_adapters, load_adapter, peft_config_json, read_adapter,
    save_adapter, AdapterFiles, ADAPTER_CONFIG, ADAPTER_WEIGHTS, KEY_PREFIX, PEFT_FORMAT_VERSION,
};
pub use tokenizer::{
    decode, encode, load_tokenizer, tokenizer_from_bytes, ChatTemplate, Message, Role,
};
pub use tokenizers::Tokenizer;
