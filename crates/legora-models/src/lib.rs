//! # legora-models
//!
//! Hugging Face causal LMs in [burn](https://burn.dev), generic over `B: Backend`, with
//! no file I/O (weights arrive through [`WeightSource`]; legora-hub reads the files):
//!
//! - families, one file each: [`llama`] (rope scaling `linear` / `llama3`), [`qwen2`]
//!   (q/k/v bias), [`qwen3`] (per-head q/k RMSNorm), [`mistral`] (sliding window,
//!   honoured), [`phi3`] (fused `qkv_proj` / `gate_up_proj`), [`gemma3`] (GeGLU, four
//!   `1 + weight` norms per layer, scaled embeddings, local and global layers with their
//!   own RoPE); the shared decoder is in [`decoder`]: GQA, RoPE (`rotate_half`,
//!   `rope_theta`), RMSNorm, SwiGLU, tied or untied embeddings, causal + padding masks, a
//!   KV cache;
//! - every projection ([`ModelConfig::projections`] and `lm_head`) is an adapter [`Slot`] addressed by
//!   its [`SlotId`]: a frozen linear, a [`legora_nn::LoraLinear`] or a
//!   [`legora_nn::MoeLinear`], chosen by PEFT matching on the HF module path;
//! - mixtures are gated per decoder layer (MixLoRA style: one router per layer reading
//!   the layer's normalized hidden state, shared by its mixture slots), by a slot's own
//!   router, or by the input's [`Experts`] selection ([`LmInput::with_task_ids`],
//!   [`LmInput::with_experts`]); every router's output (aux losses included) is returned
//!   in [`CausalLmOutput::routing`];
//! - [`CausalLm::backward_checkpointed`]: a training step's backward with gradient
//!   checkpointing (each decoder layer recomputed from its input), gradients equal to
//!   the one-graph backward;
//! - [`CausalLm::generate`]: greedy / sampled decoding, batched with left padding;
//! - [`CausalLm::forward_packed`]: continuous batching, one forward over sequences of
//!   different lengths, each with its own [`SeqCache`] and its own adapter, the base or a
//!   router-gated mixture ([`SeqExperts`], [`RouterGroup`]).
//!
//! ```
//! use burn::backend::Flex;
//! use legora_models::{CausalLm, Config, GenerationConfig, LmInput};
//! use legora_nn::LoraConfig;
//!
//! let cfg = Config::from_json(r#"{"model_type": "qwen2", "vocab_size": 50, "hidden_size": 16,
//!     "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
//!     "num_key_value_heads": 2}"#).unwrap();
//! let device = Default::default();
//! let mut model = CausalLm::<Flex>::random(cfg.resolve().unwrap(), 0.1, &device).unwrap();
//! let paths = model.add_adapter("default", &LoraConfig::new(4, 8.0, &["q_proj", "v_proj"])).unwrap();
//! assert_eq!(paths[0].to_string(), "model.layers.0.self_attn.q_proj");
//! let input = LmInput::from_tokens(&[vec![1, 2, 3]], &device).unwrap();
//! let out = model.forward(input).unwrap();
//! assert_eq!(out.logits.dims(), [1, 3, 50]);
//! let new = model.generate(&[vec![1, 2, 3]], &GenerationConfig::greedy(5), None).unwrap();
//! assert_eq!(new[0].len(), 5);
//! ```

mod adapters;
mod checkpoint;
mod config;
pub mod decoder;
mod error;
pub mod gemma3;
mod generate;
mod head;
pub mod llama;
pub mod mistral;
mod packed;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
mod rope;
mod score;
mod slot;
mod weights;

pub use config::{Activation, Config, Family, ModelConfig, RopeParameters, TokenIds};
pub use decoder::{CausalLm, CausalLmOutput, KvCache, LmInput, Routing};
pub use error::{ModelError, Result};
pub use generate::{
    apply_repetition_penalty, argmax, next_token, sample, softmax, top_k_filter, top_p_filter,
    GenerationConfig, DEFAULT_MAX_NEW_TOKENS,
};
pub use head::{HeadOutput, LossOutput};
pub use legora_nn::{Experts, Proj, SlotId};
pub use packed::{LayerRouter, PackedSeq, RouterGroup, SeqCache, SeqExperts};
pub use rope::{Rope, RopeKind};
pub use score::Score;
pub use slot::{FrozenLinear, Slot};
pub use weights::{FrozenMaker, SourceError, WeightSource};
