//! `MoeLinear`: one frozen base linear and E LoRA experts mixed per token.
//!
//! Stacked form (two skinny products whatever E is, no gather/scatter):
//!
//! ```text
//! A_cat = cat_e(A_e)            [R, in]   R = Σ_e r_e
//! B_cat = cat_e(B_e)            [out, R]
//! G     = (gates ⊙ scale) · M   [N, R]    M[e, j] = 1 iff rank column j belongs to expert e
//! Δ     = ((dropout(x)·A_catᵀ) ⊙ G) · B_catᵀ
//! ```
//!
//! which is exactly `Σ_e gates_e · scale_e · (x·A_eᵀ)·B_eᵀ`, the reference loop kept in
//! [`crate::reference::moe_loop`]. Which experts a token uses is one [`Experts`] value:
//! the layer's own router, given gates, one expert per row (task-routed training: E
//! experts trained concurrently over one base forward) or one expert for all rows.
//!
//! A mixture's experts need not all adapt every module (experts from presets with other
//! `target_modules`): a slot holds the experts that target it and knows the index of each
//! in the mixture; an expert without an adapter here contributes nothing (its gate is
//! ignored, its rows run the base).
#![allow(non_snake_case)]

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use legora_config::AdapterSpec;
use legora_kernels::{FrozenWeight, Gating, StackedLora};

use crate::error::{NnError, Result};
use crate::lora::{base_linear, check_dims, flatten, frozen, unflatten, LoraAdapter};
use crate::router::{Router, RouterOutput};

/// Which experts of a mixture each token uses: the one selection carried from the model
/// input down to every mixture slot.
#[derive(Debug, Clone)]
pub enum Experts<B: Backend> {
    /// The slot's own router decides; `mask` marks real tokens (1) and padding (0),
    /// `[N]`, so padding stays out of the router's losses and statistics.
    Router {
        /// Real-token mask `[N]` (`None`: every token is real).
        mask: Option<Tensor<B, 1>>,
    },
    /// Given gates `[N, E]` (a layer router's output); gradients reach them.
    Gates(Tensor<B, 2>),
    /// Row `i` of the flattened input through expert `ids[i]` alone, or the base alone
    /// for `None` (task-routed training, per-request adapters).
    PerRow(Arc<[Option<usize>]>),
    /// Every row through expert `e` alone.
    Single(usize),
}

impl<B: Backend> Experts<B> {
    /// `Experts::PerRow` for `[batch, seq]` inputs where row `b` of the batch uses expert
    /// `ids[b]` for all its `seq` tokens.
    pub fn per_batch_row(ids: &[Option<usize>], seq: usize) -> Self {
        let rows: Arc<[Option<usize>]> = ids
            .iter()
            .flat_map(|&t| std::iter::repeat_n(t, seq))
            .collect();
        Experts::PerRow(rows)
    }
}

/// A frozen linear with a mixture of LoRA experts.
#[derive(Module, Debug)]
pub struct MoeLinear<B: Backend> {
    /// Frozen base weight, HF layout `[out, in]`, in its storage format (f32, bf16, f16,
    /// int8, NF4, FP4); [`FrozenWeight::val`] gives it as f32.
    pub weight: FrozenWeight<B>,
    /// Frozen base bias `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The experts that adapt this module (each a plain LoRA adapter; ranks and alphas
    /// may differ), in mixture order.
    pub experts: Vec<LoraAdapter<B>>,
    /// An optional router owned by this layer (otherwise gates come from outside).
    pub router: Option<Router<B>>,
    /// Every expert of the mixture, in gate order (also those absent here).
    #[module(skip)]
    names: Vec<String>,
    /// The mixture index of each entry of `experts`.
    #[module(skip)]
    index: Vec<usize>,
}

impl<B: Backend> MoeLinear<B> {
    /// Wrap a frozen base `[out, in]` (+ bias) with no experts yet.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Result<Self> {
        Self::from_frozen(FrozenWeight::dense(weight), bias)
    }

    /// Wrap a frozen base `[out, in]` kept in its storage format (+ bias) with no experts
    /// yet.
    pub fn from_frozen(weight: FrozenWeight<B>, bias: Option<Tensor<B, 1>>) -> Result<Self> {
        let [d_out, _] = weight.dims();
        if let Some(b) = &bias {
            check_dims("bias", &[d_out], &b.dims())?;
        }
        Ok(Self {
            weight,
            bias: bias.map(frozen),
            experts: Vec::new(),
            router: None,
            names: Vec::new(),
            index: Vec::new(),
        })
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        let [o, i] = self.weight.dims();
        (i, o)
    }

    /// Number of experts E of the mixture (the gates' width), also those without an
    /// adapter on this module.
    pub fn num_experts(&self) -> usize {
        self.names.len()
    }

    /// Expert names, in gate order.
    pub fn expert_names(&self) -> &[String] {
        &self.names
    }

    /// Expert `e`'s adapter on this module (`None` when it does not adapt it).
    pub fn expert(&self, e: usize) -> Option<&LoraAdapter<B>> {
        self.index
            .iter()
            .position(|&i| i == e)
            .map(|k| &self.experts[k])
    }

    /// Add a freshly initialised expert.
    pub fn add_expert(&mut self, name: &str, spec: &AdapterSpec) -> Result<()> {
        let (d_in, d_out) = self.dims();
        let a = LoraAdapter::init(spec, d_in, d_out, &self.weight.device())?;
        self.insert_expert(name, a)
    }

    /// Add an existing adapter as an expert (shapes checked). The expert is trainable
    /// whatever it was before (e.g. an inactive, frozen adapter of a `LoraLinear`); freeze
    /// experts with [`set_experts_trainable`](Self::set_experts_trainable).
    pub fn insert_expert(&mut self, name: &str, adapter: LoraAdapter<B>) -> Result<()> {
        self.check_new_name(name)?;
        if adapter.is_dora() {
            return Err(NnError::config(
                "use_dora",
                "LoRA experts (DoRA experts in a mixture are not supported yet)",
                format!("DoRA adapter `{name}`"),
            ));
        }
        let (d_in, d_out) = self.dims();
        let r = adapter.rank();
        check_dims(
            &format!("{name}.lora_A.weight"),
            &[r, d_in],
            &adapter.lora_A.dims(),
        )?;
        check_dims(
            &format!("{name}.lora_B.weight"),
            &[d_out, r],
            &adapter.lora_B.dims(),
        )?;
        self.experts.push(adapter.set_trainable(true));
        self.index.push(self.names.len());
        self.names.push(name.to_string());
        Ok(())
    }

    /// Add an expert of the mixture that has no adapter on this module: its gate is
    /// ignored here and its rows run the base.
    pub fn insert_absent_expert(&mut self, name: &str) -> Result<()> {
        self.check_new_name(name)?;
        self.names.push(name.to_string());
        Ok(())
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        if self.names.iter().any(|n| n == name) {
            return Err(NnError::DuplicateAdapter { name: name.into() });
        }
        Ok(())
    }

    /// Attach a router; its expert count must equal E.
    pub fn with_router(mut self, router: Router<B>) -> Result<Self> {
        if router.num_experts() != self.num_experts() {
            return Err(NnError::config(
                "num_experts",
                format!("the layer's expert count ({})", self.num_experts()),
                router.num_experts(),
            ));
        }
        self.router = Some(router);
        Ok(self)
    }

    /// Freeze or unfreeze all experts (router stage: experts frozen).
    pub fn set_experts_trainable(mut self, trainable: bool) -> Self {
        self.experts = self
            .experts
            .into_iter()
            .map(|e| e.set_trainable(trainable))
            .collect();
        self
    }

    /// The largest dropout among experts: the stacked form shares one dropout mask.
    fn dropout(&self) -> f64 {
        self.experts
            .iter()
            .map(|e| e.lora_dropout)
            .fold(0.0, f64::max)
    }

    /// The position in `experts` of mixture expert `e`, checked against E.
    fn local(&self, e: usize, what: &str) -> Result<Option<usize>> {
        let n = self.num_experts();
        if e >= n {
            return Err(NnError::config(
                what,
                format!("an expert index < {n} (the mixture's expert count)"),
                e,
            ));
        }
        Ok(self.index.iter().position(|&i| i == e))
    }

    /// The kernel's gating for `experts` over `n` rows, in this slot's own expert order,
    /// with the router's output when the slot routed itself.
    fn gating(
        &self,
        x: &Tensor<B, 2>,
        experts: &Experts<B>,
    ) -> Result<(Gating<B>, Option<RouterOutput<B>>)> {
        let n = x.dims()[0];
        Ok(match experts {
            Experts::Single(e) => match self.local(*e, "expert")? {
                Some(k) => (Gating::Single(k), None),
                None => (Gating::Rows(vec![None; n].into()), None),
            },
            Experts::PerRow(ids) => {
                check_dims("experts per row", &[n], &[ids.len()])?;
                let rows = ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| match id {
                        Some(e) => self.local(*e, &format!("expert of row {i}")),
                        None => Ok(None),
                    })
                    .collect::<Result<Arc<[Option<usize>]>>>()?;
                (Gating::Rows(rows), None)
            }
            Experts::Gates(g) => {
                check_dims("gates", &[n, self.num_experts()], &g.dims())?;
                (Gating::Dense(self.present_gates(g.clone())), None)
            }
            Experts::Router { mask } => {
                let router = self.router.as_ref().ok_or_else(|| {
                    NnError::InvalidState(
                        "this mixture slot has no router: pass task ids (an expert per row), \
                         gates or one expert, or give the layer (or the slot) a router"
                            .into(),
                    )
                })?;
                let out = router.forward(x.clone(), mask.clone());
                let g = self.present_gates(out.gates.clone());
                (Gating::Dense(g), Some(out))
            }
        })
    }

    /// The gate columns of the experts present here, `[N, E] → [N, E_here]`.
    fn present_gates(&self, g: Tensor<B, 2>) -> Tensor<B, 2> {
        if self.index.len() == self.num_experts() {
            return g;
        }
        let idx: Vec<i64> = self.index.iter().map(|&i| i as i64).collect();
        let n = idx.len();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [n]), &g.device());
        g.select(1, idx)
    }

    /// Apply the mixture: `x·Wᵀ + b + Σ_e g_e·s_e·(dropout(x)·A_eᵀ)·B_eᵀ` with the
    /// experts chosen by `experts`, in the stacked form (one fused op). All experts share
    /// one dropout mask (rate = the largest expert dropout).
    ///
    /// # Shapes
    /// - x: `[..., in]` (N tokens), gates `[N, E]`, ids `[N]`, mask `[N]` →
    ///   (`[..., out]`, the router's output over N tokens when the slot routed itself)
    pub fn forward<const D: usize>(
        &self,
        x: Tensor<B, D>,
        experts: &Experts<B>,
    ) -> Result<(Tensor<B, D>, Option<RouterOutput<B>>)> {
        let (x, dims) = flatten(x);
        let (_, d_out) = self.dims();
        let (gating, routed) = self.gating(&x, experts)?;
        let (used, gating) = only_used(gating, self.experts.len());
        let used: Vec<&LoraAdapter<B>> = used.iter().map(|&k| &self.experts[k]).collect();
        if used.is_empty() {
            let y = base_linear(x, &self.weight, &self.bias);
            return Ok((unflatten(y, dims, d_out), routed));
        }
        let bias = self.bias.as_ref().map(|b| b.val());
        let lora = StackedLora {
            lora_a: Tensor::cat(used.iter().map(|e| e.lora_A.val()).collect(), 0),
            lora_b: Tensor::cat(used.iter().map(|e| e.lora_B.val()).collect(), 1),
            ranks: used.iter().map(|e| e.rank()).collect(),
            scales: used.iter().map(|e| e.scaling()).collect(),
            dropout: self.dropout(),
            gating,
        };
        let y = legora_kernels::stacked_lora_frozen(x, &self.weight, bias, lora);
        Ok((unflatten(y, dims, d_out), routed))
    }
}

/// The experts a gating actually uses (in slot order) and the gating renumbered over
/// them: rows and single-expert selections pass only their experts to the kernel, so an
/// expert no row uses gets no gradient at all (as if trained alone), not a zero one.
fn only_used<B: Backend>(gating: Gating<B>, num: usize) -> (Vec<usize>, Gating<B>) {
    match gating {
        Gating::Single(k) => (vec![k], Gating::Single(0)),
        Gating::Rows(rows) => {
            let mut seen = vec![false; num];
            rows.iter().flatten().for_each(|&k| seen[k] = true);
            let used: Vec<usize> = (0..num).filter(|&k| seen[k]).collect();
            let mut new_id = vec![0; num];
            used.iter().enumerate().for_each(|(j, &k)| new_id[k] = j);
            let rows = rows.iter().map(|r| r.map(|k| new_id[k])).collect();
            (used, Gating::Rows(rows))
        }
        dense @ Gating::Dense(_) => ((0..num).collect(), dense),
    }
}
