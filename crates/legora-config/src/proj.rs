//! The projections of a decoder layer and the ids of adapter slots.
//!
//! This is the one list of projections in legora. A layer has either the separate
//! projections of Llama ([`Proj::SEPARATE`]) or the fused ones of Phi-3 ([`Proj::FUSED`]:
//! `qkv_proj`, `gate_up_proj`); everything that walks a layer's linears (adapters,
//! exports, benchmarks) iterates the model's list of the two. Module paths
//! (`model.layers.3.self_attn.q_proj`) are strings only at the HF / PEFT boundary, through
//! [`SlotId`]'s `Display` and `FromStr`.

use std::fmt;
use std::str::FromStr;

use crate::error::ConfigError;

/// One linear projection of a decoder layer, by its HF name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    /// `self_attn.q_proj`, `[heads·head_dim, hidden]`.
    QProj,
    /// `self_attn.k_proj`, `[kv_heads·head_dim, hidden]`.
    KProj,
    /// `self_attn.v_proj`, `[kv_heads·head_dim, hidden]`.
    VProj,
    /// `self_attn.qkv_proj` (Phi-3): q, k and v in one linear,
    /// `[(heads + 2·kv_heads)·head_dim, hidden]`.
    QkvProj,
    /// `self_attn.o_proj`, `[hidden, heads·head_dim]`.
    OProj,
    /// `mlp.gate_proj`, `[intermediate, hidden]`.
    GateProj,
    /// `mlp.up_proj`, `[intermediate, hidden]`.
    UpProj,
    /// `mlp.gate_up_proj` (Phi-3): gate and up in one linear, `[2·intermediate, hidden]`.
    GateUpProj,
    /// `mlp.down_proj`, `[hidden, intermediate]`.
    DownProj,
}

impl Proj {
    /// Every projection of either layout.
    pub const ALL: [Proj; 9] = [
        Proj::QProj,
        Proj::KProj,
        Proj::VProj,
        Proj::QkvProj,
        Proj::OProj,
        Proj::GateProj,
        Proj::UpProj,
        Proj::GateUpProj,
        Proj::DownProj,
    ];

    /// The projections of a Llama-like layer, in the order of its forward pass.
    pub const SEPARATE: [Proj; 7] = [
        Proj::QProj,
        Proj::KProj,
        Proj::VProj,
        Proj::OProj,
        Proj::GateProj,
        Proj::UpProj,
        Proj::DownProj,
    ];

    /// The projections of a Phi-3 layer (fused q/k/v and gate/up), in forward order.
    pub const FUSED: [Proj; 4] = [Proj::QkvProj, Proj::OProj, Proj::GateUpProj, Proj::DownProj];

    /// The HF module name (`q_proj`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::QProj => "q_proj",
            Proj::KProj => "k_proj",
            Proj::VProj => "v_proj",
            Proj::QkvProj => "qkv_proj",
            Proj::OProj => "o_proj",
            Proj::GateProj => "gate_proj",
            Proj::UpProj => "up_proj",
            Proj::GateUpProj => "gate_up_proj",
            Proj::DownProj => "down_proj",
        }
    }

    /// The block holding it: `self_attn` or `mlp`.
    pub fn block(self) -> &'static str {
        if self.is_attention() {
            "self_attn"
        } else {
            "mlp"
        }
    }

    /// Whether it belongs to the attention block.
    pub fn is_attention(self) -> bool {
        matches!(
            self,
            Proj::QProj | Proj::KProj | Proj::VProj | Proj::QkvProj | Proj::OProj
        )
    }

    /// The path inside a layer: `self_attn.q_proj`.
    pub fn layer_path(self) -> String {
        format!("{}.{}", self.block(), self.hf_name())
    }
}

impl fmt::Display for Proj {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hf_name())
    }
}

impl FromStr for Proj {
    type Err = ConfigError;

    /// The HF name (`q_proj`).
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Proj::ALL
            .into_iter()
            .find(|p| p.hf_name() == s)
            .ok_or_else(|| {
                ConfigError::invalid(
                    "projection",
                    "one of q_proj, k_proj, v_proj, qkv_proj, o_proj, gate_proj, up_proj, \
                     gate_up_proj, down_proj",
                    format!("\"{s}\""),
                )
            })
    }
}

/// Where an adapter slot sits in a causal LM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotId {
    /// A projection of decoder layer `layer`: `model.layers.{layer}.{block}.{proj}`.
    Layer {
        /// Decoder layer index.
        layer: usize,
        /// Which projection.
        proj: Proj,
    },
    /// The output head, `lm_head`.
    LmHead,
}

impl SlotId {
    /// The slot of `proj` in `layer`.
    pub fn layer(layer: usize, proj: Proj) -> Self {
        SlotId::Layer { layer, proj }
    }

    /// The decoder layer (`None` for `lm_head`).
    pub fn layer_index(&self) -> Option<usize> {
        match self {
            SlotId::Layer { layer, .. } => Some(*layer),
            SlotId::LmHead => None,
        }
    }

    /// The projection (`None` for `lm_head`).
    pub fn proj(&self) -> Option<Proj> {
        match self {
            SlotId::Layer { proj, .. } => Some(*proj),
            SlotId::LmHead => None,
        }
    }

    /// The last component of the HF path (`q_proj`, `lm_head`).
    pub fn name(&self) -> &'static str {
        match self {
            SlotId::Layer { proj, .. } => proj.hf_name(),
            SlotId::LmHead => "lm_head",
        }
    }

    /// Whether this is the output head (which PEFT's `"all-linear"` leaves out).
    pub fn is_output_head(&self) -> bool {
        matches!(self, SlotId::LmHead)
    }

    /// Every slot of a model with `num_layers` layers of the projections `projs`
    /// ([`Proj::SEPARATE`] or [`Proj::FUSED`]), in model order (`lm_head` last).
    pub fn all(num_layers: usize, projs: &[Proj]) -> impl Iterator<Item = SlotId> + '_ {
        (0..num_layers)
            .flat_map(move |layer| projs.iter().map(move |&proj| SlotId::Layer { layer, proj }))
            .chain(std::iter::once(SlotId::LmHead))
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotId::Layer { layer, proj } => {
                write!(
                    f,
                    "model.layers.{layer}.{}.{}",
                    proj.block(),
                    proj.hf_name()
                )
            }
            SlotId::LmHead => f.write_str("lm_head"),
        }
    }
}

impl FromStr for SlotId {
    type Err = ConfigError;

    /// An HF module path: `model.layers.{i}.self_attn.q_proj`, …, or `lm_head`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || {
            ConfigError::invalid(
                "module path",
                "`model.layers.<i>.self_attn.{q,k,v,qkv,o}_proj`, \
                 `model.layers.<i>.mlp.{gate,up,gate_up,down}_proj` or `lm_head`",
                format!("`{s}`"),
            )
        };
        if s == "lm_head" {
            return Ok(SlotId::LmHead);
        }
        let rest = s.strip_prefix("model.layers.").ok_or_else(bad)?;
        let (layer, rest) = rest.split_once('.').ok_or_else(bad)?;
        let layer: usize = layer.parse().map_err(|_| bad())?;
        let (block, name) = rest.split_once('.').ok_or_else(bad)?;
        let proj: Proj = name.parse().map_err(|_| bad())?;
        if proj.block() != block {
            return Err(bad());
        }
        Ok(SlotId::Layer { layer, proj })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_ids_round_trip_through_hf_paths() {
        let all: Vec<SlotId> = SlotId::all(2, &Proj::SEPARATE).collect();
        assert_eq!(all.len(), 15);
        let fused: Vec<SlotId> = SlotId::all(2, &Proj::FUSED).collect();
        assert_eq!(fused.len(), 9);
        for id in all.into_iter().chain(fused) {
            let s = id.to_string();
            assert_eq!(s.parse::<SlotId>().unwrap(), id, "{s}");
        }
        assert_eq!(
            SlotId::layer(3, Proj::UpProj).to_string(),
            "model.layers.3.mlp.up_proj"
        );
        assert_eq!(
            "model.layers.1.self_attn.qkv_proj"
                .parse::<SlotId>()
                .unwrap(),
            SlotId::layer(1, Proj::QkvProj)
        );
        assert!("model.layers.1.mlp.qkv_proj".parse::<SlotId>().is_err());
        for bad in [
            "model.layers.x.self_attn.q_proj",
            "model.layers.0.mlp.q_proj",
            "model.layers.0.self_attn.w_proj",
            "layers.0.self_attn.q_proj",
            "model.layers.0",
            "",
        ] {
            assert!(bad.parse::<SlotId>().is_err(), "{bad}");
        }
    }
}
