//! PEFT adapter folders, read and written exactly as PEFT does:
//! `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module path>.lora_A.weight [r, in]` / `.lora_B.weight [out, r]`
//! (f32, metadata `{"format": "pt"}`). Several adapters: `default` at the folder's root,
//! every other one in a sub-folder named after it (PEFT's `save_pretrained`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use legora_models::{CausalLm, ModelError, SlotId};
use legora_nn::{LoraAdapter, LoraConfig, TargetModules};
use serde_json::Value;

use crate::error::{HubError, Result};
use crate::io::{read_required, write_json, write_safetensors, FloatDtype, SafetensorsFile};

/// File name of the adapter config.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// File name of the adapter weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The PEFT release whose file format legora writes (its `peft_version` field).
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";
/// Prefix of every key in `adapter_model.safetensors`.
pub const KEY_PREFIX: &str = "base_model.model.";

/// One adapter as stored on disk.
#[derive(Debug, Clone)]
pub struct AdapterFiles {
    /// The folder.
    pub dir: PathBuf,
    /// adapter_config.json.
    pub config: LoraConfig,
    /// `(module path, lora_A [r, in], lora_B [out, r])`, sorted by path.
    pub modules: Vec<(String, TensorData, TensorData)>,
    /// DoRA: `lora_magnitude_vector [out]` by module path (empty for plain LoRA).
    pub magnitudes: BTreeMap<String, TensorData>,
}

/// Which of a module's tensors a key of adapter_model.safetensors holds.
enum Part {
    /// `lora_A.weight`.
    A,
    /// `lora_B.weight`.
    B,
    /// DoRA's `lora_magnitude_vector`.
    Magnitude,
}

/// Read an adapter folder (no model needed).
pub fn read_adapter(dir: &Path) -> Result<AdapterFiles> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = read_required(&cfg_path, "PEFT adapter config (adapter_config.json)")?;
    let text = String::from_utf8_lossy(&text);
    let config = LoraConfig::from_json(&text).map_err(HubError::nn(&cfg_path))?;
    let w_path = dir.join(ADAPTER_WEIGHTS);
    if !w_path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(HubError::MissingFile {
            path: w_path,
            what: "adapter weights (adapter_model.bin is a pickle, which legora does not read: \
                   re-save the adapter with PEFT's save_pretrained(safe_serialization=True))"
                .into(),
        });
    }
    let file = SafetensorsFile::open(&w_path)?;
    let mut pairs: BTreeMap<String, (Option<TensorData>, Option<TensorData>)> = BTreeMap::new();
    let mut magnitudes = BTreeMap::new();
    for key in file.names() {
        let unsupported = || {
            HubError::adapter(
                &w_path,
                format!(
                    "tensor `{key}` is not a LoRA tensor legora reads (expected \
                     `{KEY_PREFIX}<module>.lora_A.weight` / `.lora_B.weight` / \
                     `.lora_magnitude_vector`; embedding and modules_to_save tensors are not \
                     supported)"
                ),
            )
        };
        let rest = key.strip_prefix(KEY_PREFIX).ok_or_else(unsupported)?;
        let (module, part) = [
            (".lora_A.weight", Part::A),
            (".lora_B.weight", Part::B),
            (".lora_magnitude_vector", Part::Magnitude),
        ]
        .into_iter()
        .find_map(|(suffix, part)| rest.strip_suffix(suffix).map(|m| (m, part)))
        .ok_or_else(unsupported)?;
        let data = file.tensor(&key)?.ok_or_else(|| HubError::MissingTensor {
            path: w_path.clone(),
            tensor: key.clone(),
        })?;
        let module = module.to_string();
        match part {
            Part::A => pairs.entry(module).or_default().0 = Some(data),
            Part::B => pairs.entry(module).or_default().1 = Some(data),
            Part::Magnitude => {
                magnitudes.insert(module, data);
            }
        }
    }
    let mut modules = Vec::with_capacity(pairs.len());
    for (m, (a, b)) in pairs {
        let missing = |ab: &str| HubError::MissingTensor {
            path: w_path.clone(),
            tensor: format!("{KEY_PREFIX}{m}.{ab}.weight"),
        };
        let a = a.ok_or_else(|| missing("lora_A"))?;
        let b = b.ok_or_else(|| missing("lora_B"))?;
        modules.push((m, a, b));
    }
    if modules.is_empty() {
        return Err(HubError::adapter(
            &w_path,
            "the adapter file holds no LoRA tensors",
        ));
    }
    check_magnitudes(&w_path, &config, &modules, &magnitudes)?;
    Ok(AdapterFiles {
        dir: dir.to_path_buf(),
        config,
        modules,
        magnitudes,
    })
}

/// DoRA's magnitudes agree with `use_dora`: one per module when it is on, none when off.
fn check_magnitudes(
    w_path: &Path,
    config: &LoraConfig,
    modules: &[(String, TensorData, TensorData)],
    magnitudes: &BTreeMap<String, TensorData>,
) -> Result<()> {
    if !config.use_dora {
        if let Some(m) = magnitudes.keys().next() {
            return Err(HubError::adapter(
                w_path,
                format!(
                    "tensor `{KEY_PREFIX}{m}.lora_magnitude_vector` is a DoRA magnitude, but \
                     adapter_config.json has use_dora = false"
                ),
            ));
        }
        return Ok(());
    }
    for (m, _, _) in modules {
        if !magnitudes.contains_key(m) {
            return Err(HubError::MissingTensor {
                path: w_path.to_path_buf(),
                tensor: format!("{KEY_PREFIX}{m}.lora_magnitude_vector (use_dora = true)"),
            });
        }
    }
    if let Some(m) = magnitudes
        .keys()
        .find(|m| !modules.iter().any(|(p, _, _)| p == *m))
    {
        return Err(HubError::adapter(
            w_path,
            format!("tensor `{KEY_PREFIX}{m}.lora_magnitude_vector` has no lora_A / lora_B"),
        ));
    }
    Ok(())
}

/// Load the adapter in `dir` into `model` under `name` (PEFT `load_adapter`).
///
/// Everything is checked before the model is touched: the config must target at least
/// one module of the model, every tensor must belong to an adapter slot, and its shape
/// must be `[r, in]` / `[out, r]` for that slot (`r` from `rank_pattern` or `r`).
pub fn load_adapter<B: Backend>(
    model: &mut CausalLm<B>,
    dir: &Path,
    name: &str,
) -> Result<LoraConfig> {
    let files = read_adapter(dir)?;
    let cfg = files.config.clone();
    if model.target_slots(&cfg).is_empty() {
        return Err(HubError::Model {
            path: dir.join(ADAPTER_CONFIG),
            source: ModelError::NoTargetMatched {
                adapter: name.into(),
                target_modules: serde_json::to_string(&cfg.target_modules).unwrap_or_default(),
                slots: model.config().slot_names(),
            },
        });
    }
    if model.adapter_names().iter().any(|n| n == name) {
        return Err(HubError::adapter(
            dir,
            format!("the model already has an adapter named `{name}`"),
        ));
    }
    let w_path = dir.join(ADAPTER_WEIGHTS);
    let device = model.model.embed_tokens.device();
    let mut adapters = Vec::with_capacity(files.modules.len());
    let mut ignored = Vec::new();
    let mut magnitudes = files.magnitudes;
    for (path, a, b) in files.modules {
        let key_a = format!("{KEY_PREFIX}{path}.lora_A.weight");
        let key_b = format!("{KEY_PREFIX}{path}.lora_B.weight");
        let key_m = format!("{KEY_PREFIX}{path}.lora_magnitude_vector");
        let id = path.parse::<SlotId>().ok();
        // PEFT 0.21 injects LoRA only into the modules `target_modules` selects and
        // loads the state dict non-strictly: tensors of other modules are not loaded
        if let Some(id) = id.filter(|id| !cfg.is_target(&path, id.is_output_head())) {
            if model.slot(id).is_ok() {
                ignored.push(path);
                continue;
            }
        }
        let slot = id.and_then(|id| Some((id, model.slot(id).ok()?)));
        let (id, slot) = slot.ok_or_else(|| {
            HubError::adapter(
                &w_path,
                format!(
                    "tensor `{key_a}` is for module `{path}`, which is not an adapter slot of this \
                     model (was the adapter trained on another architecture?)"
                ),
            )
        })?;
        let (d_in, d_out) = slot.dims();
        let spec = cfg.spec_for(&path);
        let magnitude = magnitudes.remove(&path);
        let mut shapes = vec![
            (&key_a, &a, vec![spec.r, d_in]),
            (&key_b, &b, vec![d_out, spec.r]),
        ];
        shapes.extend(magnitude.as_ref().map(|m| (&key_m, m, vec![d_out])));
        for (key, data, expected) in shapes {
            let found = data.shape.to_vec();
            if found != expected {
                return Err(HubError::TensorShape {
                    path: w_path.clone(),
                    tensor: key.clone(),
                    expected,
                    found,
                });
            }
        }
        let mut adapter = LoraAdapter::from_tensors(
            Tensor::from_data(a, &device),
            Tensor::from_data(b, &device),
            &spec,
            d_in,
            d_out,
        )
        .map_err(HubError::nn(&w_path))?;
        if let Some(m) = magnitude {
            adapter = adapter.with_magnitude(Tensor::from_data(m, &device));
        }
        adapters.push((id, adapter));
    }
    if !ignored.is_empty() {
        tracing::warn!(
            "{}: not loaded (as PEFT): tensors of {} module(s) that target_modules {} does not \
             select: {}",
            w_path.display(),
            ignored.len(),
            serde_json::to_string(&cfg.target_modules).unwrap_or_default(),
            ignored.join(", ")
        );
    }
    model
        .insert_adapter(name, adapters)
        .map_err(HubError::model(dir))?;
    Ok(cfg)
}

/// adapter_config.json as PEFT 0.21 writes it for a causal LM: every field of PEFT's
/// `LoraConfig`, keys sorted, `inference_mode: true`; the fields of `cfg` (including the
/// unknown keys it kept) override PEFT's defaults.
pub fn peft_config_json(cfg: &LoraConfig) -> Value {
    let defaults = serde_json::json!({
        "alora_invocation_tokens": null,
        "alpha_pattern": {},
        "arrow_config": null,
        "auto_mapping": null,
        "base_model_name_or_path": null,
        "bias": "none",
        "corda_config": null,
        "ensure_weight_tying": false,
        "eva_config": null,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "kasa_config": null,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": 8,
        "lora_bias": false,
        "lora_dropout": 0.0,
        "lora_ga_config": null,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "monteclora_config": null,
        "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION,
        "qalora_group_size": 16,
        "r": 8,
        "rank_pattern": {},
        "revision": null,
        "target_modules": null,
        "target_parameters": null,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": null,
        "use_bdlora": null,
        "use_dora": false,
        "use_qalora": false,
        "use_rslora": false,
        "velora_config": null
    });
    let mut out: BTreeMap<String, Value> = match defaults {
        Value::Object(m) => m.into_iter().collect(),
        _ => unreachable!("a JSON object literal"),
    };
    if let Ok(Value::Object(m)) = serde_json::to_value(cfg) {
        for (k, v) in m {
            // A task_type left unset means a causal LM here.
            if k == "task_type" && v.is_null() {
                continue;
            }
            out.insert(k, v);
        }
    }
    out.insert("inference_mode".into(), Value::Bool(true));
    if out.get("peft_version").is_none_or(|v| v.is_null()) {
        out.insert(
            "peft_version".into(),
            Value::String(PEFT_FORMAT_VERSION.into()),
        );
    }
    Value::Object(out.into_iter().collect())
}

/// Write adapter `name` of `model` to `dir` as PEFT does (weights, then config;
/// `"all-linear"` is written expanded to the module paths, as PEFT does).
pub fn save_adapter<B: Backend>(
    model: &CausalLm<B>,
    name: &str,
    cfg: &LoraConfig,
    dir: &Path,
) -> Result<()> {
    let modules = model.adapter_modules(name);
    if modules.is_empty() {
        return Err(HubError::adapter(
            dir,
            format!(
                "the model has no adapter named `{name}` (it has {:?})",
                model.adapter_names()
            ),
        ));
    }
    // PEFT expands "all-linear" into the module paths it matched before saving.
    let mut cfg = cfg.clone();
    if matches!(&cfg.target_modules, Some(TargetModules::Pattern(p)) if p == "all-linear") {
        let paths = modules.iter().map(|(id, _)| id.to_string()).collect();
        cfg.target_modules = Some(TargetModules::List(paths));
    }
    let mut tensors = Vec::with_capacity(modules.len() * 2);
    for (path, a) in modules {
        tensors.push((
            format!("{KEY_PREFIX}{path}.lora_A.weight"),
            a.lora_A.val().into_data(),
        ));
        tensors.push((
            format!("{KEY_PREFIX}{path}.lora_B.weight"),
            a.lora_B.val().into_data(),
        ));
        if let Some(m) = &a.lora_magnitude_vector {
            // PEFT saves the magnitude without its `.weight` suffix
            tensors.push((
                format!("{KEY_PREFIX}{path}.lora_magnitude_vector"),
                m.val().into_data(),
            ));
        }
    }
    write_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors, FloatDtype::F32)?;
    write_json(&dir.join(ADAPTER_CONFIG), &peft_config_json(&cfg))
}

/// Where PEFT's `save_pretrained` puts adapter `name` under `dir`.
pub fn adapter_dir(dir: &Path, name: &str) -> PathBuf {
    if name == "default" {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

/// Check that an adapter name can be a folder name.
pub(crate) fn check_name(dir: &Path, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(HubError::adapter(
            dir,
            format!("adapter name `{name}` cannot be used as a folder name"),
        ))
    }
}

/// Every adapter of a PEFT `save_pretrained` folder: `default` at the root (when it has
/// an adapter_config.json) and each sub-folder holding one, under its folder name.
pub fn list_adapters(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    if dir.join(ADAPTER_CONFIG).exists() {
        out.push(("default".to_string(), dir.to_path_buf()));
    }
    let entries = std::fs::read_dir(dir).map_err(HubError::io(dir))?;
    let mut subs: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.join(ADAPTER_CONFIG).exists())
        .filter_map(|p| Some((p.file_name()?.to_string_lossy().into_owned(), p)))
        .collect();
    subs.sort();
    out.extend(subs);
    if out.is_empty() {
        return Err(HubError::MissingFile {
            path: dir.join(ADAPTER_CONFIG),
            what: "PEFT adapter config (adapter_config.json)".into(),
        });
    }
    Ok(out)
}

/// A [`LoraConfig`] that describes adapter `name` as it is in `model` (ranks, alphas and
/// modules read from the tensors), starting from `template`'s other settings. Used for
/// adapters made by `add_weighted_adapter` and for mixture experts.
pub fn derive_config<B: Backend>(
    model: &CausalLm<B>,
    name: &str,
    template: &LoraConfig,
) -> LoraConfig {
    let modules = model.adapter_modules(name);
    let mut cfg = template.clone();
    let Some((_, first)) = modules.first() else {
        return cfg;
    };
    cfg.r = first.rank();
    cfg.lora_alpha = first.lora_alpha;
    cfg.use_rslora = first.use_rslora;
    cfg.lora_dropout = first.lora_dropout;
    cfg.rank_pattern.clear();
    cfg.alpha_pattern.clear();
    for (id, a) in &modules {
        if a.rank() != cfg.r {
            cfg.rank_pattern.insert(id.to_string(), a.rank());
        }
        if a.lora_alpha != cfg.lora_alpha {
            cfg.alpha_pattern.insert(id.to_string(), a.lora_alpha);
        }
    }
    let ids: BTreeSet<SlotId> = modules.iter().map(|(id, _)| *id).collect();
    cfg.target_modules = Some(target_list(&model.slot_ids(), &ids));
    cfg.layers_to_transform = None;
    cfg.layers_pattern = None;
    cfg
}

/// `target_modules` naming exactly `paths`: the short names when they select exactly
/// these modules, else the full paths (as PEFT writes for expanded `all-linear`).
pub(crate) fn target_list(all: &[SlotId], ids: &BTreeSet<SlotId>) -> TargetModules {
    let names: BTreeSet<&str> = ids.iter().map(SlotId::name).collect();
    let selected: BTreeSet<SlotId> = all
        .iter()
        .filter(|id| names.contains(id.name()))
        .copied()
        .collect();
    if &selected == ids {
        TargetModules::List(names.into_iter().map(String::from).collect())
    } else {
        TargetModules::List(ids.iter().map(SlotId::to_string).collect())
    }
}
