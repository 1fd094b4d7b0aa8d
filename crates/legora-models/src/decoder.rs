//! The decoder shared by every Llama-like family: embeddings, pre-norm layers with GQA
//! self-attention and a SwiGLU MLP, final RMSNorm, `lm_head`; a KV cache; masks.
//!
//! Module names mirror transformers' so burn records and errors read like HF paths:
//! `model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`, `model.norm`, `lm_head`.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use legora_kernels::{AttnMask, FrozenWeight, MASKED};
use legora_nn::{Experts, Proj, Router, RouterOutput, RouterPooling, SlotId};

use crate::config::{Activation, ModelConfig};
use crate::error::{ModelError, Result};
use crate::slot::Slot;
use crate::weights::{FrozenMaker, Init, WeightSource};

/// RMSNorm as transformers' `LlamaRMSNorm`: computed in f32, cast back, then scaled.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Scale `[hidden]` (frozen).
    pub weight: Param<Tensor<B, 1>>,
    /// ε.
    pub eps: f64,
    /// Added to the weight before it scales: 0, or 1 for Gemma
    /// (`output * (1.0 + self.weight.float())`).
    pub offset: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// `(weight + offset) · x / sqrt(mean(x²) + ε)`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let w = self.weight.val();
        let w = if self.offset == 0.0 {
            w
        } else {
            w + self.offset
        };
        legora_kernels::rms_norm(x, w, self.eps)
    }
}

/// Rotary tables of one forward: the model's, and the sliding-window layers' own where
/// they have one (Gemma 3), each `(cos, sin)` of `[batch, seq, 1, head_dim]`.
#[derive(Debug, Clone)]
pub(crate) struct RopeTables<B: Backend> {
    global: (Tensor<B, 4>, Tensor<B, 4>),
    local: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: Backend> RopeTables<B> {
    /// The tables of `config` at `positions` `[batch, seq]`.
    pub(crate) fn new(config: &ModelConfig, positions: Tensor<B, 2, Int>) -> Self {
        let local = config
            .local_rope
            .as_ref()
            .map(|r| r.cos_sin(positions.clone()));
        Self {
            global: config.rope.cos_sin(positions),
            local,
        }
    }

    /// `(cos, sin)` of a layer: its own when `local` and the model has local tables.
    pub(crate) fn get(&self, local: bool) -> (&Tensor<B, 4>, &Tensor<B, 4>) {
        match (&self.local, local) {
            (Some((c, s)), true) => (c, s),
            _ => (&self.global.0, &self.global.1),
        }
    }
}

/// Keys and values of one layer, after RoPE: `[batch, past, kv_heads, head_dim]`.
#[derive(Debug, Clone)]
struct LayerCache<B: Backend> {
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
}

/// Running sums of a `prefix_mean` router's input over the cached positions:
/// `sum [batch, hidden]` of the real tokens' inputs and their `count [batch, 1]`.
#[derive(Debug, Clone)]
struct PoolCache<B: Backend> {
    sum: Tensor<B, 2>,
    count: Tensor<B, 2>,
}

/// A KV cache for incremental decoding (one entry per layer).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerCache<B>>>,
    pooled: Vec<Option<PoolCache<B>>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            pooled: vec![None; num_layers],
            len: 0,
        }
    }

    /// Number of cached positions (columns of the attention mask already seen).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The positions layer `layer` holds keys and values for: all of them, or a
    /// sliding-window layer's last `window` (0 for a layer that does not exist).
    pub fn layer_len(&self, layer: usize) -> usize {
        match self.layers.get(layer) {
            Some(Some(c)) => c.k.dims()[1],
            _ => 0,
        }
    }
}

/// GQA self-attention with RoPE (transformers' `LlamaAttention`, eager path).
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    /// `[heads·head_dim, hidden]` (`None` when fused into `qkv_proj`).
    pub q_proj: Option<Slot<B>>,
    /// `[kv_heads·head_dim, hidden]` (`None` when fused into `qkv_proj`).
    pub k_proj: Option<Slot<B>>,
    /// `[kv_heads·head_dim, hidden]` (`None` when fused into `qkv_proj`).
    pub v_proj: Option<Slot<B>>,
    /// Phi-3: q, k and v in one linear, `[(heads + 2·kv_heads)·head_dim, hidden]`.
    pub qkv_proj: Option<Slot<B>>,
    /// `[hidden, heads·head_dim]`.
    pub o_proj: Slot<B>,
    /// RMSNorm over each query head before RoPE, weight `[head_dim]` (Qwen3).
    pub q_norm: Option<RmsNorm<B>>,
    /// RMSNorm over each key head before RoPE, weight `[head_dim]` (Qwen3).
    pub k_norm: Option<RmsNorm<B>>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Attention window of this layer, if any.
    pub sliding_window: Option<usize>,
    /// Scale of the attention scores (`head_dim ** -0.5`, Gemma:
    /// `query_pre_attn_scalar ** -0.5`).
    pub scaling: f64,
    /// Whether this layer uses the model's local rotary tables (Gemma 3's sliding layers).
    pub local_rope: bool,
}

/// SwiGLU MLP: `down_proj(silu(gate_proj(x)) · up_proj(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[intermediate, hidden]` (`None` when fused into `gate_up_proj`).
    pub gate_proj: Option<Slot<B>>,
    /// `[intermediate, hidden]` (`None` when fused into `gate_up_proj`).
    pub up_proj: Option<Slot<B>>,
    /// Phi-3: gate and up in one linear, `[2·intermediate, hidden]` (gate rows first).
    pub gate_up_proj: Option<Slot<B>>,
    /// `[hidden, intermediate]`.
    pub down_proj: Slot<B>,
    /// `act_fn` of `act_fn(gate) * up`.
    #[module(skip)]
    pub act: Activation,
}

/// One pre-norm decoder layer, with an optional mixture router (MixLoRA style: one
/// router per layer, shared by the layer's mixture slots).
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Attention block.
    pub self_attn: SelfAttention<B>,
    /// MLP block.
    pub mlp: Mlp<B>,
    /// Norm before attention; its output is also the router's input.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MLP, or (with `pre_feedforward_layernorm`: Gemma) on the attention
    /// output.
    pub post_attention_layernorm: RmsNorm<B>,
    /// Gemma: the norm before the MLP.
    pub pre_feedforward_layernorm: Option<RmsNorm<B>>,
    /// Gemma: the norm on the MLP output.
    pub post_feedforward_layernorm: Option<RmsNorm<B>>,
    /// The layer's router (gates every mixture slot of this layer).
    pub router: Option<Router<B>>,
}

/// transformers' `LlamaModel`: embeddings, layers, final norm.
#[derive(Module, Debug)]
pub struct DecoderModel<B: Backend> {
    /// `[vocab, hidden]` (frozen, in the load's storage: f32, bf16 or f16).
    pub embed_tokens: FrozenWeight<B>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
}

/// A causal LM (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`).
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    /// The decoder.
    pub model: DecoderModel<B>,
    /// Output head `[vocab, hidden]` (shares `embed_tokens` when tied).
    pub lm_head: Slot<B>,
    #[module(skip)]
    config: ModelConfig,
}

/// The inputs of one forward pass.
#[derive(Debug, Clone)]
pub struct LmInput<B: Backend> {
    /// Token ids `[batch, seq]`.
    pub input_ids: Tensor<B, 2, Int>,
    /// 1 = real token, 0 = padding, `[batch, past + seq]` (HF convention: it covers the
    /// cached positions too). `None`: every token is real.
    pub attention_mask: Option<Tensor<B, 2, Int>>,
    /// Positions `[batch, seq]`. `None`: derived from the mask as `generate` does
    /// (`cumsum(mask) - 1`, so left padding does not shift positions), or `past..past+seq`.
    pub position_ids: Option<Tensor<B, 2, Int>>,
    /// Which experts every mixture slot uses, over the `batch · seq` new tokens
    /// (overrides routers): per-token ids (task-routed), one expert, or fixed gates.
    /// `None`: mixtures are gated by their routers.
    pub experts: Option<Experts<B>>,
}

impl<B: Backend> LmInput<B> {
    /// Just token ids.
    pub fn new(input_ids: Tensor<B, 2, Int>) -> Self {
        Self {
            input_ids,
            attention_mask: None,
            position_ids: None,
            experts: None,
        }
    }

    /// Build from host rows of equal length.
    pub fn from_tokens(rows: &[Vec<u32>], device: &B::Device) -> Result<Self> {
        let s = rows.first().map(|r| r.len()).unwrap_or(0);
        if s == 0 || rows.iter().any(|r| r.len() != s) {
            return Err(ModelError::Input(
                "rows must be non-empty and of equal length (pad them and pass a mask)".into(),
            ));
        }
        let flat: Vec<i64> = rows.iter().flatten().map(|&t| t as i64).collect();
        Ok(Self::new(Tensor::from_data(
            TensorData::new(flat, [rows.len(), s]),
            device,
        )))
    }

    /// Set the attention mask `[batch, past + seq]`.
    pub fn with_attention_mask(mut self, mask: Tensor<B, 2, Int>) -> Self {
        self.attention_mask = Some(mask);
        self
    }

    /// Set explicit positions `[batch, seq]`.
    pub fn with_position_ids(mut self, pos: Tensor<B, 2, Int>) -> Self {
        self.position_ids = Some(pos);
        self
    }

    /// Route row `b` of the batch to expert `ids[b]` in every mixture slot (one
    /// [`Experts::Single`] when every row names the same expert).
    pub fn with_task_ids(self, ids: &[usize]) -> Self {
        let [batch, seq] = self.input_ids.dims();
        let experts = match ids.first() {
            Some(&e) if ids.len() == batch && ids.iter().all(|&t| t == e) => Experts::Single(e),
            _ => {
                let ids: Vec<Option<usize>> = ids.iter().map(|&t| Some(t)).collect();
                Experts::per_batch_row(&ids, seq)
            }
        };
        self.with_experts(experts)
    }

    /// Select the experts of every mixture slot explicitly.
    pub fn with_experts(mut self, experts: Experts<B>) -> Self {
        self.experts = Some(experts);
        self
    }
}

/// One router's output, with where it sits.
#[derive(Debug, Clone)]
pub struct Routing<B: Backend> {
    /// Decoder layer (`None` for `lm_head`).
    pub layer: Option<usize>,
    /// `None` for the layer's router, else the slot owning the router.
    pub slot: Option<SlotId>,
    /// Gates, probabilities and losses.
    pub output: RouterOutput<B>,
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct CausalLmOutput<B: Backend> {
    /// Next-token logits `[batch, seq, vocab]`.
    pub logits: Tensor<B, 3>,
    /// One entry per router that ran (empty without mixtures, or with task ids).
    pub routing: Vec<Routing<B>>,
}

impl<B: Backend> CausalLmOutput<B> {
    /// Σ aux-loss + z-loss over every router (already scaled by their coefficients),
    /// shape `[1]`; `None` when no router ran.
    pub fn aux_loss(&self) -> Option<Tensor<B, 1>> {
        aux_loss(&self.routing)
    }
}

/// What [`CausalLm::decoder`] returns: the layers' context, the last layer's output
/// `[batch, seq, hidden]` and the routers that ran.
pub(crate) type Decoded<B> = (Ctx<B>, Tensor<B, 3>, Vec<Routing<B>>);

/// Σ aux-loss + z-loss over the routers that ran, `[1]`; `None` when none ran.
pub(crate) fn aux_loss<B: Backend>(routing: &[Routing<B>]) -> Option<Tensor<B, 1>> {
    routing
        .iter()
        .map(|r| r.output.aux_loss.clone() + r.output.z_loss.clone())
        .reduce(|a, b| a + b)
}

/// Per-forward context shared by the layers.
pub(crate) struct Ctx<B: Backend> {
    rope: RopeTables<B>,
    /// The padding term of every key, `[batch, past + seq]`: 0 for a real token,
    /// `MASKED` for padding (`None`: every token is real). The causal and window parts
    /// of the mask are decided by the attention kernel per score.
    key_padding: Option<Tensor<B, 2>>,
    /// Real-token mask of the new positions, `[batch·seq]`.
    token_mask: Option<Tensor<B, 1>>,
    /// The input's expert selection (overrides routers).
    experts: Option<Experts<B>>,
}

impl<B: Backend> Ctx<B> {
    /// The mask of a layer with `window` whose keys are the last `keys` positions (all of
    /// them, or what a sliding-window cache holds).
    fn attn_mask(&self, window: Option<usize>, keys: usize) -> AttnMask<B> {
        let key_padding = self.key_padding.as_ref().map(|p| {
            let total = p.dims()[1];
            p.clone().narrow(1, total - keys, keys)
        });
        AttnMask::Causal {
            window,
            key_padding,
        }
    }

    /// The selection for slots whose layer has no router: the input's, else each
    /// slot's own router.
    fn slot_experts(&self) -> Experts<B> {
        self.experts.clone().unwrap_or_else(|| Experts::Router {
            mask: self.token_mask.clone(),
        })
    }
}

/// What a sliding-window layer keeps of its keys or values for later steps: the last
/// `window` positions (a query at position `p` sees keys `p - window < k ≤ p`, so every
/// later query needs at most the last `window - 1` of them), all of them without a
/// window. A long generation's cache of such a layer stays `window` rows long.
///
/// # Shapes
/// - x: `[batch, positions, kv_heads, head_dim]` → `[batch, min(positions, window), ...]`
fn window_tail<B: Backend>(x: Tensor<B, 4>, window: Option<usize>) -> Tensor<B, 4> {
    let n = x.dims()[1];
    match window {
        Some(w) if n > w => x.narrow(1, n - w, w),
        _ => x,
    }
}

/// `x` with an RMSNorm over each head, if there is one (Qwen3's `q_norm` / `k_norm`:
/// `self.q_norm(self.q_proj(hidden_states).view(hidden_shape))`).
///
/// # Shapes
/// - x: `[batch, seq, heads, head_dim]` → same
pub(crate) fn head_norm<B: Backend>(norm: &Option<RmsNorm<B>>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let Some(norm) = norm else {
        return x;
    };
    let [b, s, h, d] = x.dims();
    norm.forward(x.reshape([b, s * h, d])).reshape([b, s, h, d])
}

impl<B: Backend> SelfAttention<B> {
    /// The queries, keys and values of `x` through `run` (which applies a slot): three
    /// projections, or Phi-3's one `qkv_proj` split as transformers does
    /// (`query_states = qkv[..., :query_pos]`, then the keys, then the values).
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → (`[batch, seq, heads·head_dim]`,
    ///   `[batch, seq, kv_heads·head_dim]` twice)
    pub(crate) fn qkv(
        &self,
        x: Tensor<B, 3>,
        run: &mut impl FnMut(&Slot<B>, Proj, Tensor<B, 3>) -> Result<Tensor<B, 3>>,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>)> {
        let q_len = self.num_heads * self.head_dim;
        let kv_len = self.num_kv_heads * self.head_dim;
        match (&self.qkv_proj, &self.q_proj, &self.k_proj, &self.v_proj) {
            (Some(qkv), ..) => {
                let y = run(qkv, Proj::QkvProj, x)?;
                Ok((
                    y.clone().narrow(2, 0, q_len),
                    y.clone().narrow(2, q_len, kv_len),
                    y.narrow(2, q_len + kv_len, kv_len),
                ))
            }
            (None, Some(q), Some(k), Some(v)) => Ok((
                run(q, Proj::QProj, x.clone())?,
                run(k, Proj::KProj, x.clone())?,
                run(v, Proj::VProj, x)?,
            )),
            _ => Err(ModelError::InvalidState(
                "an attention block needs q_proj, k_proj and v_proj, or qkv_proj".into(),
            )),
        }
    }

    /// # Shapes
    /// - x: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &Ctx<B>,
        experts: &Experts<B>,
        cache: Option<&mut Option<LayerCache<B>>>,
        layer: usize,
        routing: &mut Vec<Routing<B>>,
    ) -> Result<Tensor<B, 3>> {
        let [b, s, _] = x.dims();
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut run = |p: &Slot<B>, proj: Proj, x: Tensor<B, 3>| {
            run_slot(p, x, experts, SlotId::layer(layer, proj), routing)
        };
        // query_states = self.q_proj(hidden_states).view(hidden_shape); the heads stay on
        // dim 2 (`[batch, seq, heads, head_dim]`): the attention kernel reads them in place,
        // so transformers' transpose(1, 2) and repeat_kv are never materialised.
        let (q, k, v) = self.qkv(x, &mut run)?;
        let (cos, sin) = ctx.rope.get(self.local_rope);
        let q = q.reshape([b, s, h, hd]);
        let q = crate::rope::rotate(head_norm(&self.q_norm, q), cos, sin);
        let k = k.reshape([b, s, kv, hd]);
        let k = crate::rope::rotate(head_norm(&self.k_norm, k), cos, sin);
        let v = v.reshape([b, s, kv, hd]);
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some(c) => (Tensor::cat(vec![c.k, k], 1), Tensor::cat(vec![c.v, v], 1)),
                    None => (k, v),
                };
                *slot = Some(LayerCache {
                    k: window_tail(k.clone(), self.sliding_window),
                    v: window_tail(v.clone(), self.sliding_window),
                });
                (k, v)
            }
            None => (k, v),
        };
        // softmax(q·kᵀ·scaling + mask, dim=-1, dtype=torch.float32) · v, over the keys
        // this layer holds: all positions, or the last ones of a sliding-window cache
        let mask = ctx.attn_mask(self.sliding_window, k.dims()[1]);
        let out = legora_kernels::attention(q, k, v, mask, self.scaling);
        let out = out.reshape([b, s, h * hd]);
        run(&self.o_proj, Proj::OProj, out)
    }
}

impl<B: Backend> Mlp<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        experts: &Experts<B>,
        layer: usize,
        routing: &mut Vec<Routing<B>>,
    ) -> Result<Tensor<B, 3>> {
        let mut run = |p: &Slot<B>, proj: Proj, x: Tensor<B, 3>| {
            run_slot(p, x, experts, SlotId::layer(layer, proj), routing)
        };
        // down_proj(act_fn(gate_proj(x)) * up_proj(x))
        let (g, u) = match (&self.gate_up_proj, &self.gate_proj, &self.up_proj) {
            // Phi-3: gate, up_states = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
            (Some(gate_up), ..) => {
                let y = run(gate_up, Proj::GateUpProj, x)?;
                let i = y.dims()[2] / 2;
                (y.clone().narrow(2, 0, i), y.narrow(2, i, i))
            }
            (None, Some(gate), Some(up)) => (
                run(gate, Proj::GateProj, x.clone())?,
                run(up, Proj::UpProj, x)?,
            ),
            _ => {
                return Err(ModelError::InvalidState(
                    "an MLP needs gate_proj and up_proj, or gate_up_proj".into(),
                ))
            }
        };
        let inner = match self.act {
            Activation::Silu => legora_kernels::swiglu(g, u),
            Activation::GeluTanh => gelu_tanh(g) * u,
        };
        run(&self.down_proj, Proj::DownProj, inner)
    }
}

/// transformers' `gelu_pytorch_tanh`:
/// `0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))`.
///
/// # Shapes
/// - x: any → same
pub(crate) fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let cube = x.clone() * x.clone() * x.clone();
    let inner = (x.clone() + cube * 0.044715) * (2.0 / std::f64::consts::PI).sqrt();
    x * (inner.tanh() + 1.0) * 0.5
}

/// Causal mean of the real tokens' router inputs: position `t` gets the mean of the
/// rows `≤ t` whose mask is 1 (0 before the first real token), continuing the running
/// sums of `pool` when decoding with a cache, and extending them.
///
/// # Shapes
/// - x: `[batch, seq, hidden]`, mask: `[batch · seq]` → `[batch, seq, hidden]`
fn prefix_mean<B: Backend>(
    x: Tensor<B, 3>,
    mask: Option<Tensor<B, 1>>,
    pool: Option<&mut Option<PoolCache<B>>>,
) -> Tensor<B, 3> {
    let [b, s, d] = x.dims();
    let m = mask.unwrap_or_else(|| Tensor::ones([b * s], &x.device()));
    let m = m.reshape([b, s, 1]);
    let mut sum = (x * m.clone()).cumsum(1);
    let mut count = m.cumsum(1);
    if let Some(pool) = pool {
        if let Some(prev) = pool.take() {
            sum = sum + prev.sum.unsqueeze_dim::<3>(1);
            count = count + prev.count.unsqueeze_dim::<3>(1);
        }
        *pool = Some(PoolCache {
            sum: sum.clone().narrow(1, s - 1, 1).reshape([b, d]),
            count: count.clone().narrow(1, s - 1, 1).reshape([b, 1]),
        });
    }
    sum / count.clamp_min(1.0)
}

/// The RMSNorm whose weight is `name`.
fn norm<B: Backend>(
    c: &ModelConfig,
    name: &str,
    init: &mut Init<'_>,
    device: &B::Device,
) -> Result<RmsNorm<B>> {
    norm_of(c, name, c.hidden_size, init, device)
}

/// A frozen RMSNorm of width `dim` read as `name`.
fn norm_of<B: Backend>(
    c: &ModelConfig,
    name: &str,
    dim: usize,
    init: &mut Init<'_>,
    device: &B::Device,
) -> Result<RmsNorm<B>> {
    Ok(RmsNorm {
        weight: Param::from_tensor(init.load::<B, 1>(name, [dim], device)?).set_require_grad(false),
        eps: c.rms_norm_eps,
        offset: c.norm_weight_offset,
    })
}

/// The per-head query or key norm `name` (`[head_dim]`) where the family has one.
fn head_norm_of<B: Backend>(
    c: &ModelConfig,
    name: &str,
    init: &mut Init<'_>,
    device: &B::Device,
) -> Result<Option<RmsNorm<B>>> {
    c.qk_norm
        .then(|| norm_of(c, name, c.head_dim, init, device))
        .transpose()
}

/// Apply one slot, recording the output of a router the slot owns.
///
/// # Shapes
/// - x: `[batch, seq, in]` → `[batch, seq, out]`
pub(crate) fn run_slot<B: Backend>(
    slot: &Slot<B>,
    x: Tensor<B, 3>,
    experts: &Experts<B>,
    id: SlotId,
    routing: &mut Vec<Routing<B>>,
) -> Result<Tensor<B, 3>> {
    let (y, r) = slot.forward(x, experts, id)?;
    if let Some(output) = r {
        routing.push(Routing {
            layer: id.layer_index(),
            slot: Some(id),
            output,
        });
    }
    Ok(y)
}

impl<B: Backend> DecoderLayer<B> {
    /// Whether any projection holds a mixture.
    pub(crate) fn has_mixture(&self) -> bool {
        self.projs().into_iter().any(|(_, s)| s.is_mixture())
    }

    /// Whether any attention projection holds a mixture.
    pub(crate) fn attn_has_mixture(&self) -> bool {
        self.projs()
            .into_iter()
            .any(|(p, s)| p.is_attention() && s.is_mixture())
    }

    /// The experts of this layer's mixture slots for the normalized input `x` of the
    /// first block that holds a mixture: the input's selection when it has one, else the
    /// layer router's gates, else each slot's own router.
    fn route(
        &self,
        x: &Tensor<B, 3>,
        ctx: &Ctx<B>,
        layer: usize,
        pool: Option<&mut Option<PoolCache<B>>>,
        routing: &mut Vec<Routing<B>>,
    ) -> Experts<B> {
        let [b, s, d] = x.dims();
        let router = match (&ctx.experts, &self.router) {
            (None, Some(r)) if self.has_mixture() => r,
            _ => return ctx.slot_experts(),
        };
        let input = match router.pooling() {
            RouterPooling::Token => x.clone(),
            RouterPooling::PrefixMean => prefix_mean(x.clone(), ctx.token_mask.clone(), pool),
        };
        let out = router.forward(input.reshape([b * s, d]), ctx.token_mask.clone());
        let g = out.gates.clone();
        routing.push(Routing {
            layer: Some(layer),
            slot: None,
            output: out,
        });
        Experts::Gates(g)
    }

    /// The router reads the normalized input of the first block holding a mixture: the
    /// attention input when attention projections are experts, otherwise the MLP input
    /// (MixLoRA: the FFN input `post_attention_layernorm(h + attn)`, which already
    /// carries the context through attention, also in the first layer).
    ///
    /// # Shapes
    /// - h: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    fn forward(
        &self,
        h: Tensor<B, 3>,
        ctx: &Ctx<B>,
        cache: Option<&mut Option<LayerCache<B>>>,
        pool: Option<&mut Option<PoolCache<B>>>,
        layer: usize,
        routing: &mut Vec<Routing<B>>,
    ) -> Result<Tensor<B, 3>> {
        let mut pool = pool;
        let x = self.input_layernorm.forward(h.clone());
        let attn_first = self.attn_has_mixture();
        let mut experts = ctx.slot_experts();
        if attn_first {
            experts = self.route(&x, ctx, layer, pool.take(), routing);
        }
        let attn = self
            .self_attn
            .forward(x, ctx, &experts, cache, layer, routing)?;
        let h = h + self.attn_output(attn);
        let x = self.mlp_input(h.clone());
        if !attn_first {
            experts = self.route(&x, ctx, layer, pool, routing);
        }
        let y = self.mlp.forward(x, &experts, layer, routing)?;
        Ok(h + self.mlp_output(y))
    }

    /// The attention output as it joins the residual: as it is, or (Gemma)
    /// `post_attention_layernorm(attn)`.
    ///
    /// # Shapes
    /// - y: `[batch, seq, hidden]` → same
    pub(crate) fn attn_output(&self, y: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.pre_feedforward_layernorm {
            Some(_) => self.post_attention_layernorm.forward(y),
            None => y,
        }
    }

    /// The MLP's input from the residual `h`: `post_attention_layernorm(h)`, or (Gemma)
    /// `pre_feedforward_layernorm(h)`.
    ///
    /// # Shapes
    /// - h: `[batch, seq, hidden]` → same
    pub(crate) fn mlp_input(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.pre_feedforward_layernorm {
            Some(norm) => norm.forward(h),
            None => self.post_attention_layernorm.forward(h),
        }
    }

    /// The MLP output as it joins the residual: as it is, or (Gemma)
    /// `post_feedforward_layernorm(mlp)`.
    ///
    /// # Shapes
    /// - y: `[batch, seq, hidden]` → same
    pub(crate) fn mlp_output(&self, y: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.post_feedforward_layernorm {
            Some(norm) => norm.forward(y),
            None => y,
        }
    }

    /// [`DecoderLayer::forward`] without a cache (training).
    ///
    /// # Shapes
    /// - h: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    pub(crate) fn forward_uncached(
        &self,
        h: Tensor<B, 3>,
        ctx: &Ctx<B>,
        layer: usize,
        routing: &mut Vec<Routing<B>>,
    ) -> Result<Tensor<B, 3>> {
        self.forward(h, ctx, None, None, layer, routing)
    }
}

impl<B: Backend> CausalLm<B> {
    /// Build from checkpoint tensors (HF names; shapes checked against `config`).
    pub fn from_weights(
        config: ModelConfig,
        src: &mut dyn WeightSource,
        device: &B::Device,
    ) -> Result<Self> {
        Self::build(config, Init::Source(src), device)
    }

    /// Random weights: normal(0, `std`) projections and embeddings, unit norms.
    pub fn random(config: ModelConfig, std: f64, device: &B::Device) -> Result<Self> {
        Self::build(config, Init::Random(std), device)
    }

    /// Random weights as [`CausalLm::random`], except that every frozen weight (the
    /// decoder projections, the embeddings and an untied `lm_head`;
    /// [`ModelConfig::frozen_weights`] lists them) comes from `make(name, [out, in])` in
    /// the storage it returns: e.g. generated and quantized a block of rows at a time
    /// ([`legora_kernels::quant::QuantMatrix::quantize_by_rows`]), so that no f32 copy
    /// of the model ever exists. A weight of the wrong shape is refused naming it.
    pub fn random_frozen(
        config: ModelConfig,
        std: f64,
        make: &mut FrozenMaker<'_>,
        device: &B::Device,
    ) -> Result<Self> {
        Self::build(config, Init::RandomFrozen(std, make), device)
    }

    fn build(config: ModelConfig, mut init: Init<'_>, device: &B::Device) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            layers.push(Self::build_layer(c, i, &mut init, device)?);
        }
        let final_norm = norm(c, "model.norm.weight", &mut init, device)?;
        let embed = init.load_frozen(
            "model.embed_tokens.weight",
            [c.vocab_size, c.hidden_size],
            device,
        )?;
        let lm_head = if c.tie_word_embeddings {
            Slot::frozen(embed.clone(), None)
        } else {
            let shape = [c.vocab_size, c.hidden_size];
            Slot::frozen(init.load_frozen("lm_head.weight", shape, device)?, None)
        };
        Ok(Self {
            model: DecoderModel {
                embed_tokens: embed,
                layers,
                norm: final_norm,
            },
            lm_head,
            config,
        })
    }

    /// Decoder layer `i`: its projections (seven, or Phi-3's four) and its norms.
    fn build_layer(
        c: &ModelConfig,
        i: usize,
        init: &mut Init<'_>,
        device: &B::Device,
    ) -> Result<DecoderLayer<B>> {
        let attn = format!("model.layers.{i}.self_attn");
        let q_norm = head_norm_of(c, &format!("{attn}.q_norm.weight"), init, device)?;
        let k_norm = head_norm_of(c, &format!("{attn}.k_norm.weight"), init, device)?;
        let mut proj = |proj: Proj| -> Result<Slot<B>> {
            let name = SlotId::layer(i, proj);
            let (out, inp) = c.proj_dims(proj);
            let w = init.load_frozen(&format!("{name}.weight"), [out, inp], device)?;
            let b = if c.proj_bias(proj) {
                Some(init.load::<B, 1>(&format!("{name}.bias"), [out], device)?)
            } else {
                None
            };
            Ok(Slot::frozen(w, b))
        };
        let has = |p: Proj| c.projections().contains(&p);
        let self_attn = SelfAttention {
            q_proj: has(Proj::QProj).then(|| proj(Proj::QProj)).transpose()?,
            k_proj: has(Proj::KProj).then(|| proj(Proj::KProj)).transpose()?,
            v_proj: has(Proj::VProj).then(|| proj(Proj::VProj)).transpose()?,
            qkv_proj: has(Proj::QkvProj)
                .then(|| proj(Proj::QkvProj))
                .transpose()?,
            o_proj: proj(Proj::OProj)?,
            q_norm,
            k_norm,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            sliding_window: c.sliding_windows[i],
            scaling: c.attn_scale,
            local_rope: c.sliding_windows[i].is_some() && c.local_rope.is_some(),
        };
        let mlp = Mlp {
            gate_proj: has(Proj::GateProj)
                .then(|| proj(Proj::GateProj))
                .transpose()?,
            up_proj: has(Proj::UpProj).then(|| proj(Proj::UpProj)).transpose()?,
            gate_up_proj: has(Proj::GateUpProj)
                .then(|| proj(Proj::GateUpProj))
                .transpose()?,
            down_proj: proj(Proj::DownProj)?,
            act: c.hidden_act,
        };
        let p = format!("model.layers.{i}");
        let mut layer_norm = |name: &str| norm(c, &format!("{p}.{name}.weight"), init, device);
        let input_layernorm = layer_norm("input_layernorm")?;
        let post_attention_layernorm = layer_norm("post_attention_layernorm")?;
        let (pre_feedforward_layernorm, post_feedforward_layernorm) = if c.sandwich_norms {
            (
                Some(layer_norm("pre_feedforward_layernorm")?),
                Some(layer_norm("post_feedforward_layernorm")?),
            )
        } else {
            (None, None)
        };
        Ok(DecoderLayer {
            self_attn,
            mlp,
            input_layernorm,
            post_attention_layernorm,
            pre_feedforward_layernorm,
            post_feedforward_layernorm,
            router: None,
        })
    }

    /// Trainable and total parameters, as PEFT's `print_trainable_parameters` counts
    /// them: a tied `lm_head` shares `embed_tokens` and counts once (its adapters, if
    /// any, count), and a quantized weight counts its `out × in` elements, not its codes
    /// and scales (as transformers counts a bitsandbytes model).
    pub fn parameter_report(&self) -> legora_nn::ParamReport {
        let mut report = legora_nn::trainable_parameters(self);
        for (_, slot) in self.slots() {
            let w = slot.frozen_weight();
            if let FrozenWeight::Quantized(_) = w {
                let [o, i] = w.dims();
                let stored = legora_nn::trainable_parameters(w).total;
                report.total = report.total.saturating_sub(stored) + o * i;
            }
        }
        let embed = &self.model.embed_tokens;
        if let FrozenWeight::Quantized(_) = embed {
            let [o, i] = embed.dims();
            let stored = legora_nn::trainable_parameters(embed).total;
            report.total = report.total.saturating_sub(stored) + o * i;
        }
        if self.config.tie_word_embeddings {
            let c = &self.config;
            report.total = report.total.saturating_sub(c.vocab_size * c.hidden_size);
        }
        report
    }

    /// The experts of the model's mixture slots (`None` when it has none).
    pub fn num_experts(&self) -> Option<usize> {
        self.slots().into_iter().find_map(|(_, slot)| match slot {
            Slot::Moe(m) if m.num_experts() > 0 => Some(m.num_experts()),
            _ => None,
        })
    }

    /// Check an input's expert selection against the batch and the mixture: one id per
    /// new token, every id an expert of the mixture (task ids name experts).
    fn check_experts(&self, experts: Option<&Experts<B>>, b: usize, s: usize) -> Result<()> {
        let e = self.num_experts().unwrap_or(0);
        let bad = |token: usize, id: usize| {
            ModelError::Input(format!(
                "task id of row {}: expected an expert index < {e} (the mixture's expert \
                 count), found {id}",
                token / s
            ))
        };
        match experts {
            Some(Experts::PerRow(ids)) => {
                if ids.len() != b * s {
                    return Err(ModelError::Input(format!(
                        "{} expert ids for {b}×{s} tokens (one per new token)",
                        ids.len()
                    )));
                }
                match ids
                    .iter()
                    .enumerate()
                    .find(|(_, id)| id.is_some_and(|i| i >= e))
                {
                    Some((t, id)) => Err(bad(t, id.unwrap_or(0))),
                    None => Ok(()),
                }
            }
            Some(Experts::Single(id)) if *id >= e => Err(bad(0, *id)),
            _ => Ok(()),
        }
    }

    /// The runtime config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub(crate) fn config_mut(&mut self) -> &mut ModelConfig {
        &mut self.config
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.model.layers.len())
    }

    /// Forward pass without a cache.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`, attention_mask: `[batch, seq]`, position_ids:
    ///   `[batch, seq]`, experts over `batch · seq` tokens → logits `[batch, seq, vocab]`, one
    ///   [`Routing`] per router that ran
    pub fn forward(&self, input: LmInput<B>) -> Result<CausalLmOutput<B>> {
        self.forward_impl(input, None)
    }

    /// Forward pass that reads and extends `cache` (prefill, then one token at a time).
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`, attention_mask: `[batch, cache.len() + seq]`,
    ///   position_ids: `[batch, seq]`, experts over `batch · seq` tokens → logits
    ///   `[batch, seq, vocab]`
    pub fn forward_cached(
        &self,
        input: LmInput<B>,
        cache: &mut KvCache<B>,
    ) -> Result<CausalLmOutput<B>> {
        if cache.layers.len() != self.model.layers.len() {
            return Err(ModelError::Input(format!(
                "the cache has {} layers, the model {}",
                cache.layers.len(),
                self.model.layers.len()
            )));
        }
        self.forward_impl(input, Some(cache))
    }

    fn forward_impl(
        &self,
        input: LmInput<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<CausalLmOutput<B>> {
        let (ctx, h, mut routing) = self.decoder(input, cache)?;
        let logits = self.head(h, &ctx, &mut routing)?;
        Ok(CausalLmOutput { logits, routing })
    }

    /// The embeddings and every decoder layer (reading and extending `cache`, if any):
    /// the layers' context, the last layer's output and the routers that ran.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` → `[batch, seq, hidden]`
    pub(crate) fn decoder(
        &self,
        input: LmInput<B>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Result<Decoded<B>> {
        let past = cache.as_ref().map(|c| c.len).unwrap_or(0);
        let (ctx, mut h) = self.prepare(input, past)?;
        let [_, s, _] = h.dims();
        let mut routing = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            let (slot, pool) = match cache.as_deref_mut() {
                Some(c) => (Some(&mut c.layers[i]), Some(&mut c.pooled[i])),
                None => (None, None),
            };
            h = layer.forward(h, &ctx, slot, pool, i, &mut routing)?;
        }
        if let Some(c) = cache {
            c.len = past + s;
        }
        Ok((ctx, h, routing))
    }

    /// Shapes of the ids, mask, positions and expert selection against the cache length
    /// `past`.
    fn check_input(&self, input: &LmInput<B>, past: usize) -> Result<()> {
        let [b, s] = input.input_ids.dims();
        if b == 0 || s == 0 {
            return Err(ModelError::Input(format!(
                "empty input_ids of shape [{b}, {s}]"
            )));
        }
        let total = past + s;
        if let Some(m) = &input.attention_mask {
            if m.dims() != [b, total] {
                return Err(ModelError::Input(format!(
                    "attention_mask has shape {:?}, expected [{b}, {total}] (batch, cached + new positions)",
                    m.dims()
                )));
            }
        }
        if let Some(p) = &input.position_ids {
            if p.dims() != [b, s] {
                return Err(ModelError::Input(format!(
                    "position_ids has shape {:?}, expected [{b}, {s}]",
                    p.dims()
                )));
            }
        }
        self.check_experts(input.experts.as_ref(), b, s)?;
        Ok(())
    }

    /// Checks the input against the cache length `past`, builds the layers' shared
    /// context (rotary tables, masks, expert selection) and embeds the tokens.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` → the embeddings `[batch, seq, hidden]`
    pub(crate) fn prepare(&self, input: LmInput<B>, past: usize) -> Result<(Ctx<B>, Tensor<B, 3>)> {
        self.check_input(&input, past)?;
        let [b, s] = input.input_ids.dims();
        let device = input.input_ids.device();
        let total = past + s;
        let positions = match (input.position_ids, &input.attention_mask) {
            (Some(p), _) => p,
            // position_ids = attention_mask.long().cumsum(-1) - 1; masked_fill_(mask == 0, 1)
            (None, Some(m)) => {
                let pos = m.clone().cumsum(1) - 1;
                let pos = pos.mask_fill(m.clone().equal_elem(0), 1);
                pos.narrow(1, past, s)
            }
            (None, None) => Tensor::<B, 1, Int>::arange(past as i64..total as i64, &device)
                .reshape([1, s])
                .repeat_dim(0, b),
        };
        let rope = RopeTables::new(&self.config, positions);
        // (mask - 1) · 1e9: 0 for real tokens, MASKED for padding
        let key_padding = input
            .attention_mask
            .as_ref()
            .map(|m| (m.clone().float() - 1.0) * (-MASKED as f64));
        let token_mask = input
            .attention_mask
            .as_ref()
            .map(|m| m.clone().narrow(1, past, s).float().reshape([b * s]));
        let ctx = Ctx {
            rope,
            key_padding,
            token_mask,
            experts: input.experts,
        };

        let h = self.embed(input.input_ids.reshape([b * s]));
        Ok((ctx, h.reshape([b, s, self.config.hidden_size])))
    }

    /// The embeddings of `ids`, scaled where the family scales them (Gemma:
    /// `embed_tokens(ids) * hidden_size ** 0.5`).
    ///
    /// # Shapes
    /// - ids: `[n]` → `[n, hidden]`
    pub(crate) fn embed(&self, ids: Tensor<B, 1, Int>) -> Tensor<B, 2> {
        let h = self.model.embed_tokens.rows(ids);
        match self.config.embed_scale {
            Some(scale) => h * scale,
            None => h,
        }
    }

    /// The final norm and `lm_head`.
    ///
    /// # Shapes
    /// - h: `[batch, seq, hidden]` → logits `[batch, seq, vocab]`
    pub(crate) fn head(
        &self,
        h: Tensor<B, 3>,
        ctx: &Ctx<B>,
        routing: &mut Vec<Routing<B>>,
    ) -> Result<Tensor<B, 3>> {
        let h = self.model.norm.forward(h);
        run_slot(
            &self.lm_head,
            h,
            &ctx.slot_experts(),
            SlotId::LmHead,
            routing,
        )
    }
}
