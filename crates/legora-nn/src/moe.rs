//! `MoeLinear`: one frozen base linear and E LoRA experts mixed per token.
//!
//! Fast path (two matmuls whatever E is, no gather/scatter):
//!
//! ```text
//! A_cat = cat_e(A_e)            [R, in]   R = Σ_e r_e
//! B_cat = cat_e(B_e)            [out, R]
//! g     = (gates ⊙ scale) · M   [N, R]    M[e, j] = 1 iff rank column j belongs to expert e
//! Δ     = ((dropout(x)·A_catᵀ) ⊙ g) · B_catᵀ
//! ```
//!
//! which is exactly `Σ_e gates_e · scale_e · (x·A_eᵀ)·B_eᵀ`, the reference loop kept in
//! [`MoeLinear::forward_loop`]. Task-routed mode feeds one-hot gates built from per-row
//! expert ids ([`task_gates`]), so E experts train concurrently over one base forward.
#![allow(non_snake_case)]

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::config::AdapterSpec;
use crate::error::{NnError, Result};
use crate::lora::{
    adapted_linear, base_linear, check_dims, flatten, frozen, lora_dropout, unflatten, LoraAdapter,
};
use crate::router::{Router, RouterOutput};

/// One-hot gates for task-routed training: row `b` of a `[batch, seq]` input uses
/// expert `ids[b]` for all its tokens. Built on the host: no device sync.
///
/// # Shapes
/// - ids: `[batch]` → `[batch · seq, E]`
pub fn task_gates<B: Backend>(
    ids: &[usize],
    seq: usize,
    num_experts: usize,
    device: &B::Device,
) -> Result<Tensor<B, 2>> {
    let mut g = vec![0f32; ids.len() * seq * num_experts];
    for (b, &id) in ids.iter().enumerate() {
        if id >= num_experts {
            return Err(NnError::config(
                format!("task id of row {b}"),
                format!("an expert index < {num_experts}"),
                id,
            ));
        }
        for t in 0..seq {
            g[(b * seq + t) * num_experts + id] = 1.0;
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(g, [ids.len() * seq, num_experts]),
        device,
    ))
}

/// A frozen linear with a mixture of LoRA experts.
#[derive(Module, Debug)]
pub struct MoeLinear<B: Backend> {
    /// Frozen base weight, HF layout `[out, in]`.
    pub weight: Param<Tensor<B, 2>>,
    /// Frozen base bias `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The experts (each a plain LoRA adapter; ranks and alphas may differ).
    pub experts: Vec<LoraAdapter<B>>,
    /// An optional router owned by this layer (otherwise gates come from outside).
    pub router: Option<Router<B>>,
    #[module(skip)]
    names: Vec<String>,
}

impl<B: Backend> MoeLinear<B> {
    /// Wrap a frozen base `[out, in]` (+ bias) with no experts yet.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Result<Self> {
        let [d_out, _] = weight.dims();
        if let Some(b) = &bias {
            check_dims("bias", &[d_out], &b.dims())?;
        }
        Ok(Self {
            weight: frozen(weight),
            bias: bias.map(frozen),
            experts: Vec::new(),
            router: None,
            names: Vec::new(),
        })
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        let [o, i] = self.weight.shape().dims::<2>();
        (i, o)
    }

    /// Number of experts E.
    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }

    /// Expert names, in gate order.
    pub fn expert_names(&self) -> &[String] {
        &self.names
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
        if self.names.iter().any(|n| n == name) {
            return Err(NnError::DuplicateAdapter { name: name.into() });
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
        self.names.push(name.to_string());
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

    fn check_gates(&self, n: usize, gates: &Tensor<B, 2>) -> Result<()> {
        check_dims("gates", &[n, self.num_experts()], &gates.dims())
    }

    /// `[E, R]` matrix expanding per-expert gates (times scale) over rank columns.
    fn expansion(&self, device: &B::Device) -> Tensor<B, 2> {
        let ranks: Vec<usize> = self.experts.iter().map(|e| e.rank()).collect();
        let total: usize = ranks.iter().sum();
        let mut m = vec![0f32; self.num_experts() * total];
        let mut col = 0;
        for (e, (r, ex)) in ranks.iter().zip(&self.experts).enumerate() {
            let s = ex.scaling() as f32;
            for j in col..col + r {
                m[e * total + j] = s;
            }
            col += r;
        }
        Tensor::from_data(TensorData::new(m, [self.num_experts(), total]), device)
    }

    /// The largest dropout among experts: the fast path shares one dropout mask.
    fn dropout(&self) -> f64 {
        self.experts
            .iter()
            .map(|e| e.lora_dropout)
            .fold(0.0, f64::max)
    }

    /// Fast stacked-rank forward with given gates.
    ///
    /// All experts share one dropout mask (rate = the largest expert dropout), which is
    /// the only difference from [`forward_loop`](Self::forward_loop) and only in training.
    ///
    /// # Shapes
    /// - x: `[..., in]` (N tokens), gates: `[N, E]` → `[..., out]`
    pub fn forward<const D: usize>(
        &self,
        x: Tensor<B, D>,
        gates: Tensor<B, 2>,
    ) -> Result<Tensor<B, D>> {
        let (x, dims) = flatten(x);
        let [n, _] = x.dims();
        self.check_gates(n, &gates)?;
        let (_, d_out) = self.dims();
        if self.experts.is_empty() {
            let y = base_linear(x, &self.weight, &self.bias);
            return Ok(unflatten(y, dims, d_out));
        }
        let a_cat = Tensor::cat(self.experts.iter().map(|e| e.lora_A.val()).collect(), 0);
        let b_cat = Tensor::cat(self.experts.iter().map(|e| e.lora_B.val()).collect(), 1);
        let rank = self.experts[0].rank();
        if self.experts.iter().all(|e| e.rank() == rank) {
            // one fused op (the same product; gradients reach the gates)
            let lora = legora_kernels::GatedLora {
                lora_a: a_cat,
                lora_b: b_cat,
                rank,
                scales: self.experts.iter().map(|e| e.scaling()).collect(),
                dropout: self.dropout(),
                gates,
            };
            let bias = self.bias.as_ref().map(|b| b.val());
            let y = legora_kernels::gated_lora_linear(x, self.weight.val(), bias, lora);
            return Ok(unflatten(y, dims, d_out));
        }
        let y = base_linear(x.clone(), &self.weight, &self.bias);
        let g = gates.matmul(self.expansion(&x.device()));
        let h = lora_dropout(x, self.dropout()).matmul(a_cat.transpose()) * g;
        Ok(unflatten(y + h.matmul(b_cat.transpose()), dims, d_out))
    }

    /// Task-routed forward: row `i` through expert `experts[i]` alone — what
    /// [`forward`](Self::forward) computes with one-hot gates, without the zero-gated
    /// experts' work (mLoRA's BatchLoRA). Experts of different ranks take the gated path.
    ///
    /// # Shapes
    /// - x: `[..., in]` (N tokens), experts: N indices `< E` → `[..., out]`
    pub fn forward_tasks<const D: usize>(
        &self,
        x: Tensor<B, D>,
        experts: &[usize],
    ) -> Result<Tensor<B, D>> {
        let dims = x.dims();
        let n: usize = dims[..D - 1].iter().product();
        let e = self.num_experts();
        check_dims("experts", &[n], &[experts.len()])?;
        if let Some((row, bad)) = experts.iter().enumerate().find(|(_, i)| **i >= e) {
            return Err(NnError::config(
                format!("expert of row {row}"),
                format!("an expert index < {e}"),
                bad,
            ));
        }
        let rank = self.experts.first().map_or(0, |x| x.rank());
        if self.experts.iter().any(|x| x.rank() != rank) {
            let mut g = vec![0f32; n * e];
            experts
                .iter()
                .enumerate()
                .for_each(|(i, &x)| g[i * e + x] = 1.0);
            let g = Tensor::from_data(TensorData::new(g, [n, e]), &x.device());
            return self.forward(x, g);
        }
        let (x, dims) = flatten(x);
        let (_, d_out) = self.dims();
        let lora = legora_kernels::RoutedLora {
            lora_a: Tensor::cat(self.experts.iter().map(|x| x.lora_A.val()).collect(), 0),
            lora_b: Tensor::cat(self.experts.iter().map(|x| x.lora_B.val()).collect(), 1),
            rank,
            scales: self.experts.iter().map(|x| x.scaling()).collect(),
            dropout: self.dropout(),
            experts: Some(experts.to_vec()),
        };
        let bias = self.bias.as_ref().map(|b| b.val());
        let y = legora_kernels::routed_lora_linear(x, self.weight.val(), bias, lora);
        Ok(unflatten(y, dims, d_out))
    }

    /// Every token through expert `e` alone: what [`forward`](Self::forward) computes
    /// with one-hot gates on `e`, without the other experts' (zero-gated) work — the
    /// task-routed path when every row of a batch belongs to one task.
    ///
    /// # Shapes
    /// - x: `[..., in]` → `[..., out]`
    pub fn forward_expert<const D: usize>(
        &self,
        x: Tensor<B, D>,
        e: usize,
    ) -> Result<Tensor<B, D>> {
        let expert = self.experts.get(e).ok_or_else(|| {
            NnError::InvalidState(format!(
                "expert {e} requested, this mixture has {}",
                self.num_experts()
            ))
        })?;
        let (x, dims) = flatten(x);
        let (_, d_out) = self.dims();
        let y = adapted_linear(x, &self.weight, &self.bias, expert);
        Ok(unflatten(y, dims, d_out))
    }

    /// Reference forward: a plain loop over experts (MixLoRA style). Same math as
    /// [`forward`](Self::forward); kept to test the fast path against.
    ///
    /// # Shapes
    /// - x: `[..., in]` (N tokens), gates: `[N, E]` → `[..., out]`
    pub fn forward_loop<const D: usize>(
        &self,
        x: Tensor<B, D>,
        gates: Tensor<B, 2>,
    ) -> Result<Tensor<B, D>> {
        let (x, dims) = flatten(x);
        let [n, _] = x.dims();
        self.check_gates(n, &gates)?;
        let (_, d_out) = self.dims();
        let mut y = base_linear(x.clone(), &self.weight, &self.bias);
        for (e, expert) in self.experts.iter().enumerate() {
            let g = gates.clone().narrow(1, e, 1);
            y = y + expert.forward(x.clone()) * g;
        }
        Ok(unflatten(y, dims, d_out))
    }

    /// Forward with the layer's own router (mask: 1 = real token, 0 = padding).
    ///
    /// # Shapes
    /// - x: `[..., in]` (N tokens), mask: `[N]` → (`[..., out]`, router output over N tokens)
    pub fn forward_routed<const D: usize>(
        &self,
        x: Tensor<B, D>,
        mask: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, D>, RouterOutput<B>)> {
        let router = self.router.as_ref().ok_or_else(|| {
            NnError::InvalidState("this MoeLinear has no router: pass gates explicitly".into())
        })?;
        let (x2, _) = flatten(x.clone());
        let out = router.forward(x2, mask);
        let y = self.forward(x, out.gates.clone())?;
        Ok((y, out))
    }

    /// Task-routed forward: row `b` of `x [batch, seq, in]` goes through expert `ids[b]`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, in]`, ids: `[batch]` → `[batch, seq, out]`
    pub fn forward_task(&self, x: Tensor<B, 3>, ids: &[usize]) -> Result<Tensor<B, 3>> {
        let [b, s, _] = x.dims();
        check_dims("task ids", &[b], &[ids.len()])?;
        let e = self.num_experts();
        if let Some((row, id)) = ids.iter().enumerate().find(|(_, i)| **i >= e) {
            return Err(NnError::config(
                format!("task id of row {row}"),
                format!("an expert index < {e}"),
                id,
            ));
        }
        let rows: Vec<usize> = ids
            .iter()
            .flat_map(|&t| std::iter::repeat_n(t, s))
            .collect();
        self.forward_tasks(x, &rows)
    }
}
