//! PEFT-style adapter management on a [`CausalLm`]: every projection is an adapter slot
//! addressed by its HF module path, targets are chosen with
//! [`LoraConfig::is_target`], and the PEFT verbs (`add_adapter`, `set_adapter`,
//! `add_weighted_adapter`, `merge_and_unload`, ...) act on every slot at once.

use burn::tensor::backend::Backend;
use burn::tensor::TensorData;
use legora_nn::{Combination, LoraAdapter, LoraConfig, NnError, Router, RouterConfig};

use crate::decoder::CausalLm;
use crate::error::{ModelError, Result};
use crate::slot::Proj;

/// The seven projections of a decoder layer, as `(block, name)`.
pub const LAYER_SLOTS: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

/// The last component of a module path (`q_proj` for `model.layers.0.self_attn.q_proj`).
pub fn slot_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// The layer index of `model.layers.{i}.…`.
pub fn layer_of(path: &str) -> Option<usize> {
    path.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

impl<B: Backend> CausalLm<B> {
    /// Every adapter slot's module path, in model order (`lm_head` last).
    pub fn slot_paths(&self) -> Vec<String> {
        let mut v: Vec<String> = (0..self.model.layers.len())
            .flat_map(|i| {
                LAYER_SLOTS
                    .iter()
                    .map(move |(blk, n)| format!("model.layers.{i}.{blk}.{n}"))
            })
            .collect();
        v.push("lm_head".into());
        v
    }

    /// The slot at `path`.
    pub fn slot(&self, path: &str) -> Result<&Proj<B>> {
        let unknown = || ModelError::UnknownModule { path: path.into() };
        if path == "lm_head" {
            return Ok(&self.lm_head);
        }
        let i = layer_of(path).ok_or_else(unknown)?;
        let layer = self.model.layers.get(i).ok_or_else(unknown)?;
        let (a, m) = (&layer.self_attn, &layer.mlp);
        let rest = path
            .strip_prefix(&format!("model.layers.{i}."))
            .ok_or_else(unknown)?;
        Ok(match rest {
            "self_attn.q_proj" => &a.q_proj,
            "self_attn.k_proj" => &a.k_proj,
            "self_attn.v_proj" => &a.v_proj,
            "self_attn.o_proj" => &a.o_proj,
            "mlp.gate_proj" => &m.gate_proj,
            "mlp.up_proj" => &m.up_proj,
            "mlp.down_proj" => &m.down_proj,
            _ => return Err(unknown()),
        })
    }

    /// The slot at `path`, mutably.
    pub fn slot_mut(&mut self, path: &str) -> Result<&mut Proj<B>> {
        let unknown = || ModelError::UnknownModule { path: path.into() };
        if path == "lm_head" {
            return Ok(&mut self.lm_head);
        }
        let i = layer_of(path).ok_or_else(unknown)?;
        let rest = path
            .strip_prefix(&format!("model.layers.{i}."))
            .ok_or_else(unknown)?
            .to_string();
        let layer = self.model.layers.get_mut(i).ok_or_else(unknown)?;
        let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
        Ok(match rest.as_str() {
            "self_attn.q_proj" => &mut a.q_proj,
            "self_attn.k_proj" => &mut a.k_proj,
            "self_attn.v_proj" => &mut a.v_proj,
            "self_attn.o_proj" => &mut a.o_proj,
            "mlp.gate_proj" => &mut m.gate_proj,
            "mlp.up_proj" => &mut m.up_proj,
            "mlp.down_proj" => &mut m.down_proj,
            _ => return Err(unknown()),
        })
    }

    /// The module paths `config` targets (PEFT's `check_target_module_exists`).
    pub fn target_paths(&self, config: &LoraConfig) -> Vec<String> {
        self.slot_paths()
            .into_iter()
            .filter(|p| config.is_target(p, p == "lm_head"))
            .collect()
    }

    fn checked_targets(&self, name: &str, config: &LoraConfig) -> Result<Vec<String>> {
        config
            .validate()
            .map_err(ModelError::layer(format!("adapter `{name}`")))?;
        let targets = self.target_paths(config);
        if targets.is_empty() {
            return Err(ModelError::NoTargetMatched {
                adapter: name.into(),
                target_modules: serde_json::to_string(&config.target_modules).unwrap_or_default(),
            });
        }
        Ok(targets)
    }

    /// Add a freshly initialised adapter `name` on every module `config` targets
    /// (PEFT `add_adapter`). The model's first adapter becomes active; later ones are
    /// added inactive. Returns the paths.
    pub fn add_adapter(&mut self, name: &str, config: &LoraConfig) -> Result<Vec<String>> {
        let targets = self.checked_targets(name, config)?;
        let active = self.active_after_insert(name)?;
        for path in &targets {
            let spec = config.spec_for(path);
            let lora = self.slot_mut(path)?.as_lora_mut(path)?;
            lora.add_adapter(name, &spec)
                .map_err(ModelError::layer(path.clone()))?;
            activate(lora, &active, path)?;
        }
        Ok(targets)
    }

    /// Insert an adapter read from disk: `(module path, adapter)` for each module it
    /// covers. Activation follows [`add_adapter`](Self::add_adapter).
    pub fn insert_adapter(
        &mut self,
        name: &str,
        modules: Vec<(String, LoraAdapter<B>)>,
    ) -> Result<()> {
        let active = self.active_after_insert(name)?;
        for (path, adapter) in modules {
            let lora = self.slot_mut(&path)?.as_lora_mut(&path)?;
            lora.insert_adapter(name, adapter)
                .map_err(ModelError::layer(path.clone()))?;
            activate(lora, &active, &path)?;
        }
        Ok(())
    }

    /// The model-wide active set once `name` is added: `[name]` for the first adapter,
    /// else unchanged. A duplicate name is an error.
    fn active_after_insert(&self, name: &str) -> Result<Vec<String>> {
        let names = self.adapter_names();
        if names.iter().any(|n| n == name) {
            return Err(ModelError::Layer {
                path: "model".into(),
                source: Box::new(NnError::DuplicateAdapter { name: name.into() }),
            });
        }
        Ok(if names.is_empty() {
            vec![name.to_string()]
        } else {
            self.active_adapters()
        })
    }

    /// Adapter names held by any slot, in order of first appearance.
    pub fn adapter_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for p in self.slot_paths() {
            if let Ok(Proj::Lora(l)) = self.slot(&p) {
                for n in l.adapter_names() {
                    if !names.contains(n) {
                        names.push(n.clone());
                    }
                }
            }
        }
        names
    }

    /// The active adapters (PEFT `active_adapters`).
    pub fn active_adapters(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for p in self.slot_paths() {
            if let Ok(Proj::Lora(l)) = self.slot(&p) {
                for n in l.active_adapters() {
                    if !names.contains(n) {
                        names.push(n.clone());
                    }
                }
            }
        }
        names
    }

    /// `(path, adapter)` for every slot holding adapter `name`.
    pub fn adapter_modules(&self, name: &str) -> Vec<(String, &LoraAdapter<B>)> {
        self.slot_paths()
            .into_iter()
            .filter_map(|p| match self.slot(&p) {
                Ok(Proj::Lora(l)) => l.adapter(name).ok().map(|a| (p.clone(), a)),
                _ => None,
            })
            .collect()
    }

    fn lora_slots_mut(&mut self) -> Vec<(String, &mut legora_nn::LoraLinear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            for (n, p) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
                if let Proj::Lora(l) = p {
                    out.push((format!("model.layers.{i}.{n}"), l));
                }
            }
        }
        if let Proj::Lora(l) = &mut self.lm_head {
            out.push(("lm_head".into(), l));
        }
        out
    }

    fn require_adapter(&self, name: &str) -> Result<()> {
        if self.adapter_names().iter().any(|n| n == name) {
            Ok(())
        } else {
            Err(ModelError::Layer {
                path: "model".into(),
                source: Box::new(NnError::UnknownAdapter {
                    name: name.into(),
                    available: self.adapter_names(),
                }),
            })
        }
    }

    /// Make exactly `names` active (PEFT `set_adapter`); each slot activates the ones it
    /// holds. Unknown names are an error.
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.require_adapter(n)?;
        }
        for (path, l) in self.lora_slots_mut() {
            let held: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| l.adapter_names().iter().any(|h| h == n))
                .collect();
            l.set_adapter(&held).map_err(ModelError::layer(path))?;
        }
        Ok(())
    }

    /// Run the base model only (PEFT `disable_adapter`).
    pub fn disable_adapters(&mut self) {
        for (_, l) in self.lora_slots_mut() {
            l.disable_adapters();
        }
    }

    /// Undo [`disable_adapters`](Self::disable_adapters).
    pub fn enable_adapters(&mut self) {
        for (_, l) in self.lora_slots_mut() {
            l.enable_adapters();
        }
    }

    /// Remove adapter `name` from every slot (PEFT `delete_adapter`).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.require_adapter(name)?;
        for (path, l) in self.lora_slots_mut() {
            if l.adapter_names().iter().any(|n| n == name) {
                l.delete_adapter(name).map_err(ModelError::layer(path))?;
            }
        }
        Ok(())
    }

    /// PEFT `add_weighted_adapter`: a new adapter `new_name` from `weights`-weighted
    /// `adapters` on every slot holding at least one of them (as PEFT, a slot combines
    /// the adapters it holds).
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        new_name: &str,
        combination: Combination,
    ) -> Result<()> {
        if adapters.is_empty() || adapters.len() != weights.len() {
            return Err(ModelError::Input(format!(
                "add_weighted_adapter: {} adapters but {} weights",
                adapters.len(),
                weights.len()
            )));
        }
        for n in adapters {
            self.require_adapter(n)?;
        }
        for (path, l) in self.lora_slots_mut() {
            let (names, ws): (Vec<&str>, Vec<f64>) = adapters
                .iter()
                .zip(weights)
                .filter(|(n, _)| l.adapter_names().iter().any(|h| h == *n))
                .map(|(n, w)| (*n, *w))
                .unzip();
            if !names.is_empty() {
                l.add_weighted_adapter(&names, &ws, new_name, combination)
                    .map_err(ModelError::layer(path))?;
            }
        }
        Ok(())
    }

    /// Fold the active adapters into the base weights and drop every adapter (PEFT
    /// `merge_and_unload`). A tied `lm_head` that received a delta is untied.
    pub fn merge_and_unload(mut self) -> Result<Self> {
        let head_adapted = self.lm_head.is_adapted();
        for path in self.slot_paths() {
            self.slot_mut(&path)?.merge_and_unload(&path)?;
        }
        if head_adapted && self.config().tie_word_embeddings {
            self.config_mut().tie_word_embeddings = false;
        }
        Ok(self)
    }

    /// Drop every adapter, expert and router without merging (PEFT `unload`).
    pub fn unload(mut self) -> Self {
        for path in self.slot_paths() {
            if let Ok(slot) = self.slot_mut(&path) {
                slot.unload();
            }
        }
        for layer in &mut self.model.layers {
            layer.router = None;
        }
        self
    }

    /// Turn LoRA adapters `experts` into a mixture: every slot holding them becomes a
    /// [`legora_nn::MoeLinear`] with those experts (in this order), and each decoder
    /// layer that has a mixture slot gets a router from `router` (if given). Every slot
    /// must hold all the experts or none. Returns the mixture slots' paths.
    pub fn adapters_to_mixture(
        &mut self,
        experts: &[&str],
        router: Option<&RouterConfig>,
    ) -> Result<Vec<String>> {
        if experts.is_empty() {
            return Err(ModelError::Input(
                "a mixture needs at least one expert".into(),
            ));
        }
        for n in experts {
            self.require_adapter(n)?;
        }
        let device = self.model.embed_tokens.device();
        let mut moe_paths = Vec::new();
        for path in self.slot_paths() {
            let slot = self.slot_mut(&path)?;
            let Proj::Lora(l) = slot else { continue };
            let held: Vec<&str> = experts
                .iter()
                .copied()
                .filter(|n| l.adapter_names().iter().any(|h| h == n))
                .collect();
            if held.is_empty() {
                continue;
            }
            if held.len() != experts.len() {
                let missing: Vec<&str> = experts
                    .iter()
                    .copied()
                    .filter(|n| !held.contains(n))
                    .collect();
                return Err(ModelError::InvalidState(format!(
                    "{path}: experts {missing:?} have no adapter on this module while {held:?} do; \
                     every expert of a mixture must target the same modules"
                )));
            }
            if !l.merged_adapters().is_empty() {
                return Err(ModelError::InvalidState(format!(
                    "{path}: unmerge adapters before building a mixture"
                )));
            }
            let adapters: Vec<LoraAdapter<B>> = experts
                .iter()
                .map(|n| l.adapter(n).cloned())
                .collect::<legora_nn::Result<_>>()
                .map_err(ModelError::layer(path.clone()))?;
            let others: Vec<String> = l
                .adapter_names()
                .iter()
                .filter(|n| !experts.contains(&n.as_str()))
                .cloned()
                .collect();
            if !others.is_empty() {
                return Err(ModelError::InvalidState(format!(
                    "{path}: also holds adapters {others:?} that are not experts; delete them first"
                )));
            }
            let mut moe =
                legora_nn::MoeLinear::new(l.weight.val(), l.bias.as_ref().map(|b| b.val()))
                    .map_err(ModelError::layer(path.clone()))?;
            for (n, a) in experts.iter().zip(adapters) {
                moe.insert_expert(n, a)
                    .map_err(ModelError::layer(path.clone()))?;
            }
            *slot = Proj::Moe(moe);
            moe_paths.push(path);
        }
        if let Some(rc) = router {
            if rc.num_experts != experts.len() {
                return Err(ModelError::Input(format!(
                    "router num_experts = {}, but {} experts were given",
                    rc.num_experts,
                    experts.len()
                )));
            }
            let hidden = self.config().hidden_size;
            for path in &moe_paths {
                if let Some(i) = layer_of(path) {
                    if self.model.layers[i].router.is_none() {
                        let r = rc
                            .init::<B>(hidden, &device)
                            .map_err(ModelError::layer(format!("model.layers.{i}.router")))?;
                        self.model.layers[i].router = Some(r);
                    }
                }
            }
        }
        Ok(moe_paths)
    }

    /// Set (or replace) the router of decoder layer `layer`; its input size must be
    /// `hidden_size`.
    pub fn set_layer_router(&mut self, layer: usize, router: Router<B>) -> Result<()> {
        let hidden = self.config().hidden_size;
        let [_, d] = router.weight.dims();
        if d != hidden {
            return Err(ModelError::ShapeMismatch {
                tensor: format!("model.layers.{layer}.router.weight"),
                expected: vec![router.num_experts(), hidden],
                found: router.weight.dims().to_vec(),
            });
        }
        let n = self.model.layers.len();
        let l = self.model.layers.get_mut(layer).ok_or_else(|| {
            ModelError::Input(format!("layer {layer} does not exist (the model has {n})"))
        })?;
        l.router = Some(router);
        Ok(())
    }

    /// `(layer, router)` for every decoder layer with a router.
    pub fn layer_routers(&self) -> Vec<(usize, &Router<B>)> {
        self.model
            .layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.router.as_ref().map(|r| (i, r)))
            .collect()
    }

    /// The base weights under their HF names, for export. Every slot must be plain
    /// (call [`merge_and_unload`](Self::merge_and_unload) first). `lm_head.weight` is
    /// left out when the embeddings are tied.
    pub fn state_dict(&self) -> Result<Vec<(String, TensorData)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.model.embed_tokens.val().into_data(),
        )];
        for (i, layer) in self.model.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                layer.input_layernorm.weight.val().into_data(),
            ));
            for (blk, n) in LAYER_SLOTS {
                let path = format!("{p}.{blk}.{n}");
                push_slot(&mut out, &path, self.slot(&path)?)?;
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.weight.val().into_data(),
            ));
        }
        out.push((
            "model.norm.weight".into(),
            self.model.norm.weight.val().into_data(),
        ));
        if !self.config().tie_word_embeddings {
            push_slot(&mut out, "lm_head", &self.lm_head)?;
        } else if self.lm_head.is_adapted() {
            return Err(ModelError::InvalidState(
                "lm_head holds adapters: merge_and_unload before exporting".into(),
            ));
        }
        Ok(out)
    }
}

/// Make a slot's active set the model's, restricted to the adapters the slot holds.
fn activate<B: Backend>(
    lora: &mut legora_nn::LoraLinear<B>,
    active: &[String],
    path: &str,
) -> Result<()> {
    let held: Vec<&str> = active
        .iter()
        .map(String::as_str)
        .filter(|n| lora.adapter_names().iter().any(|h| h == n))
        .collect();
    lora.set_adapter(&held).map_err(ModelError::layer(path))
}

fn push_slot<B: Backend>(
    out: &mut Vec<(String, TensorData)>,
    path: &str,
    p: &Proj<B>,
) -> Result<()> {
    if p.is_adapted() {
        return Err(ModelError::InvalidState(format!(
            "{path} holds adapters: merge_and_unload (or unload) before exporting base weights"
        )));
    }
    out.push((format!("{path}.weight"), p.weight().into_data()));
    if let Some(b) = p.bias() {
        out.push((format!("{path}.bias"), b.into_data()));
    }
    Ok(())
}
