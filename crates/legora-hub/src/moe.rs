//! Mixture folders: N PEFT adapters plus the routers.
//!
//! ```text
//! <dir>/moe_config.json           experts, router settings, layers with a router
//! <dir>/router.safetensors        model.layers.{i}.router.weight  [E, hidden]
//! <dir>/experts/<name>/           a plain PEFT adapter folder per expert
//! ```
//!
//! Each expert folder loads in PEFT on its own; `moe_config.json` is written last, so a
//! folder with one is complete.

use std::collections::BTreeSet;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use legora_models::{CausalLm, Slot, SlotId};
use legora_nn::{LoraConfig, Router, RouterConfig};
use serde::{Deserialize, Serialize};

use crate::error::{HubError, Result};
use crate::io::{read_json, write_json, write_safetensors, FloatDtype, SafetensorsFile};
use crate::peft::{check_name, derive_config, load_adapter, save_adapter};

/// File name of the mixture config.
pub const MOE_CONFIG: &str = "moe_config.json";
/// File name of the router weights.
pub const ROUTER_WEIGHTS: &str = "router.safetensors";

fn default_format() -> String {
    "legora-moe".into()
}
fn default_version() -> u32 {
    1
}
fn default_router_input() -> String {
    "input_layernorm".into()
}

/// The values of `router_input`.
const ROUTER_INPUTS: [&str; 3] = [
    "input_layernorm",
    "post_attention_layernorm",
    "first_mixture_block",
];

/// What the routers of `layers` read in `model` (see [`MoeConfig::router_input`]).
fn router_input<B: Backend>(model: &CausalLm<B>, layers: &[usize]) -> String {
    let attn = |i: usize| {
        model.config().projections().iter().any(|&p| {
            p.is_attention() && model.slot(SlotId::layer(i, p)).is_ok_and(Slot::is_mixture)
        })
    };
    match (
        layers.iter().all(|&i| attn(i)),
        layers.iter().any(|&i| attn(i)),
    ) {
        (true, _) => "input_layernorm",
        (false, false) => "post_attention_layernorm",
        (false, true) => "first_mixture_block",
    }
    .to_string()
}

/// moe_config.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Always `"legora-moe"`.
    #[serde(default = "default_format")]
    pub format: String,
    /// Format version (1).
    #[serde(default = "default_version")]
    pub format_version: u32,
    /// Expert names, in gate order; each is a folder `experts/<name>/`.
    pub experts: Vec<String>,
    /// Router settings (strategy, top_k, aux / z-loss coefficients, jitter); `null` for a
    /// task-routed mixture without routers.
    #[serde(default)]
    pub router: Option<RouterConfig>,
    /// Decoder layers with a router (keys `model.layers.{i}.router.weight`).
    #[serde(default)]
    pub layers: Vec<usize>,
    /// What the routers read: the output of each router layer's `input_layernorm` when
    /// its attention projections hold experts, else of its `post_attention_layernorm`
    /// (the input of the first block holding a mixture); `first_mixture_block` when the
    /// layers differ.
    #[serde(default = "default_router_input")]
    pub router_input: String,
    /// The base model the experts were trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Other keys, kept.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl MoeConfig {
    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| {
            Err(HubError::Json {
                path: path.to_path_buf(),
                message: m,
            })
        };
        if self.format != "legora-moe" {
            return bad(format!(
                "`format` must be \"legora-moe\", found \"{}\"",
                self.format
            ));
        }
        if self.format_version != 1 {
            return bad(format!(
                "`format_version` {} is not supported (1 is)",
                self.format_version
            ));
        }
        if self.experts.is_empty() {
            return bad("`experts` is empty".into());
        }
        let unique: BTreeSet<&String> = self.experts.iter().collect();
        if unique.len() != self.experts.len() {
            return bad(format!("`experts` has duplicates: {:?}", self.experts));
        }
        if !ROUTER_INPUTS.contains(&self.router_input.as_str()) {
            return bad(format!(
                "`router_input`: expected one of {ROUTER_INPUTS:?}, found \"{}\"",
                self.router_input
            ));
        }
        if let Some(r) = &self.router {
            if r.num_experts != self.experts.len() {
                return bad(format!(
                    "`router.num_experts` = {} but {} experts are listed",
                    r.num_experts,
                    self.experts.len()
                ));
            }
            r.validate().map_err(HubError::nn(path))?;
        }
        Ok(())
    }
}

/// Load a mixture folder into `model`: every expert as a LoRA adapter, turned into
/// mixture slots, plus the layer routers.
pub fn load_mixture<B: Backend>(model: &mut CausalLm<B>, dir: &Path) -> Result<MoeConfig> {
    let cfg_path = dir.join(MOE_CONFIG);
    let cfg: MoeConfig = read_json(&cfg_path, "mixture config (moe_config.json)")?;
    cfg.validate(&cfg_path)?;
    for name in &cfg.experts {
        check_name(dir, name)?;
        load_adapter(model, &dir.join("experts").join(name), name)?;
    }
    let names: Vec<&str> = cfg.experts.iter().map(String::as_str).collect();
    let slots = model
        .adapters_to_mixture(&names, None)
        .map_err(HubError::model(dir))?;
    if let Some(rc) = &cfg.router {
        let r_path = dir.join(ROUTER_WEIGHTS);
        let file = SafetensorsFile::open(&r_path)?;
        let hidden = model.config().hidden_size;
        let device = model.model.embed_tokens.device();
        let with_slots: BTreeSet<usize> = slots.iter().filter_map(SlotId::layer_index).collect();
        for &i in &with_slots {
            if !cfg.layers.contains(&i) {
                return Err(HubError::Json {
                    path: cfg_path.clone(),
                    message: format!("layer {i} has mixture slots but is not in `layers`"),
                });
            }
        }
        for &i in &cfg.layers {
            let key = format!("model.layers.{i}.router.weight");
            let data = file.tensor(&key)?.ok_or_else(|| HubError::MissingTensor {
                path: r_path.clone(),
                tensor: key.clone(),
            })?;
            let expected = vec![cfg.experts.len(), hidden];
            if data.shape.to_vec() != expected {
                return Err(HubError::TensorShape {
                    path: r_path.clone(),
                    tensor: key,
                    expected,
                    found: data.shape.to_vec(),
                });
            }
            let router = Router::from_weight(rc, Tensor::from_data(data, &device))
                .map_err(HubError::nn(&r_path))?;
            model
                .set_layer_router(i, router)
                .map_err(HubError::model(&r_path))?;
        }
    }
    let found = router_input(model, &cfg.layers);
    if cfg.router.is_some() && found != cfg.router_input {
        return Err(HubError::Json {
            path: cfg_path,
            message: format!(
                "`router_input` says \"{}\", but with these experts the routers read \"{found}\"",
                cfg.router_input
            ),
        });
    }
    Ok(cfg)
}

/// Write the mixture of `model` to `dir`. `template` supplies the non-shape settings of
/// each expert's adapter_config.json (PEFT defaults when `None`).
pub fn save_mixture<B: Backend>(
    model: &CausalLm<B>,
    dir: &Path,
    template: Option<&LoraConfig>,
    base_model_name_or_path: Option<String>,
) -> Result<MoeConfig> {
    let mut experts: Option<Vec<String>> = None;
    for (path, slot) in model.slots() {
        if let Slot::Moe(m) = slot {
            let names = m.expert_names().to_vec();
            match &experts {
                None => experts = Some(names),
                Some(e) if *e != names => {
                    return Err(HubError::adapter(
                        dir,
                        format!("{path} has experts {names:?}, other slots have {e:?}"),
                    ))
                }
                _ => {}
            }
        }
    }
    let experts = experts.ok_or_else(|| HubError::adapter(dir, "the model holds no mixture"))?;
    // Each expert is written through the PEFT writer: view it as a LoRA adapter.
    let mut as_lora = model.clone();
    as_lora = as_lora
        .unload_mixture_to_lora(&experts)
        .map_err(HubError::model(dir))?;
    let mut tmpl = template.cloned().unwrap_or_default();
    if tmpl.base_model_name_or_path.is_none() {
        tmpl.base_model_name_or_path = base_model_name_or_path.clone();
    }
    for name in &experts {
        check_name(dir, name)?;
        let cfg = derive_config(&as_lora, name, &tmpl);
        save_adapter(&as_lora, name, &cfg, &dir.join("experts").join(name))?;
    }
    let routers = model.layer_routers();
    let layers: Vec<usize> = routers.iter().map(|(i, _)| *i).collect();
    let router = routers.first().map(|(_, r)| r.config().clone());
    if !routers.is_empty() {
        let tensors: Vec<_> = routers
            .iter()
            .map(|(i, r)| {
                (
                    format!("model.layers.{i}.router.weight"),
                    r.weight.val().into_data(),
                )
            })
            .collect();
        write_safetensors(&dir.join(ROUTER_WEIGHTS), &tensors, FloatDtype::F32)?;
    }
    let cfg = MoeConfig {
        format: default_format(),
        format_version: 1,
        experts,
        router,
        layers: routers.iter().map(|(i, _)| *i).collect(),
        router_input: router_input(model, &layers),
        base_model_name_or_path,
        extra: Default::default(),
    };
    write_json(&dir.join(MOE_CONFIG), &cfg)?;
    Ok(cfg)
}

/// Converting mixture slots back to LoRA slots (experts as named adapters) lets the PEFT
/// writer serve mixtures too.
trait MixtureToLora: Sized {
    fn unload_mixture_to_lora(self, experts: &[String]) -> legora_models::Result<Self>;
}

impl<B: Backend> MixtureToLora for CausalLm<B> {
    fn unload_mixture_to_lora(mut self, experts: &[String]) -> legora_models::Result<Self> {
        for (id, slot) in self.slots_mut() {
            if let Slot::Moe(m) = slot {
                let mut lora = legora_nn::LoraLinear::from_frozen(
                    m.weight.clone(),
                    m.bias.as_ref().map(|b| b.val()),
                )
                .map_err(legora_models::ModelError::layer(id))?;
                for (e, name) in experts.iter().enumerate() {
                    if let Some(a) = m.expert(e) {
                        lora.insert_adapter(name, a.clone())
                            .map_err(legora_models::ModelError::layer(id))?;
                    }
                }
                *slot = Slot::Lora(lora);
            }
        }
        Ok(self)
    }
}
