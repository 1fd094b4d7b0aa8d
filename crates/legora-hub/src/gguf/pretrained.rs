//! [`PretrainedModel::from_gguf`]: model + tokenizer + chat template from one GGUF file.

use std::path::Path;

use burn::tensor::backend::Backend;
use legora_models::{CausalLm, GenerationConfig, ModelError};

use super::config::{architecture, load_gguf_config, permuted_qk};
use super::file::GgufFile;
use super::names::gguf_name;
use super::tokenizer::{gguf_chat_template, gguf_tokenizer};
use super::weights::GgufWeights;
use crate::error::{HubError, Result};
use crate::load::LoadOptions;
use crate::model::PretrainedModel;

/// Whether `path` names a GGUF file (by its `.gguf` extension, any case).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

impl<B: Backend> PretrainedModel<B> {
    /// Load a GGUF file (llama.cpp / Ollama): the config from its metadata, every weight
    /// dequantized to the backend's float type, the tokenizer and chat template from its
    /// `tokenizer.*` keys. `name_or_path` is the file, so adapters trained on this base
    /// name it in `base_model_name_or_path`.
    ///
    /// [`PretrainedModel::from_pretrained`] calls this for a path ending in `.gguf`.
    pub fn from_gguf(path: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        Self::from_gguf_with(path, device, &LoadOptions::default())
    }

    /// [`from_gguf`](Self::from_gguf) with the frozen projections stored as `options`
    /// says, each dequantized and converted in turn.
    pub fn from_gguf_with(
        path: impl AsRef<Path>,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        let file = GgufFile::open(path)?;
        let (config, raw_config, resolved) = load_gguf_config(&file)?;
        let arch = architecture(&file)?;
        let heads = permuted_qk(arch)
            .then_some((resolved.num_attention_heads, resolved.num_key_value_heads));
        let mut weights = GgufWeights::new(&file, arch, heads).with_options(*options);
        let model = CausalLm::from_weights(resolved, &mut weights, device)
            .map_err(|e| model_error(path, arch, e))?;
        let generation_config = GenerationConfig {
            eos_token_id: config.eos_token_id.clone(),
            pad_token_id: config.pad_token_id.clone(),
            bos_token_id: config.bos_token_id.clone(),
            ..GenerationConfig::default()
        };
        Ok(Self {
            model,
            config,
            raw_config,
            generation_config,
            tokenizer: Some(gguf_tokenizer(&file)?),
            chat_template: gguf_chat_template(&file)?,
            name_or_path: path.to_path_buf(),
        })
    }
}

/// A model-building error with the GGUF names: the reader's own errors come back as they
/// were, a missing tensor names both its GGUF and HF names.
fn model_error(path: &Path, arch: &str, e: ModelError) -> HubError {
    match e {
        ModelError::Weights { source, tensor } => match source.downcast::<HubError>() {
            Ok(h) => *h,
            Err(source) => HubError::Model {
                path: path.to_path_buf(),
                source: ModelError::Weights { tensor, source },
            },
        },
        ModelError::MissingTensor { tensor } => HubError::MissingTensor {
            path: path.to_path_buf(),
            tensor: match gguf_name(&tensor, arch) {
                Some(g) => format!("{g}` (`{tensor}"),
                None => tensor,
            },
        },
        ModelError::ShapeMismatch {
            tensor,
            expected,
            found,
        } => HubError::TensorShape {
            path: path.to_path_buf(),
            tensor: gguf_name(&tensor, arch).unwrap_or(tensor),
            expected,
            found,
        },
        other => HubError::Model {
            path: path.to_path_buf(),
            source: other,
        },
    }
}
