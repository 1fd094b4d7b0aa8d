//! The packed forward of continuous batching: one forward pass over the new tokens of
//! several sequences of different lengths, each with its own cache, laid one after the
//! other (no padding), each using its own adapter, the base, or a router-gated mixture.
//!
//! - Projections run once over all `T` new tokens. Every adapter a server holds is an
//!   expert of one stacked mixture per slot: a sequence on one adapter is a
//!   [`Experts::PerRow`] row (the base is `None`), a sequence on a mixture is gated per
//!   token by its [`RouterGroup`]'s routers; when some rows are gated, the step passes
//!   one [`Experts::Gates`] matrix whose fixed rows are one-hot (an adapter), zero (the
//!   base) or the group's gates in the group's expert columns. The stacked kernel
//!   computes a one-hot row exactly as the row alone.
//! - Attention runs per sequence over its own key/value buffers
//!   ([`legora_kernels::packed_attention`]): each buffer has spare capacity, grown
//!   geometrically, so decoding one token writes one row per layer instead of copying the
//!   cache.
//! - Only the last new token of a sequence that asks for them gets logits (a prefill
//!   chunk that is not the prompt's last skips `lm_head`).
//!
//! A sequence's token at position `p` sees what [`CausalLm::forward_cached`] shows it
//! for the sequence alone: the same positions, the same causal mask, the same router
//! inputs (`prefix_mean` pooling continues the sequence's running sum exactly).

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};
use legora_kernels::KvSeq;
use legora_nn::{Experts, Proj, Router, RouterPooling, SlotId};

use crate::decoder::{head_norm, run_slot, CausalLm, DecoderLayer, RopeTables};
use crate::error::{ModelError, Result};
use crate::slot::Slot;

/// Capacity of a sequence's first buffers (positions).
const MIN_CAPACITY: usize = 16;

/// One layer's keys (after RoPE) and values of one sequence,
/// `[capacity, kv_heads, head_dim]` each.
#[derive(Debug, Clone)]
struct SeqKv<B: Backend> {
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
}

/// The cache of one sequence for [`CausalLm::forward_packed`]: per layer its keys and
/// values in buffers with spare capacity (doubled when full), and the running sums of a
/// `prefix_mean` router's input.
#[derive(Debug, Clone)]
pub struct SeqCache<B: Backend> {
    layers: Vec<Option<SeqKv<B>>>,
    /// Σ of the router inputs so far, `[1, hidden]`, per layer with a pooling router.
    pooled: Vec<Option<Tensor<B, 2>>>,
    len: usize,
    capacity: usize,
    /// A failed step left the buffers incomplete.
    poisoned: bool,
}

impl<B: Backend> SeqCache<B> {
    /// An empty cache for a model with `num_layers` layers (no memory until the first
    /// step).
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            pooled: vec![None; num_layers],
            len: 0,
            capacity: 0,
            poisoned: false,
        }
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold without growing.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held by the key/value buffers (f32).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|kv| 2 * kv.k.shape().num_elements() * std::mem::size_of::<f32>())
            .sum()
    }

    /// The capacity for `extra` more positions: unchanged when they fit, else doubled
    /// (at least what is needed, at least [`MIN_CAPACITY`]).
    fn capacity_for(&self, extra: usize) -> usize {
        let need = self.len + extra;
        if need <= self.capacity {
            self.capacity
        } else {
            need.max(2 * self.capacity).max(MIN_CAPACITY)
        }
    }
}

/// How one sequence of a packed step uses the experts held by the model's mixture slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqExperts {
    /// The frozen base alone.
    Base,
    /// Expert `e` of every mixture slot alone (an adapter held as an expert; where it
    /// adapts nothing, the base).
    Expert(usize),
    /// Gated per token by the routers of group `g` of the step's [`RouterGroup`]s.
    Routed(usize),
}

/// One sequence of a packed step.
#[derive(Debug, Clone, Copy)]
pub struct PackedSeq<'a> {
    /// Its new tokens (a prefill chunk, or the last sampled token).
    pub tokens: &'a [u32],
    /// The experts it uses.
    pub experts: SeqExperts,
    /// Whether to return the next-token logits after its last new token.
    pub logits: bool,
}

/// A decoder layer's router in a [`RouterGroup`].
#[derive(Debug, Clone)]
pub struct LayerRouter<B: Backend> {
    /// The router (its gate width is the group's expert count).
    pub router: Router<B>,
    /// Whether it reads the attention block's normalized input (the group has experts on
    /// the layer's attention projections), else the MLP block's (MixLoRA).
    pub reads_attention_input: bool,
}

/// One mixture among several held by one model: per-layer routers gating some of the
/// mixture slots' experts. Gate column `j` of its routers weights expert `experts[j]`.
#[derive(Debug, Clone)]
pub struct RouterGroup<B: Backend> {
    /// The mixture-slot index of each expert the routers gate, in gate order.
    pub experts: Vec<usize>,
    /// One entry per decoder layer: its router (`None`: the group has no experts there).
    pub layers: Vec<Option<LayerRouter<B>>>,
}

/// What every layer of one packed step shares.
struct Step<'a, B: Backend> {
    seqs: &'a [PackedSeq<'a>],
    groups: &'a [RouterGroup<B>],
    /// First row of each sequence in the packed tokens.
    offsets: Vec<usize>,
    /// Cached positions of each sequence before the step.
    past: Vec<usize>,
    /// Total new tokens.
    rows: usize,
    /// Experts of the mixture slots.
    num_experts: usize,
    /// Rotary tables of the rows' positions.
    rope: RopeTables<B>,
    /// The fixed expert of every row (`None`: the base, or gated by a group).
    fixed: Arc<[Option<usize>]>,
    device: B::Device,
}

/// Where in a layer a selection is made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    Attention,
    Mlp,
}

impl<B: Backend> Step<'_, B> {
    /// The groups with a router in `layer` that some sequence of the step uses, with the
    /// block whose input their router reads.
    fn active(&self, layer: usize) -> Vec<(usize, &LayerRouter<B>, Block)> {
        let mut out = Vec::new();
        for (g, group) in self.groups.iter().enumerate() {
            let used = self.seqs.iter().any(|s| s.experts == SeqExperts::Routed(g));
            if let (true, Some(Some(r))) = (used, group.layers.get(layer)) {
                let block = if r.reads_attention_input {
                    Block::Attention
                } else {
                    Block::Mlp
                };
                out.push((g, r, block));
            }
        }
        out
    }

    /// Rows of the sequences on group `g` (in sequence order).
    fn group_rows(&self, g: usize) -> Vec<i64> {
        let mut rows = Vec::new();
        for (i, s) in self.seqs.iter().enumerate() {
            if s.experts == SeqExperts::Routed(g) {
                rows.extend((self.offsets[i]..self.offsets[i] + s.tokens.len()).map(|r| r as i64));
            }
        }
        rows
    }

    /// The fixed rows as gates: one-hot for an expert, zero for the base and gated rows.
    ///
    /// # Shapes
    /// → `[T, E]`
    fn fixed_gates(&self) -> Tensor<B, 2> {
        let e = self.num_experts;
        let mut g = vec![0f32; self.rows * e];
        for (row, id) in self.fixed.iter().enumerate() {
            if let Some(id) = id {
                g[row * e + id] = 1.0;
            }
        }
        Tensor::from_data(TensorData::new(g, [self.rows, e]), &self.device)
    }
}

impl<B: Backend> CausalLm<B> {
    /// A fresh cache for [`forward_packed`](Self::forward_packed).
    pub fn new_seq_cache(&self) -> SeqCache<B> {
        SeqCache::new(self.model.layers.len())
    }

    /// The model's own layer routers as one group over all its mixture experts (`None`
    /// when no layer both has a router and holds a mixture): what
    /// [`forward`](Self::forward) routes with.
    pub fn router_group(&self) -> Option<RouterGroup<B>> {
        let e = self.num_experts()?;
        let layers: Vec<Option<LayerRouter<B>>> = self
            .model
            .layers
            .iter()
            .map(|l| match &l.router {
                Some(r) if l.has_mixture() => Some(LayerRouter {
                    router: r.clone(),
                    reads_attention_input: l.attn_has_mixture(),
                }),
                _ => None,
            })
            .collect();
        layers.iter().any(Option::is_some).then(|| RouterGroup {
            experts: (0..e).collect(),
            layers,
        })
    }

    /// One forward pass over the new tokens of several sequences, each reading and
    /// extending its own cache (continuous batching; see the module docs). Mixture slots
    /// are gated by `groups` for [`SeqExperts::Routed`] sequences; the model's own layer
    /// routers are not used (pass [`router_group`](Self::router_group) for them), nor
    /// slot-owned routers; an `lm_head` mixture runs the base for gated rows.
    ///
    /// Returns the next-token logits after the last new token of every sequence with
    /// `logits` set, in order.
    ///
    /// # Shapes
    /// - `T = Σ tokens` new tokens → logits `[n_logits, vocab]`
    pub fn forward_packed(
        &self,
        seqs: &[PackedSeq<'_>],
        caches: &mut [&mut SeqCache<B>],
        groups: &[RouterGroup<B>],
    ) -> Result<Tensor<B, 2>> {
        self.check_packed(seqs, caches, groups)?;
        let step = self.packed_step(seqs, caches, groups);
        for c in caches.iter_mut() {
            // Cleared once the step went through.
            c.poisoned = true;
        }
        let logits = self.packed_layers(&step, caches)?;
        for (c, s) in caches.iter_mut().zip(seqs) {
            c.len += s.tokens.len();
            c.poisoned = false;
        }
        Ok(logits)
    }

    /// Everything checked before the caches are touched.
    fn check_packed(
        &self,
        seqs: &[PackedSeq<'_>],
        caches: &[&mut SeqCache<B>],
        groups: &[RouterGroup<B>],
    ) -> Result<()> {
        let bad = |m: String| Err(ModelError::Input(m));
        let (n_layers, vocab) = (self.model.layers.len(), self.config().vocab_size);
        let e = self.num_experts().unwrap_or(0);
        if seqs.is_empty() || seqs.len() != caches.len() {
            return bad(format!(
                "a packed step needs one cache per sequence and at least one sequence \
                 ({} sequences, {} caches)",
                seqs.len(),
                caches.len()
            ));
        }
        for (i, (s, c)) in seqs.iter().zip(caches).enumerate() {
            if s.tokens.is_empty() {
                return bad(format!("sequence {i} has no new tokens"));
            }
            if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
                return bad(format!(
                    "sequence {i}: token id {t} is outside the vocabulary (vocab_size = {vocab})"
                ));
            }
            if c.layers.len() != n_layers || c.poisoned {
                return bad(format!(
                    "sequence {i}: its cache has {} layers, the model {n_layers}{}",
                    c.layers.len(),
                    if c.poisoned {
                        " (and a failed step left it incomplete)"
                    } else {
                        ""
                    }
                ));
            }
            match s.experts {
                SeqExperts::Expert(x) if x >= e => {
                    return bad(format!(
                        "sequence {i}: expert {x}, but the mixture slots hold {e} experts"
                    ))
                }
                SeqExperts::Routed(g) if g >= groups.len() => {
                    return bad(format!(
                        "sequence {i}: router group {g}, but {} groups were given",
                        groups.len()
                    ))
                }
                _ => {}
            }
        }
        for (g, group) in groups.iter().enumerate() {
            if group.layers.len() != n_layers {
                return bad(format!(
                    "router group {g} has {} layer entries, the model {n_layers} layers",
                    group.layers.len()
                ));
            }
            if let Some(x) = group.experts.iter().find(|&&x| x >= e) {
                return bad(format!(
                    "router group {g} names expert {x}, but the mixture slots hold {e} experts"
                ));
            }
            for (l, r) in group.layers.iter().enumerate() {
                if let Some(r) = r {
                    if r.router.num_experts() != group.experts.len() {
                        return bad(format!(
                            "router group {g}, layer {l}: the router gates {} experts, the \
                             group names {}",
                            r.router.num_experts(),
                            group.experts.len()
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Offsets, positions (and their rotations) and fixed experts of a checked step; the
    /// caches' capacities for it.
    fn packed_step<'a>(
        &self,
        seqs: &'a [PackedSeq<'a>],
        caches: &mut [&mut SeqCache<B>],
        groups: &'a [RouterGroup<B>],
    ) -> Step<'a, B> {
        let device = self.model.embed_tokens.device();
        let (mut offsets, mut past, mut positions, mut fixed) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut rows = 0;
        for (s, c) in seqs.iter().zip(caches.iter_mut()) {
            let n = s.tokens.len();
            offsets.push(rows);
            past.push(c.len);
            positions.extend((c.len..c.len + n).map(|p| p as i64));
            let id = match s.experts {
                SeqExperts::Expert(e) => Some(e),
                SeqExperts::Base | SeqExperts::Routed(_) => None,
            };
            fixed.extend(std::iter::repeat_n(id, n));
            c.capacity = c.capacity_for(n);
            rows += n;
        }
        let positions =
            Tensor::<B, 2, Int>::from_data(TensorData::new(positions, [1, rows]), &device);
        let rope = RopeTables::new(self.config(), positions);
        Step {
            seqs,
            groups,
            offsets,
            past,
            rows,
            num_experts: self.num_experts().unwrap_or(0),
            rope,
            fixed: fixed.into(),
            device,
        }
    }

    /// Embeddings, the layers, the final norm and `lm_head` on the rows that need logits.
    fn packed_layers(
        &self,
        st: &Step<'_, B>,
        caches: &mut [&mut SeqCache<B>],
    ) -> Result<Tensor<B, 2>> {
        let hidden = self.config().hidden_size;
        let ids: Vec<i64> = st
            .seqs
            .iter()
            .flat_map(|s| s.tokens.iter().map(|&t| t as i64))
            .collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [st.rows]), &st.device);
        let mut h = self.embed(ids).reshape([1, st.rows, hidden]);
        for (i, layer) in self.model.layers.iter().enumerate() {
            h = packed_layer(layer, i, h, st, caches)?;
        }
        let last: Vec<i64> = st
            .seqs
            .iter()
            .zip(&st.offsets)
            .filter(|(s, _)| s.logits)
            .map(|(s, &o)| (o + s.tokens.len() - 1) as i64)
            .collect();
        let vocab = self.config().vocab_size;
        if last.is_empty() {
            return Ok(Tensor::zeros([0, vocab], &st.device));
        }
        let fixed: Arc<[Option<usize>]> = last.iter().map(|&r| st.fixed[r as usize]).collect();
        let n = last.len();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(last, [n]), &st.device);
        let h = h
            .reshape([st.rows, hidden])
            .select(0, idx)
            .reshape([1, n, hidden]);
        let h = self.model.norm.forward(h);
        let mut routing = Vec::new();
        let logits = run_slot(
            &self.lm_head,
            h,
            &Experts::PerRow(fixed),
            SlotId::LmHead,
            &mut routing,
        )?;
        Ok(logits.reshape([n, vocab]))
    }
}

/// The gates of the rows of group `g` read from the block input `x`, placed in the
/// group's expert columns and scattered into `acc` (`[T, E]`); a pooling router's running
/// sums advance in `caches`.
///
/// # Shapes
/// - x: `[T, hidden]`, acc: `[T, E]` → `[T, E]`
fn add_group_gates<B: Backend>(
    acc: Tensor<B, 2>,
    x: &Tensor<B, 2>,
    (g, r): (usize, &LayerRouter<B>),
    layer: usize,
    st: &Step<'_, B>,
    caches: &mut [&mut SeqCache<B>],
) -> Tensor<B, 2> {
    let rows = st.group_rows(g);
    let n = rows.len();
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), &st.device);
    let input = match r.router.pooling() {
        RouterPooling::Token => x.clone().select(0, rows.clone()),
        RouterPooling::PrefixMean => prefix_means(x, g, layer, st, caches),
    };
    let gates = r.router.forward(input, None).gates;
    // Column c of the mixture takes gate column j when experts[j] = c, else a zero column.
    let k = st.groups[g].experts.len();
    let mut cols = vec![k as i64; st.num_experts];
    for (j, &c) in st.groups[g].experts.iter().enumerate() {
        cols[c] = j as i64;
    }
    let cols = Tensor::<B, 1, Int>::from_data(TensorData::new(cols, [st.num_experts]), &st.device);
    let placed = Tensor::cat(vec![gates, Tensor::zeros([n, 1], &st.device)], 1).select(1, cols);
    acc.select_assign(0, rows, placed, IndexingUpdateOp::Add)
}

/// The causal mean of every router input so far of each sequence on group `g`,
/// continuing its running sum (`cumsum` over the previous sum and the new rows, so
/// chunks add up in the order one pass over the whole sequence adds them).
///
/// # Shapes
/// - x: `[T, hidden]` → `[rows of group g, hidden]`
fn prefix_means<B: Backend>(
    x: &Tensor<B, 2>,
    g: usize,
    layer: usize,
    st: &Step<'_, B>,
    caches: &mut [&mut SeqCache<B>],
) -> Tensor<B, 2> {
    let hidden = x.dims()[1];
    let mut means = Vec::new();
    for (i, s) in st.seqs.iter().enumerate() {
        if s.experts != SeqExperts::Routed(g) {
            continue;
        }
        let n = s.tokens.len();
        let prev = caches[i].pooled[layer]
            .take()
            .unwrap_or_else(|| Tensor::zeros([1, hidden], &st.device));
        let new = x.clone().narrow(0, st.offsets[i], n);
        let sums = Tensor::cat(vec![prev, new], 0).cumsum(0).narrow(0, 1, n);
        caches[i].pooled[layer] = Some(sums.clone().narrow(0, n - 1, 1));
        let counts: Vec<f32> = (st.past[i] + 1..=st.past[i] + n)
            .map(|c| c as f32)
            .collect();
        let counts = Tensor::<B, 2>::from_data(TensorData::new(counts, [n, 1]), &st.device);
        means.push(sums / counts);
    }
    Tensor::cat(means, 0)
}

/// The selection of block `block`'s mixture slots: one expert (or the base) per row when
/// no gated group reads this block or an earlier one of the layer, else the gates of
/// every row (`gates` keeps the layer's gates computed so far).
///
/// # Shapes
/// - x: `[1, T, hidden]` (the block's normalized input)
#[allow(clippy::too_many_arguments)]
fn select<B: Backend>(
    block: Block,
    x: &Tensor<B, 3>,
    layer: usize,
    active: &[(usize, &LayerRouter<B>, Block)],
    gates: &mut Option<Tensor<B, 2>>,
    st: &Step<'_, B>,
    caches: &mut [&mut SeqCache<B>],
) -> Experts<B> {
    let here: Vec<(usize, &LayerRouter<B>)> = active
        .iter()
        .filter(|(_, _, b)| *b == block)
        .map(|(g, r, _)| (*g, *r))
        .collect();
    if !here.is_empty() {
        let x2 = x.clone().reshape([st.rows, x.dims()[2]]);
        let mut acc = gates.take().unwrap_or_else(|| st.fixed_gates());
        for gr in here {
            acc = add_group_gates(acc, &x2, gr, layer, st, caches);
        }
        *gates = Some(acc);
    }
    match gates {
        Some(g) => Experts::Gates(g.clone()),
        None => Experts::PerRow(st.fixed.clone()),
    }
}

/// One decoder layer over the packed rows (see [`DecoderLayer`]'s forward).
///
/// # Shapes
/// - h: `[1, T, hidden]` → `[1, T, hidden]`
fn packed_layer<B: Backend>(
    layer: &DecoderLayer<B>,
    i: usize,
    h: Tensor<B, 3>,
    st: &Step<'_, B>,
    caches: &mut [&mut SeqCache<B>],
) -> Result<Tensor<B, 3>> {
    let active = st.active(i);
    let mut gates = None;
    let x = layer.input_layernorm.forward(h.clone());
    let experts = select(Block::Attention, &x, i, &active, &mut gates, st, caches);
    let h = h + layer.attn_output(packed_attention(layer, i, x, &experts, st, caches)?);
    let x = layer.mlp_input(h.clone());
    let experts = select(Block::Mlp, &x, i, &active, &mut gates, st, caches);
    let mut routing = Vec::new();
    Ok(h + layer.mlp_output(layer.mlp.forward(x, &experts, i, &mut routing)?))
}

/// Self-attention of the packed rows, each sequence over its own cache.
///
/// # Shapes
/// - x: `[1, T, hidden]` → `[1, T, hidden]`
fn packed_attention<B: Backend>(
    layer: &DecoderLayer<B>,
    i: usize,
    x: Tensor<B, 3>,
    experts: &Experts<B>,
    st: &Step<'_, B>,
    caches: &mut [&mut SeqCache<B>],
) -> Result<Tensor<B, 3>> {
    let a = &layer.self_attn;
    let (t, h, kv, hd) = (st.rows, a.num_heads, a.num_kv_heads, a.head_dim);
    let mut routing = Vec::new();
    let mut run = |p: &Slot<B>, proj: Proj, x: Tensor<B, 3>| {
        run_slot(p, x, experts, SlotId::layer(i, proj), &mut routing)
    };
    let (q, k, v) = a.qkv(x, &mut run)?;
    let (cos, sin) = st.rope.get(a.local_rope);
    let q = crate::rope::rotate(head_norm(&a.q_norm, q.reshape([1, t, h, hd])), cos, sin)
        .reshape([t, h, hd]);
    let k = crate::rope::rotate(head_norm(&a.k_norm, k.reshape([1, t, kv, hd])), cos, sin)
        .reshape([t, kv, hd]);
    let v = v.reshape([t, kv, hd]);
    let seqs: Vec<KvSeq<B>> = caches
        .iter_mut()
        .zip(st.seqs)
        .zip(&st.past)
        .map(|((c, s), &past)| {
            let buf = take_buffers(c, i, [kv, hd], &st.device);
            KvSeq {
                k: buf.k,
                v: buf.v,
                past,
                rows: s.tokens.len(),
            }
        })
        .collect();
    let (out, seqs) = legora_kernels::packed_attention(q, k, v, seqs, a.sliding_window, a.scaling)
        .map_err(|e| ModelError::InvalidState(format!("model.layers.{i}.self_attn: {e}")))?;
    for (c, s) in caches.iter_mut().zip(seqs) {
        c.layers[i] = Some(SeqKv { k: s.k, v: s.v });
    }
    run(&a.o_proj, Proj::OProj, out.reshape([1, t, h * hd]))
}

/// Layer `i`'s buffers of a cache at its (already raised) capacity: new zeros the first
/// time, grown with zeros when the capacity went up.
fn take_buffers<B: Backend>(
    c: &mut SeqCache<B>,
    i: usize,
    [kv, hd]: [usize; 2],
    device: &B::Device,
) -> SeqKv<B> {
    let cap = c.capacity;
    match c.layers[i].take() {
        None => SeqKv {
            k: Tensor::zeros([cap, kv, hd], device),
            v: Tensor::zeros([cap, kv, hd], device),
        },
        Some(buf) => {
            let have = buf.k.dims()[0];
            if have >= cap {
                return buf;
            }
            let grow = |t: Tensor<B, 3>| {
                Tensor::cat(vec![t, Tensor::zeros([cap - have, kv, hd], device)], 0)
            };
            SeqKv {
                k: grow(buf.k),
                v: grow(buf.v),
            }
        }
    }
}
