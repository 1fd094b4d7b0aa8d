//! GGUF files (llama.cpp, Ollama) as legora bases.
//!
//! - [`GgufFile`]: the container, memory-mapped and validated on open (header v2/v3,
//!   metadata of every value type incl. nested arrays, tensor infos, `general.alignment`);
//!   every tensor in block form ([`GgufFile::tensor`]: GGML type, dims, the bytes) or
//!   decoded to f32 ([`GgufFile::dequantize`], through `legora_kernels::quant::ggml`);
//! - [`config_json`] / [`load_gguf_config`]: the transformers config the metadata stands for;
//! - [`hf_name`] / [`gguf_name`] and [`llama_unpermute_rows`]: GGUF ↔ HF tensor names and
//!   layout; [`GgufWeights`]: the file as a [`legora_models::WeightSource`];
//! - [`gguf_tokenizer`] / [`gguf_chat_template`]: the tokenizer and template from the
//!   `tokenizer.*` keys;
//! - [`crate::PretrainedModel::from_gguf`] (also reached through
//!   [`crate::PretrainedModel::from_pretrained`] with a `.gguf` path): all of it at once, with
//!   logits equal to transformers' `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`.
//!
//! ```no_run
//! use burn::backend::Flex;
//! use legora_hub::PretrainedModel;
//!
//! # fn main() -> Result<(), legora_hub::HubError> {
//! let base = PretrainedModel::<Flex>::from_pretrained("models/qwen2.5-0.5b-instruct-q4_k_m.gguf", &Default::default())?;
//! println!("{}", base.generate_text("The capital of France is", None)?);
//! # Ok(()) }
//! ```

mod config;
mod file;
mod names;
mod pretrained;
mod reader;
mod tokenizer;
mod value;
mod weights;

pub use config::{architecture, config_json, load_gguf_config, permuted_qk};
pub(crate) use file::check_regular;
pub use file::{GgufFile, GgufTensor};
pub use names::{gguf_name, hf_name, llama_unpermute_rows, norm_plus_one};
pub use pretrained::is_gguf_path;
pub use reader::{GgufTensorInfo, GGML_MAX_DIMS, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC};
pub use tokenizer::{gguf_chat_template, gguf_tokenizer, tokenizer_json};
pub use value::{MetadataArray, MetadataValue, ValueType};
pub use weights::GgufWeights;
