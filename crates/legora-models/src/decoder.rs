//! The decoder shared by every Llama-like family: embeddings, pre-norm layers with GQA
//! self-attention and a SwiGLU MLP, final RMSNorm, `lm_head`; a KV cache; masks.
//!
//! Module names mirror transformers' so burn records and errors read like HF paths:
//! `model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`, `model.norm`, `lm_head`.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use legora_kernels::FrozenWeight;
use legora_nn::{Experts, Proj, Router, RouterOutput, RouterPooling, SlotId};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::slot::Slot;
use crate::weights::{FrozenMaker, Init, WeightSource};

/// Additive mask value for disallowed keys: finite, so fully masked rows (left padding)
/// give a uniform softmax instead of NaN.
const MASKED: f32 = -1e9;

/// RMSNorm as transformers' `LlamaRMSNorm`: computed in f32, cast back, then scaled.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Scale `[hidden]` (frozen).
    pub weight: Param<Tensor<B, 1>>,
    /// ε.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// `weight · x / sqrt(mean(x²) + ε)`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        legora_kernels::rms_norm(x, self.weight.val(), self.eps)
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
}

/// GQA self-attention with RoPE (transformers' `LlamaAttention`, eager path).
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    /// `[heads·head_dim, hidden]`.
    pub q_proj: Slot<B>,
    /// `[kv_heads·head_dim, hidden]`.
    pub k_proj: Slot<B>,
    /// `[kv_heads·head_dim, hidden]`.
    pub v_proj: Slot<B>,
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
}

/// SwiGLU MLP: `down_proj(silu(gate_proj(x)) · up_proj(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[intermediate, hidden]`.
    pub gate_proj: Slot<B>,
    /// `[intermediate, hidden]`.
    pub up_proj: Slot<B>,
    /// `[hidden, intermediate]`.
    pub down_proj: Slot<B>,
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
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
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
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    /// Additive masks `[batch, 1, seq, total]` per distinct window.
    masks: Vec<(Option<usize>, Tensor<B, 4>)>,
    /// Real-token mask of the new positions, `[batch·seq]`.
    token_mask: Option<Tensor<B, 1>>,
    /// The input's expert selection (overrides routers).
    experts: Option<Experts<B>>,
}

impl<B: Backend> Ctx<B> {
    fn mask(&self, window: Option<usize>) -> &Tensor<B, 4> {
        &self
            .masks
            .iter()
            .find(|(w, _)| *w == window)
            .expect("a mask is built for every window")
            .1
    }

    /// The selection for slots whose layer has no router: the input's, else each
    /// slot's own router.
    fn slot_experts(&self) -> Experts<B> {
        self.experts.clone().unwrap_or_else(|| Experts::Router {
            mask: self.token_mask.clone(),
        })
    }
}

/// The causal (+ window) part of the mask, built on the host.
///
/// # Shapes
/// → `[1, 1, seq, past + seq]`
fn causal_mask<B: Backend>(
    past: usize,
    seq: usize,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let total = past + seq;
    let mut m = vec![0f32; seq * total];
    for q in 0..seq {
        let qa = past + q;
        for k in 0..total {
            // causal: kv_idx <= q_idx; sliding_window_overlay: kv_idx > q_idx - sliding_window
            let allowed = k <= qa && window.is_none_or(|w| qa < k + w);
            if !allowed {
                m[q * total + k] = MASKED;
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [1, 1, seq, total]), device)
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
        let q = run(&self.q_proj, Proj::QProj, x.clone())?.reshape([b, s, h, hd]);
        let q = legora_kernels::rotary(head_norm(&self.q_norm, q), &ctx.cos, &ctx.sin);
        let k = run(&self.k_proj, Proj::KProj, x.clone())?.reshape([b, s, kv, hd]);
        let k = legora_kernels::rotary(head_norm(&self.k_norm, k), &ctx.cos, &ctx.sin);
        let v = run(&self.v_proj, Proj::VProj, x)?.reshape([b, s, kv, hd]);
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some(c) => (Tensor::cat(vec![c.k, k], 1), Tensor::cat(vec![c.v, v], 1)),
                    None => (k, v),
                };
                *slot = Some(LayerCache {
                    k: k.clone(),
                    v: v.clone(),
                });
                (k, v)
            }
            None => (k, v),
        };
        // softmax(q·kᵀ·head_dim^-0.5 + mask, dim=-1, dtype=torch.float32) · v
        let mask = ctx.mask(self.sliding_window).clone();
        let out = legora_kernels::attention(q, k, v, mask, (hd as f64).powf(-0.5));
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
        let g = run(&self.gate_proj, Proj::GateProj, x.clone())?;
        let u = run(&self.up_proj, Proj::UpProj, x)?;
        run(
            &self.down_proj,
            Proj::DownProj,
            legora_kernels::swiglu(g, u),
        )
    }
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
        Proj::ALL.into_iter().any(|p| self.proj(p).is_mixture())
    }

    /// Whether any attention projection holds a mixture.
    pub(crate) fn attn_has_mixture(&self) -> bool {
        Proj::ALL
            .into_iter()
            .any(|p| p.is_attention() && self.proj(p).is_mixture())
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
        let h = h + self
            .self_attn
            .forward(x, ctx, &experts, cache, layer, routing)?;
        let x = self.post_attention_layernorm.forward(h.clone());
        if !attn_first {
            experts = self.route(&x, ctx, layer, pool, routing);
        }
        Ok(h + self.mlp.forward(x, &experts, layer, routing)?)
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

    /// Decoder layer `i`: its seven projections and its norms.
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
        let self_attn = SelfAttention {
            q_proj: proj(Proj::QProj)?,
            k_proj: proj(Proj::KProj)?,
            v_proj: proj(Proj::VProj)?,
            o_proj: proj(Proj::OProj)?,
            q_norm,
            k_norm,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            sliding_window: c.sliding_windows[i],
        };
        let mlp = Mlp {
            gate_proj: proj(Proj::GateProj)?,
            up_proj: proj(Proj::UpProj)?,
            down_proj: proj(Proj::DownProj)?,
        };
        let p = format!("model.layers.{i}");
        Ok(DecoderLayer {
            self_attn,
            mlp,
            input_layernorm: norm(c, &format!("{p}.input_layernorm.weight"), init, device)?,
            post_attention_layernorm: norm(
                c,
                &format!("{p}.post_attention_layernorm.weight"),
                init,
                device,
            )?,
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
        let (cos, sin) = self.config.rope.cos_sin(positions);
        let pad = input
            .attention_mask
            .as_ref()
            .map(|m| (m.clone().float() - 1.0).reshape([b, 1, 1, total]) * (-MASKED as f64));
        let mut windows: Vec<Option<usize>> = Vec::new();
        for l in &self.model.layers {
            if !windows.contains(&l.self_attn.sliding_window) {
                windows.push(l.self_attn.sliding_window);
            }
        }
        // One mask per row, shared by the heads: `[batch, 1, seq, total]`.
        let masks = windows
            .into_iter()
            .map(|w| {
                let c = causal_mask::<B>(past, s, w, &device);
                let m = match &pad {
                    Some(p) => c + p.clone(),
                    None => c.repeat_dim(0, b),
                };
                (w, m)
            })
            .collect();
        let token_mask = input
            .attention_mask
            .as_ref()
            .map(|m| m.clone().narrow(1, past, s).float().reshape([b * s]));
        let ctx = Ctx {
            cos,
            sin,
            masks,
            token_mask,
            experts: input.experts,
        };

        let ids = input.input_ids.reshape([b * s]);
        let h = self
            .model
            .embed_tokens
            .rows(ids)
            .reshape([b, s, self.config.hidden_size]);
        Ok((ctx, h))
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
