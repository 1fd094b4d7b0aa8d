//! The PEFT-like facade: [`PretrainedModel`] (an HF model folder, loaded) and
//! [`PeftModel`] (a base with named LoRA adapters), with PEFT's verbs.
//!
//! ```no_run
//! use burn::backend::Flex;
//! use legora_hub::{get_peft_model, PretrainedModel};
//! use legora_nn::LoraConfig;
//!
//! # fn main() -> Result<(), legora_hub::HubError> {
//! let device = Default::default();
//! let base = PretrainedModel::<Flex>::from_pretrained("models/Qwen2.5-0.5B", &device)?;
//! let mut model = get_peft_model(base, &LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]))?;
//! model.print_trainable_parameters();
//! model.save_pretrained("out/my-adapter")?;          // PEFT folder
//! model.merge_and_unload()?.save_pretrained("out/merged")?; // plain HF folder
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use legora_models::{CausalLm, Config, GenerationConfig, ModelError};
use legora_nn::{Combination, LoraConfig, MergeOptions, ParamReport};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{HubError, Result};
use crate::io::{
    copy_atomic, read_required, write_json, write_safetensors, Checkpoint, FloatDtype,
};
use crate::load::LoadOptions;
use crate::moe::{load_mixture, save_mixture, MoeConfig};
use crate::peft::{
    adapter_dir, check_name, derive_config, list_adapters, load_adapter, save_adapter,
};
use crate::tokenizer::{load_tokenizer, ChatTemplate, Message};

/// Tokenizer and template files copied into an exported model folder when present.
pub const TOKENIZER_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// Read and resolve `dir/config.json`.
pub fn load_config(dir: &Path) -> Result<(Config, Value)> {
    let path = dir.join("config.json");
    let bytes = read_required(&path, "model config (config.json)")?;
    let raw: Value = serde_json::from_slice(&bytes).map_err(|e| HubError::Json {
        path: path.clone(),
        message: e.to_string(),
    })?;
    // A multimodal Gemma 3 checkpoint: its text model (the weights are read through
    // their prefix, see `Checkpoint`).
    let raw = match legora_models::gemma3::text_config(&raw) {
        Ok(Some(text)) => text,
        Ok(None) => raw,
        Err(e) => return Err(HubError::model(&path)(e)),
    };
    let cfg: Config = serde_json::from_value(raw.clone()).map_err(|e| HubError::Model {
        path: path.clone(),
        source: ModelError::InvalidConfig {
            field: "config.json".into(),
            expected: "a transformers causal-LM config".into(),
            found: e.to_string(),
        },
    })?;
    Ok((cfg, raw))
}

/// The resolved config of the model at `path` (an HF folder, a `.gguf` file or a cached
/// Hugging Face repo id), read without its weights.
pub fn load_model_config(path: &Path) -> Result<legora_models::ModelConfig> {
    let path = crate::hf_cache::resolve_model(path)?;
    if crate::gguf::is_gguf_path(&path) {
        let file = crate::GgufFile::open(&path)?;
        return Ok(crate::gguf::load_gguf_config(&file)?.2);
    }
    let (config, _) = load_config(&path)?;
    config
        .resolve()
        .map_err(HubError::model(path.join("config.json")))
}

/// An HF causal-LM folder, loaded: weights, config, tokenizer, generation config and
/// chat template (transformers' `AutoModelForCausalLM` + `AutoTokenizer`).
#[derive(Debug)]
pub struct PretrainedModel<B: Backend> {
    /// The network.
    pub model: CausalLm<B>,
    /// config.json.
    pub config: Config,
    /// config.json as read (written back on export with few changes).
    pub raw_config: Value,
    /// generation_config.json (or defaults from config.json's token ids).
    pub generation_config: GenerationConfig,
    /// tokenizer.json, when the folder has one.
    pub tokenizer: Option<Tokenizer>,
    /// The chat template, when the folder has one.
    pub chat_template: Option<ChatTemplate>,
    /// The folder it was loaded from.
    pub name_or_path: PathBuf,
}

impl<B: Backend> PretrainedModel<B> {
    /// Load `dir` (config.json, model.safetensors or its shards, tokenizer.json,
    /// generation_config.json, chat template). Weights of any float dtype are cast to the
    /// backend's float type. A path ending in `.gguf` is a GGUF file:
    /// [`from_gguf`](Self::from_gguf). A Hugging Face repo id (`Qwen/Qwen2-0.5B`) that is
    /// not a path is the snapshot the Hugging Face cache holds ([`crate::resolve_model`]);
    /// nothing is downloaded.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        Self::from_pretrained_with(dir, device, &LoadOptions::default())
    }

    /// [`from_pretrained`](Self::from_pretrained) with the frozen weights stored as
    /// `options` says (a dtype, or a bitsandbytes quantization of the projections),
    /// converted tensor by tensor as the memory-mapped files are read.
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<Self> {
        let dir = &crate::hf_cache::resolve_model(dir.as_ref())?;
        let options = &options.for_backend::<B>(device)?;
        if crate::gguf::is_gguf_path(dir) {
            return Self::from_gguf_with(dir, device, options);
        }
        let (config, raw_config) = load_config(dir)?;
        let resolved = config
            .resolve()
            .map_err(HubError::model(dir.join("config.json")))?;
        let mut ckpt = Checkpoint::open(dir)?.with_options(*options);
        let model = CausalLm::from_weights(resolved, &mut ckpt, device).map_err(|e| match e {
            // A reader error carries the HubError of the file that failed.
            ModelError::Weights { source, tensor } => match source.downcast::<HubError>() {
                Ok(h) => *h,
                Err(source) => HubError::Model {
                    path: dir.to_path_buf(),
                    source: ModelError::Weights { tensor, source },
                },
            },
            other => HubError::Model {
                path: dir.to_path_buf(),
                source: other,
            },
        })?;
        let gen_path = dir.join("generation_config.json");
        let generation_config = if gen_path.exists() {
            let bytes = crate::io::read_required(&gen_path, "generation config")?;
            let text = String::from_utf8_lossy(&bytes);
            GenerationConfig::from_json(&text).map_err(HubError::model(&gen_path))?
        } else {
            GenerationConfig {
                eos_token_id: config.eos_token_id.clone(),
                pad_token_id: config.pad_token_id.clone(),
                bos_token_id: config.bos_token_id.clone(),
                ..GenerationConfig::default()
            }
        };
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(load_tokenizer(dir)?)
        } else {
            None
        };
        Ok(Self {
            model,
            config,
            raw_config,
            generation_config,
            tokenizer,
            chat_template: ChatTemplate::load(dir)?,
            name_or_path: dir.to_path_buf(),
        })
    }

    /// The tokenizer, or [`HubError::MissingFile`] when the folder had none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| HubError::MissingFile {
                path: self.name_or_path.join("tokenizer.json"),
                what: "tokenizer (tokenizer.json)".into(),
            })
    }

    /// Tokenize `text` as `tokenizer(text)` does (special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        crate::tokenizer::encode(self.tokenizer()?, text, true)
    }

    /// Decode ids (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        crate::tokenizer::decode(self.tokenizer()?, ids)
    }

    /// Render a conversation with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let t = self
            .chat_template
            .as_ref()
            .ok_or_else(|| HubError::MissingFile {
                path: self.name_or_path.join("chat_template.jinja"),
                what:
                    "chat template (chat_template.jinja or tokenizer_config.json's chat_template)"
                        .into(),
            })?;
        t.render(messages, add_generation_prompt)
    }

    /// Generate text from a prompt with the folder's generation config, overridden by
    /// `cfg` when given.
    pub fn generate_text(&self, prompt: &str, cfg: Option<&GenerationConfig>) -> Result<String> {
        let ids = self.encode(prompt)?;
        let cfg = cfg.unwrap_or(&self.generation_config);
        let out = self
            .model
            .generate(&[ids], cfg, None)
            .map_err(HubError::model(&self.name_or_path))?;
        self.decode(&out[0])
    }

    /// Write a plain HF model folder (config.json, model.safetensors in f32, tokenizer and
    /// generation files copied). Every slot must be plain: export a [`PeftModel`] through
    /// [`PeftModel::merge_and_unload`].
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_pretrained_as(dir, FloatDtype::F32)
    }

    /// [`save_pretrained`](Self::save_pretrained) with the weights in `dtype`.
    pub fn save_pretrained_as(&self, dir: impl AsRef<Path>, dtype: FloatDtype) -> Result<()> {
        let dir = dir.as_ref();
        let tensors = self.model.state_dict().map_err(HubError::model(dir))?;
        write_safetensors(&dir.join("model.safetensors"), &tensors, dtype)?;
        // A stale shard index would shadow the new single file.
        let stale = dir.join("model.safetensors.index.json");
        if stale.exists() {
            std::fs::remove_file(&stale).map_err(HubError::io(&stale))?;
        }
        let mut raw = self.raw_config.clone();
        if let Value::Object(m) = &mut raw {
            m.insert(
                "tie_word_embeddings".into(),
                Value::Bool(self.model.config().tie_word_embeddings),
            );
            let mut set = false;
            for key in ["dtype", "torch_dtype"] {
                if m.contains_key(key) {
                    m.insert(key.into(), Value::String(dtype.torch_name().into()));
                    set = true;
                }
            }
            if !set {
                m.insert(
                    "torch_dtype".into(),
                    Value::String(dtype.torch_name().into()),
                );
            }
        }
        write_json(&dir.join("config.json"), &raw)?;
        let src = &self.name_or_path;
        let gen = src.join("generation_config.json");
        if gen.exists() {
            copy_atomic(&gen, &dir.join("generation_config.json"))?;
        } else {
            write_json(&dir.join("generation_config.json"), &self.generation_config)?;
        }
        if crate::gguf::is_gguf_path(src) {
            // A GGUF base has no tokenizer files to copy: write the ones it was built into.
            return self.save_tokenizer_files(dir);
        }
        for f in TOKENIZER_FILES {
            let from = src.join(f);
            if from.exists() {
                copy_atomic(&from, &dir.join(f))?;
            }
        }
        Ok(())
    }

    /// tokenizer.json and tokenizer_config.json (chat template, bos / eos tokens) of the
    /// loaded tokenizer, for bases that came without those files.
    fn save_tokenizer_files(&self, dir: &Path) -> Result<()> {
        if let Some(t) = &self.tokenizer {
            let path = dir.join("tokenizer.json");
            let text = t.to_string(true).map_err(|e| HubError::Tokenizer {
                path: path.clone(),
                message: e.to_string(),
            })?;
            crate::io::write_atomic(&path, text.as_bytes())?;
        }
        let mut cfg = serde_json::Map::new();
        cfg.insert(
            "tokenizer_class".into(),
            Value::String("PreTrainedTokenizerFast".into()),
        );
        if let Some(t) = &self.chat_template {
            cfg.insert("chat_template".into(), Value::String(t.source.clone()));
            for (key, tok) in [("bos_token", &t.bos_token), ("eos_token", &t.eos_token)] {
                if let Some(tok) = tok {
                    cfg.insert(key.into(), Value::String(tok.clone()));
                }
            }
        }
        write_json(&dir.join("tokenizer_config.json"), &Value::Object(cfg))
    }

    /// Load a mixture folder (experts + routers) into this model.
    pub fn load_mixture(&mut self, dir: impl AsRef<Path>) -> Result<MoeConfig> {
        load_mixture(&mut self.model, dir.as_ref())
    }

    /// Write this model's mixture (experts as PEFT folders, routers, moe_config.json).
    pub fn save_mixture(
        &self,
        dir: impl AsRef<Path>,
        template: Option<&LoraConfig>,
    ) -> Result<MoeConfig> {
        save_mixture(
            &self.model,
            dir.as_ref(),
            template,
            Some(self.name_or_path.to_string_lossy().into_owned()),
        )
    }
}

/// A base model with named LoRA adapters (PEFT's `PeftModel`).
#[derive(Debug)]
pub struct PeftModel<B: Backend> {
    /// The base (its slots hold the adapters).
    pub base: PretrainedModel<B>,
    /// The config of every adapter, in insertion order.
    configs: Vec<(String, LoraConfig)>,
}

/// PEFT's `get_peft_model`: attach a fresh adapter `default` configured by `config`.
pub fn get_peft_model<B: Backend>(
    base: PretrainedModel<B>,
    config: &LoraConfig,
) -> Result<PeftModel<B>> {
    let mut m = PeftModel {
        base,
        configs: Vec::new(),
    };
    m.add_adapter("default", config)?;
    Ok(m)
}

impl<B: Backend> PeftModel<B> {
    /// PEFT's `PeftModel.from_pretrained(base, dir)`: load the adapter in `dir` as `default`.
    pub fn from_pretrained(base: PretrainedModel<B>, dir: impl AsRef<Path>) -> Result<Self> {
        let mut m = Self {
            base,
            configs: Vec::new(),
        };
        m.load_adapter(dir, "default")?;
        Ok(m)
    }

    /// Load every adapter of a PEFT `save_pretrained` folder (`default` at the root,
    /// the others in sub-folders).
    pub fn from_pretrained_all(base: PretrainedModel<B>, dir: impl AsRef<Path>) -> Result<Self> {
        let mut m = Self {
            base,
            configs: Vec::new(),
        };
        for (name, path) in list_adapters(dir.as_ref())? {
            m.load_adapter(path, &name)?;
        }
        Ok(m)
    }

    /// The network.
    pub fn model(&self) -> &CausalLm<B> {
        &self.base.model
    }

    /// The network, mutably (for training).
    pub fn model_mut(&mut self) -> &mut CausalLm<B> {
        &mut self.base.model
    }

    fn name_or_path(&self) -> String {
        self.base.name_or_path.to_string_lossy().into_owned()
    }

    /// Add a fresh adapter (PEFT `add_adapter`).
    pub fn add_adapter(&mut self, name: &str, config: &LoraConfig) -> Result<()> {
        check_name(&self.base.name_or_path, name)?;
        self.base
            .model
            .add_adapter(name, config)
            .map_err(HubError::model(&self.base.name_or_path))?;
        let mut cfg = config.clone();
        if cfg.base_model_name_or_path.is_none() {
            cfg.base_model_name_or_path = Some(self.name_or_path());
        }
        self.configs.push((name.into(), cfg));
        Ok(())
    }

    /// Load a PEFT adapter folder as `name` (PEFT `load_adapter`).
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>, name: &str) -> Result<()> {
        check_name(dir.as_ref(), name)?;
        let cfg = load_adapter(&mut self.base.model, dir.as_ref(), name)?;
        self.configs.push((name.into(), cfg));
        Ok(())
    }

    /// Activate one adapter (PEFT `set_adapter`).
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.set_adapters(&[name])
    }

    /// Activate several adapters at once (their deltas add up).
    pub fn set_adapters(&mut self, names: &[&str]) -> Result<()> {
        self.base
            .model
            .set_adapter(names)
            .map_err(HubError::model(&self.base.name_or_path))
    }

    /// The adapter names, in insertion order.
    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The active adapters.
    pub fn active_adapters(&self) -> Vec<String> {
        self.base.model.active_adapters()
    }

    /// The config of adapter `name`.
    pub fn peft_config(&self, name: &str) -> Option<&LoraConfig> {
        self.configs.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// Run the base model only (PEFT `disable_adapter`).
    pub fn disable_adapters(&mut self) {
        self.base.model.disable_adapters();
    }

    /// Undo [`disable_adapters`](Self::disable_adapters).
    pub fn enable_adapters(&mut self) {
        self.base.model.enable_adapters();
    }

    /// Remove an adapter (PEFT `delete_adapter`).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.base
            .model
            .delete_adapter(name)
            .map_err(HubError::model(&self.base.name_or_path))?;
        self.configs.retain(|(n, _)| n != name);
        Ok(())
    }

    /// PEFT `add_weighted_adapter(adapters, weights, adapter_name, combination_type, ...)`
    /// with every combination type (see [`Combination`] and
    /// [`LoraLinear::add_weighted_adapter`](legora_nn::LoraLinear::add_weighted_adapter)
    /// for the math and where legora differs from PEFT). The new adapter's config is
    /// the first source's with the new rank, `lora_alpha = r` and `use_rslora = false`
    /// (scaling 1), as its tensors hold the weights and the sources' scalings.
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        new_name: &str,
        combination: Combination,
        options: &MergeOptions,
    ) -> Result<()> {
        check_name(&self.base.name_or_path, new_name)?;
        self.base
            .model
            .add_weighted_adapter(adapters, weights, new_name, combination, options)
            .map_err(HubError::model(&self.base.name_or_path))?;
        let template = self.peft_config(adapters[0]).cloned().unwrap_or_default();
        let cfg = derive_config(&self.base.model, new_name, &template);
        self.configs.push((new_name.into(), cfg));
        Ok(())
    }

    /// Trainable vs total parameters (PEFT `get_nb_trainable_parameters`).
    pub fn trainable_parameters(&self) -> ParamReport {
        self.base.model.parameter_report()
    }

    /// Print PEFT's one-line summary.
    pub fn print_trainable_parameters(&self) {
        println!("{}", self.trainable_parameters());
    }

    /// Write every adapter as PEFT's `save_pretrained` does.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        for (name, cfg) in &self.configs {
            save_adapter(&self.base.model, name, cfg, &adapter_dir(dir, name))?;
        }
        Ok(())
    }

    /// Fold the active adapters into the base weights and return the plain model.
    pub fn merge_and_unload(self) -> Result<PretrainedModel<B>> {
        let mut base = self.base;
        base.model = base
            .model
            .merge_and_unload()
            .map_err(HubError::model(&base.name_or_path))?;
        Ok(base)
    }

    /// Drop every adapter without merging.
    pub fn unload(self) -> PretrainedModel<B> {
        let mut base = self.base;
        base.model = base.model.unload();
        base
    }
}
