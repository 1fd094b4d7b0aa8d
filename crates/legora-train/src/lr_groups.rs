//! Per-parameter-group learning rates: LoRA+ (PEFT's `create_loraplus_optimizer`) and
//! `[stages.<stage>.lr_groups]`.
//!
//! Every trainable tensor has a [`ParamKind`]; its learning rate is the stage's
//! (scheduled) learning rate times its kind's multiplier ([`TrainSettings::lr_scale`])
//! times its expert's (a task's own `learning_rate` over the stage's). The schedule thus
//! scales every group proportionally, as torch's schedulers scale each group's initial
//! learning rate.
//!
//! PEFT's LoRA+ puts `lora_B` and every 1-D tensor (DoRA's `lora_magnitude_vector`) at
//! `lr · loraplus_lr_ratio` and the rest (`lora_A`) at `lr`; legora's routers keep `lr`.

use std::collections::{BTreeMap, HashSet};

use burn::module::{Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use legora_models::{CausalLm, Slot};
use legora_nn::LoraAdapter;
use serde::{Deserialize, Serialize};

use crate::config::TrainSettings;
use crate::trainer::LrGroup;

/// The kinds of trainable tensor, each a key of `[stages.<stage>.lr_groups]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParamKind {
    /// PEFT `lora_A.weight`.
    LoraA,
    /// PEFT `lora_B.weight`.
    LoraB,
    /// DoRA's magnitude, PEFT `lora_magnitude_vector`.
    LoraMagnitudeVector,
    /// A mixture layer's router, `router.weight`.
    Router,
}

impl ParamKind {
    /// Every kind.
    pub const ALL: [ParamKind; 4] = [
        ParamKind::LoraA,
        ParamKind::LoraB,
        ParamKind::LoraMagnitudeVector,
        ParamKind::Router,
    ];

    /// The key: `lora_A`, `lora_B`, `lora_magnitude_vector`, `router`.
    pub fn name(self) -> &'static str {
        match self {
            ParamKind::LoraA => "lora_A",
            ParamKind::LoraB => "lora_B",
            ParamKind::LoraMagnitudeVector => "lora_magnitude_vector",
            ParamKind::Router => "router",
        }
    }
}

/// `[stages.<stage>.lr_groups]`: the learning rate of each kind of trainable tensor as a
/// multiplier of the stage's `learning_rate` (unset: 1, except that `lora_B` and
/// `lora_magnitude_vector` default to `loraplus_lr_ratio` when it is set).
#[allow(non_snake_case)]
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrGroups {
    /// Multiplier of `lora_A`.
    #[serde(default)]
    pub lora_A: Option<f64>,
    /// Multiplier of `lora_B` (exclusive with `loraplus_lr_ratio`).
    #[serde(default)]
    pub lora_B: Option<f64>,
    /// Multiplier of DoRA's `lora_magnitude_vector`.
    #[serde(default)]
    pub lora_magnitude_vector: Option<f64>,
    /// Multiplier of the routers.
    #[serde(default)]
    pub router: Option<f64>,
}

impl LrGroups {
    /// The multiplier set for `kind`, if any.
    pub fn get(&self, kind: ParamKind) -> Option<f64> {
        match kind {
            ParamKind::LoraA => self.lora_A,
            ParamKind::LoraB => self.lora_B,
            ParamKind::LoraMagnitudeVector => self.lora_magnitude_vector,
            ParamKind::Router => self.router,
        }
    }
}

/// The learning-rate groups of `model`'s trainable tensors: a tensor's multiplier is
/// `settings.lr_scale(kind)` times `expert_scales[e]` for expert `e` of a mixture (1
/// where the slice is short). Tensors whose multiplier is 1 are left out: they train
/// with the stage's learning rate. Groups are named `<kind>` or `<expert>.<kind>`.
pub fn param_groups<B: Backend>(
    model: &CausalLm<B>,
    settings: &TrainSettings,
    expert_scales: &[f64],
) -> Vec<LrGroup> {
    let mut groups: BTreeMap<String, LrGroup> = BTreeMap::new();
    let mut add = |name: String, kind: ParamKind, scale: f64, id: ParamId| {
        let scale = scale * settings.lr_scale(kind);
        if scale != 1.0 {
            let g = groups.entry(name.clone()).or_insert_with(|| LrGroup {
                name,
                params: HashSet::new(),
                scale,
            });
            g.params.insert(id);
        }
    };
    for (_, slot) in model.slots() {
        match slot {
            Slot::Linear(_) => {}
            Slot::Lora(l) => {
                for n in l.adapter_names() {
                    if let Ok(a) = l.adapter(n) {
                        for (kind, id) in adapter_params(a) {
                            add(kind.name().to_string(), kind, 1.0, id);
                        }
                    }
                }
            }
            Slot::Moe(m) => {
                for (e, name) in m.expert_names().iter().enumerate() {
                    let scale = expert_scales.get(e).copied().unwrap_or(1.0);
                    for (kind, id) in m.expert(e).map(adapter_params).unwrap_or_default() {
                        add(format!("{name}.{}", kind.name()), kind, scale, id);
                    }
                }
                if let Some(r) = &m.router {
                    router_param(&r.weight, &mut add);
                }
            }
        }
    }
    for (_, r) in model.layer_routers() {
        router_param(&r.weight, &mut add);
    }
    groups.into_values().collect()
}

fn router_param<B: Backend>(
    weight: &Param<Tensor<B, 2>>,
    add: &mut impl FnMut(String, ParamKind, f64, ParamId),
) {
    if weight.is_require_grad() {
        add("router".into(), ParamKind::Router, 1.0, weight.id);
    }
}

/// The trainable tensors of one adapter with their kinds.
fn adapter_params<B: Backend>(a: &LoraAdapter<B>) -> Vec<(ParamKind, ParamId)> {
    let mut out = Vec::new();
    for (kind, p) in [(ParamKind::LoraA, &a.lora_A), (ParamKind::LoraB, &a.lora_B)] {
        if p.is_require_grad() {
            out.push((kind, p.id));
        }
    }
    if let Some(m) = a
        .lora_magnitude_vector
        .as_ref()
        .filter(|m| m.is_require_grad())
    {
        out.push((ParamKind::LoraMagnitudeVector, m.id));
    }
    out
}
