//! PEFT-style adapter management on a [`CausalLm`]: every projection is an adapter slot
//! addressed by its [`SlotId`] (shown and parsed as its HF module path), targets are
//! chosen with [`LoraConfig::is_target`], and the PEFT verbs (`add_adapter`,
//! `set_adapter`, `add_weighted_adapter`, `merge_and_unload`, ...) act on every slot at
//! once.

use burn::tensor::backend::Backend;
use burn::tensor::TensorData;
use legora_nn::{
    Combination, LoraAdapter, LoraConfig, LoraLinear, MergeOptions, NnError, Proj, Router,
    RouterConfig, SlotId,
};

use crate::decoder::{CausalLm, DecoderLayer};
use crate::error::{ModelError, Result};
use crate::slot::Slot;

impl<B: Backend> DecoderLayer<B> {
    /// The slot of projection `p` (`None` when the layer has the other layout: a fused
    /// `qkv_proj` instead of `q_proj`, ...).
    pub fn proj(&self, p: Proj) -> Option<&Slot<B>> {
        let (a, m) = (&self.self_attn, &self.mlp);
        match p {
            Proj::QProj => a.q_proj.as_ref(),
            Proj::KProj => a.k_proj.as_ref(),
            Proj::VProj => a.v_proj.as_ref(),
            Proj::QkvProj => a.qkv_proj.as_ref(),
            Proj::OProj => Some(&a.o_proj),
            Proj::GateProj => m.gate_proj.as_ref(),
            Proj::UpProj => m.up_proj.as_ref(),
            Proj::GateUpProj => m.gate_up_proj.as_ref(),
            Proj::DownProj => Some(&m.down_proj),
        }
    }

    /// The slot of projection `p`, mutably.
    pub fn proj_mut(&mut self, p: Proj) -> Option<&mut Slot<B>> {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        match p {
            Proj::QProj => a.q_proj.as_mut(),
            Proj::KProj => a.k_proj.as_mut(),
            Proj::VProj => a.v_proj.as_mut(),
            Proj::QkvProj => a.qkv_proj.as_mut(),
            Proj::OProj => Some(&mut a.o_proj),
            Proj::GateProj => m.gate_proj.as_mut(),
            Proj::UpProj => m.up_proj.as_mut(),
            Proj::GateUpProj => m.gate_up_proj.as_mut(),
            Proj::DownProj => Some(&mut m.down_proj),
        }
    }

    /// Every projection's slot, in forward order.
    pub fn projs(&self) -> Vec<(Proj, &Slot<B>)> {
        Proj::ALL
            .into_iter()
            .filter_map(|p| self.proj(p).map(|s| (p, s)))
            .collect()
    }

    /// Every projection's slot, mutably, in forward order.
    fn projs_mut(&mut self) -> Vec<(Proj, &mut Slot<B>)> {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        let slots = [
            (Proj::QProj, a.q_proj.as_mut()),
            (Proj::KProj, a.k_proj.as_mut()),
            (Proj::VProj, a.v_proj.as_mut()),
            (Proj::QkvProj, a.qkv_proj.as_mut()),
            (Proj::OProj, Some(&mut a.o_proj)),
            (Proj::GateProj, m.gate_proj.as_mut()),
            (Proj::UpProj, m.up_proj.as_mut()),
            (Proj::GateUpProj, m.gate_up_proj.as_mut()),
            (Proj::DownProj, Some(&mut m.down_proj)),
        ];
        slots
            .into_iter()
            .filter_map(|(p, s)| s.map(|s| (p, s)))
            .collect()
    }
}

impl<B: Backend> CausalLm<B> {
    /// Every adapter slot's id, in model order (`lm_head` last).
    pub fn slot_ids(&self) -> Vec<SlotId> {
        self.config().slot_ids()
    }

    /// Every slot with its id, in model order.
    pub fn slots(&self) -> Vec<(SlotId, &Slot<B>)> {
        let mut out: Vec<(SlotId, &Slot<B>)> = Vec::new();
        for (layer, l) in self.model.layers.iter().enumerate() {
            out.extend(
                l.projs()
                    .into_iter()
                    .map(|(p, s)| (SlotId::layer(layer, p), s)),
            );
        }
        out.push((SlotId::LmHead, &self.lm_head));
        out
    }

    /// Every slot with its id, mutably, in model order.
    pub fn slots_mut(&mut self) -> Vec<(SlotId, &mut Slot<B>)> {
        let mut out: Vec<(SlotId, &mut Slot<B>)> = Vec::new();
        for (layer, l) in self.model.layers.iter_mut().enumerate() {
            out.extend(
                l.projs_mut()
                    .into_iter()
                    .map(|(p, s)| (SlotId::layer(layer, p), s)),
            );
        }
        out.push((SlotId::LmHead, &mut self.lm_head));
        out
    }

    /// The slot at `id` (an error when the layer does not exist).
    pub fn slot(&self, id: SlotId) -> Result<&Slot<B>> {
        match id {
            SlotId::LmHead => Ok(&self.lm_head),
            SlotId::Layer { layer, proj } => self
                .model
                .layers
                .get(layer)
                .and_then(|l| l.proj(proj))
                .ok_or_else(|| ModelError::UnknownModule {
                    path: id.to_string(),
                }),
        }
    }

    /// The slot at `id`, mutably.
    pub fn slot_mut(&mut self, id: SlotId) -> Result<&mut Slot<B>> {
        match id {
            SlotId::LmHead => Ok(&mut self.lm_head),
            SlotId::Layer { layer, proj } => self
                .model
                .layers
                .get_mut(layer)
                .and_then(|l| l.proj_mut(proj))
                .ok_or_else(|| ModelError::UnknownModule {
                    path: id.to_string(),
                }),
        }
    }

    /// The slot at an HF module path (`model.layers.0.self_attn.q_proj`, `lm_head`): the
    /// string boundary for files and users.
    pub fn slot_at(&self, path: &str) -> Result<&Slot<B>> {
        let id = path.parse().map_err(|_| ModelError::UnknownModule {
            path: path.to_string(),
        })?;
        self.slot(id)
    }

    /// The slots `config` targets (PEFT's `check_target_module_exists` on their paths).
    pub fn target_slots(&self, config: &LoraConfig) -> Vec<SlotId> {
        self.slot_ids()
            .into_iter()
            .filter(|id| config.is_target(&id.to_string(), id.is_output_head()))
            .collect()
    }

    fn checked_targets(&self, name: &str, config: &LoraConfig) -> Result<Vec<SlotId>> {
        config
            .validate()
            .map_err(|e| ModelError::layer(format!("adapter `{name}`"))(e.into()))?;
        let targets = self.target_slots(config);
        if targets.is_empty() {
            return Err(ModelError::NoTargetMatched {
                adapter: name.into(),
                target_modules: serde_json::to_string(&config.target_modules).unwrap_or_default(),
                slots: self.config().slot_names(),
            });
        }
        for &id in &targets {
            let r = config.spec_for(&id.to_string()).r;
            let (out, inp) = self.config().slot_dims(id);
            // Past max(out, in) the adapter is larger than the weight it adapts and
            // its rank cannot grow further: a rank there is a mistake (or an attack).
            if r > out.max(inp) {
                return Err(ModelError::RankTooLarge {
                    module: id.to_string(),
                    r,
                    in_features: inp,
                    out_features: out,
                });
            }
        }
        Ok(targets)
    }

    /// Add a freshly initialised adapter `name` on every module `config` targets
    /// (PEFT `add_adapter`). The model's first adapter becomes active; later ones are
    /// added inactive. Returns the slots.
    pub fn add_adapter(&mut self, name: &str, config: &LoraConfig) -> Result<Vec<SlotId>> {
        let targets = self.checked_targets(name, config)?;
        let active = self.active_after_insert(name)?;
        for &id in &targets {
            let spec = config.spec_for(&id.to_string());
            let lora = self.slot_mut(id)?.as_lora_mut(id)?;
            lora.add_adapter(name, &spec)
                .map_err(ModelError::layer(id))?;
            activate(lora, &active, id)?;
        }
        Ok(targets)
    }

    /// Insert an adapter read from disk: `(slot, adapter)` for each module it covers.
    /// Activation follows [`add_adapter`](Self::add_adapter).
    pub fn insert_adapter(
        &mut self,
        name: &str,
        modules: Vec<(SlotId, LoraAdapter<B>)>,
    ) -> Result<()> {
        let active = self.active_after_insert(name)?;
        for (id, adapter) in modules {
            let lora = self.slot_mut(id)?.as_lora_mut(id)?;
            lora.insert_adapter(name, adapter)
                .map_err(ModelError::layer(id))?;
            activate(lora, &active, id)?;
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
        for (_, slot) in self.slots() {
            if let Slot::Lora(l) = slot {
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
        for (_, slot) in self.slots() {
            if let Slot::Lora(l) = slot {
                for n in l.active_adapters() {
                    if !names.contains(n) {
                        names.push(n.clone());
                    }
                }
            }
        }
        names
    }

    /// `(slot, adapter)` for every slot holding adapter `name`.
    pub fn adapter_modules(&self, name: &str) -> Vec<(SlotId, &LoraAdapter<B>)> {
        self.slots()
            .into_iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Lora(l) => l.adapter(name).ok().map(|a| (id, a)),
                _ => None,
            })
            .collect()
    }

    fn lora_slots_mut(&mut self) -> Vec<(SlotId, &mut LoraLinear<B>)> {
        self.slots_mut()
            .into_iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Lora(l) => Some((id, l)),
                _ => None,
            })
            .collect()
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
    /// the adapters it holds), with [`LoraLinear::add_weighted_adapter`]'s math. Each slot
    /// draws its DARE masks from `options.seed` mixed with its module path
    /// ([`MergeOptions::for_module`]). When a slot refuses the combination, the adapter
    /// is removed again from the slots already done: the model is left as it was.
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        new_name: &str,
        combination: Combination,
        options: &MergeOptions,
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
        let mut done: Vec<SlotId> = Vec::new();
        let mut failure = None;
        for (path, l) in self.lora_slots_mut() {
            let (names, ws): (Vec<&str>, Vec<f64>) = adapters
                .iter()
                .zip(weights)
                .filter(|(n, _)| l.adapter_names().iter().any(|h| h == *n))
                .map(|(n, w)| (*n, *w))
                .unzip();
            if names.is_empty() {
                continue;
            }
            let opts = options.for_module(&path.to_string());
            match l.add_weighted_adapter(&names, &ws, new_name, combination, &opts) {
                Ok(()) => done.push(path),
                Err(e) => {
                    failure = Some(ModelError::layer(path)(e));
                    break;
                }
            }
        }
        let Some(failure) = failure else {
            return Ok(());
        };
        for (path, l) in self.lora_slots_mut() {
            if done.contains(&path) {
                l.delete_adapter(new_name)
                    .map_err(ModelError::layer(path))?;
            }
        }
        Err(failure)
    }

    /// Fold the active adapters into the base weights and drop every adapter (PEFT
    /// `merge_and_unload`). A tied `lm_head` that received a delta is untied.
    pub fn merge_and_unload(mut self) -> Result<Self> {
        let head_adapted = self.lm_head.is_adapted();
        for (id, slot) in self.slots_mut() {
            slot.merge_and_unload(id)?;
        }
        if head_adapted && self.config().tie_word_embeddings {
            self.config_mut().tie_word_embeddings = false;
        }
        Ok(self)
    }

    /// Drop every adapter, expert and router without merging (PEFT `unload`).
    pub fn unload(mut self) -> Self {
        for (_, slot) in self.slots_mut() {
            slot.unload();
        }
        for layer in &mut self.model.layers {
            layer.router = None;
        }
        self
    }

    /// Turn LoRA adapters `experts` into a mixture: every slot holding any of them
    /// becomes a [`legora_nn::MoeLinear`] over all of them (in this order; an expert that
    /// does not adapt a module is absent there and contributes nothing), and each decoder
    /// layer that has a mixture slot gets a router from `router` (if given). Returns the
    /// mixture slots.
    pub fn adapters_to_mixture(
        &mut self,
        experts: &[&str],
        router: Option<&RouterConfig>,
    ) -> Result<Vec<SlotId>> {
        if experts.is_empty() {
            return Err(ModelError::Input(
                "a mixture needs at least one expert".into(),
            ));
        }
        for n in experts {
            self.require_adapter(n)?;
        }
        let mut moe_slots = Vec::new();
        for (id, slot) in self.slots_mut() {
            if let Some(moe) = mixture_of(slot, id, experts)? {
                *slot = Slot::Moe(moe);
                moe_slots.push(id);
            }
        }
        if let Some(rc) = router {
            self.add_layer_routers(&moe_slots, experts.len(), rc)?;
        }
        Ok(moe_slots)
    }

    /// A router from `rc` on every decoder layer of `slots` that has none yet.
    fn add_layer_routers(&mut self, slots: &[SlotId], e: usize, rc: &RouterConfig) -> Result<()> {
        if rc.num_experts != e {
            return Err(ModelError::Input(format!(
                "router num_experts = {}, but {e} experts were given",
                rc.num_experts
            )));
        }
        let hidden = self.config().hidden_size;
        let device = self.model.embed_tokens.device();
        for layer in slots.iter().filter_map(SlotId::layer_index) {
            if self.model.layers[layer].router.is_none() {
                let r = Router::init(rc, hidden, &device)
                    .map_err(ModelError::layer(format!("model.layers.{layer}.router")))?;
                self.model.layers[layer].router = Some(r);
            }
        }
        Ok(())
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
            for (proj, slot) in layer.projs() {
                push_slot(&mut out, SlotId::layer(i, proj), slot)?;
            }
            let a = &layer.self_attn;
            for (name, norm) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
                if let Some(n) = norm {
                    out.push((
                        format!("{p}.self_attn.{name}.weight"),
                        n.weight.val().into_data(),
                    ));
                }
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.weight.val().into_data(),
            ));
            for (name, norm) in [
                (
                    "pre_feedforward_layernorm",
                    &layer.pre_feedforward_layernorm,
                ),
                (
                    "post_feedforward_layernorm",
                    &layer.post_feedforward_layernorm,
                ),
            ] {
                if let Some(n) = norm {
                    out.push((format!("{p}.{name}.weight"), n.weight.val().into_data()));
                }
            }
        }
        out.push((
            "model.norm.weight".into(),
            self.model.norm.weight.val().into_data(),
        ));
        if !self.config().tie_word_embeddings {
            push_slot(&mut out, SlotId::LmHead, &self.lm_head)?;
        } else if self.lm_head.is_adapted() {
            return Err(ModelError::InvalidState(
                "lm_head holds adapters: merge_and_unload before exporting".into(),
            ));
        }
        Ok(out)
    }
}

/// Make a slot's active set the model's, restricted to the adapters the slot holds.
fn activate<B: Backend>(lora: &mut LoraLinear<B>, active: &[String], id: SlotId) -> Result<()> {
    let held: Vec<&str> = active
        .iter()
        .map(String::as_str)
        .filter(|n| lora.adapter_names().iter().any(|h| h == n))
        .collect();
    lora.set_adapter(&held).map_err(ModelError::layer(id))
}

/// The mixture a LoRA slot becomes when it holds any of `experts` (`None`: it holds none,
/// or is not a LoRA slot). It must hold nothing else and nothing merged.
fn mixture_of<B: Backend>(
    slot: &Slot<B>,
    id: SlotId,
    experts: &[&str],
) -> Result<Option<legora_nn::MoeLinear<B>>> {
    let Slot::Lora(l) = slot else {
        return Ok(None);
    };
    let holds = |n: &str| l.adapter_names().iter().any(|h| h == n);
    if !experts.iter().any(|n| holds(n)) {
        return Ok(None);
    }
    if !l.merged_adapters().is_empty() {
        return Err(ModelError::InvalidState(format!(
            "{id}: unmerge adapters before building a mixture"
        )));
    }
    let others: Vec<&String> = l
        .adapter_names()
        .iter()
        .filter(|n| !experts.contains(&n.as_str()))
        .collect();
    if !others.is_empty() {
        return Err(ModelError::InvalidState(format!(
            "{id}: also holds adapters {others:?} that are not experts; delete them first"
        )));
    }
    let mut moe =
        legora_nn::MoeLinear::from_frozen(l.weight.clone(), l.bias.as_ref().map(|b| b.val()))
            .map_err(ModelError::layer(id))?;
    for n in experts {
        let added = match l.adapter(n) {
            Ok(a) => moe.insert_expert(n, a.clone()),
            Err(_) => moe.insert_absent_expert(n),
        };
        added.map_err(ModelError::layer(id))?;
    }
    Ok(Some(moe))
}

fn push_slot<B: Backend>(
    out: &mut Vec<(String, TensorData)>,
    id: SlotId,
    p: &Slot<B>,
) -> Result<()> {
    if p.is_adapted() {
        return Err(ModelError::InvalidState(format!(
            "{id} holds adapters: merge_and_unload (or unload) before exporting base weights"
        )));
    }
    out.push((format!("{id}.weight"), p.weight().into_data()));
    if let Some(b) = p.bias() {
        out.push((format!("{id}.bias"), b.into_data()));
    }
    Ok(())
}
