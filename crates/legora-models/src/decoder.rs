//! The decoder shared by every Llama-like family: embeddings, pre-norm layers with GQA
//! self-attention and a SwiGLU MLP, final RMSNorm, `lm_head`; a KV cache; masks.
//!
//! Module names mirror transformers' so burn records and errors read like HF paths:
//! `model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`, `model.norm`, `lm_head`.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use legora_nn::{task_gates, Router, RouterOutput, RouterPooling};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::slot::{GateCtx, Proj};
use crate::weights::{Init, WeightSource};

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
    pub q_proj: Proj<B>,
    /// `[kv_heads·head_dim, hidden]`.
    pub k_proj: Proj<B>,
    /// `[kv_heads·head_dim, hidden]`.
    pub v_proj: Proj<B>,
    /// `[hidden, heads·head_dim]`.
    pub o_proj: Proj<B>,
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
    pub gate_proj: Proj<B>,
    /// `[intermediate, hidden]`.
    pub up_proj: Proj<B>,
    /// `[hidden, intermediate]`.
    pub down_proj: Proj<B>,
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
    /// `[vocab, hidden]` (frozen).
    pub embed_tokens: Param<Tensor<B, 2>>,
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
    pub lm_head: Proj<B>,
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
    /// Task-routed mixtures: row `b` uses expert `task_ids[b]` in every mixture slot
    /// (overrides routers). `None`: mixtures are gated by their routers.
    pub task_ids: Option<Vec<usize>>,
}

impl<B: Backend> LmInput<B> {
    /// Just token ids.
    pub fn new(input_ids: Tensor<B, 2, Int>) -> Self {
        Self {
            input_ids,
            attention_mask: None,
            position_ids: None,
            task_ids: None,
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

    /// Route row `b` to expert `ids[b]` in every mixture slot.
    pub fn with_task_ids(mut self, ids: Vec<usize>) -> Self {
        self.task_ids = Some(ids);
        self
    }
}

/// One router's output, with where it sits.
#[derive(Debug, Clone)]
pub struct Routing<B: Backend> {
    /// Decoder layer (`None` for `lm_head`).
    pub layer: Option<usize>,
    /// `None` for the layer's router, else the slot path relative to the layer
    /// (`mlp.up_proj`) or `lm_head` for a router owned by that slot.
    pub module: Option<String>,
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
        self.routing
            .iter()
            .map(|r| r.output.aux_loss.clone() + r.output.z_loss.clone())
            .reduce(|a, b| a + b)
    }
}

/// Per-forward context shared by the layers.
struct Ctx<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    /// Additive masks `[batch, 1, seq, total]` per distinct window.
    masks: Vec<(Option<usize>, Tensor<B, 4>)>,
    /// Real-token mask of the new positions, `[batch·seq]`.
    token_mask: Option<Tensor<B, 1>>,
    task_ids: Option<Vec<usize>>,
    /// The task of every new token (`task_ids` repeated over the sequence), `[batch·seq]`.
    row_experts: Option<std::sync::Arc<[usize]>>,
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

    /// The task of every row, when routed by task and all rows share one.
    fn single_task(&self) -> Option<usize> {
        let ids = self.task_ids.as_ref()?;
        let first = *ids.first()?;
        ids.iter().all(|t| *t == first).then_some(first)
    }

    fn gates(
        &self,
        seq: usize,
        num_experts: usize,
        device: &B::Device,
    ) -> Result<Option<Tensor<B, 2>>> {
        match &self.task_ids {
            None => Ok(None),
            Some(ids) => task_gates(ids, seq, num_experts, device)
                .map(Some)
                .map_err(|e| ModelError::Input(e.to_string())),
        }
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

impl<B: Backend> SelfAttention<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &Ctx<B>,
        gates: &GateCtx<B>,
        cache: Option<&mut Option<LayerCache<B>>>,
        layer: usize,
        routing: &mut Vec<Routing<B>>,
    ) -> Result<Tensor<B, 3>> {
        let [b, s, _] = x.dims();
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut run = |p: &Proj<B>, name: &str, x: Tensor<B, 3>| {
            let (y, r) = p.forward(x, gates, &|| {
                format!("model.layers.{layer}.self_attn.{name}")
            })?;
            if let Some(output) = r {
                routing.push(Routing {
                    layer: Some(layer),
                    module: Some(format!("self_attn.{name}")),
                    output,
                });
            }
            Ok::<_, ModelError>(y)
        };
        // query_states = self.q_proj(hidden_states).view(hidden_shape); the heads stay on
        // dim 2 (`[batch, seq, heads, head_dim]`): the attention kernel reads them in place,
        // so transformers' transpose(1, 2) and repeat_kv are never materialised.
        let q = run(&self.q_proj, "q_proj", x.clone())?.reshape([b, s, h, hd]);
        let q = legora_kernels::rotary(q, &ctx.cos, &ctx.sin);
        let k = run(&self.k_proj, "k_proj", x.clone())?.reshape([b, s, kv, hd]);
        let k = legora_kernels::rotary(k, &ctx.cos, &ctx.sin);
        let v = run(&self.v_proj, "v_proj", x)?.reshape([b, s, kv, hd]);
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
        run(&self.o_proj, "o_proj", out)
    }
}

impl<B: Backend> Mlp<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    fn forward(
        &self,
        x: Tensor<B, 3>,
        gates: &GateCtx<B>,
        layer: usize,
        routing: &mut Vec<Routing<B>>,
    ) -> Result<Tensor<B, 3>> {
        let mut run = |p: &Proj<B>, name: &str, x: Tensor<B, 3>| {
            let (y, r) = p.forward(x, gates, &|| format!("model.layers.{layer}.mlp.{name}"))?;
            if let Some(output) = r {
                routing.push(Routing {
                    layer: Some(layer),
                    module: Some(format!("mlp.{name}")),
                    output,
                });
            }
            Ok::<_, ModelError>(y)
        };
        // down_proj(act_fn(gate_proj(x)) * up_proj(x))
        let g = run(&self.gate_proj, "gate_proj", x.clone())?;
        let u = run(&self.up_proj, "up_proj", x)?;
        run(&self.down_proj, "down_proj", legora_kernels::swiglu(g, u))
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

impl<B: Backend> DecoderLayer<B> {
    /// Experts per mixture slot of this layer (`None` when it has no mixture).
    fn num_experts(&self) -> Option<usize> {
        let m = &self.mlp;
        self.attn_slots()
            .into_iter()
            .chain([&m.gate_proj, &m.up_proj, &m.down_proj])
            .find_map(|p| match p {
                Proj::Moe(m) if m.num_experts() > 0 => Some(m.num_experts()),
                _ => None,
            })
    }

    fn attn_slots(&self) -> [&Proj<B>; 4] {
        let a = &self.self_attn;
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]
    }

    /// Whether any attention projection holds a mixture.
    fn attn_has_mixture(&self) -> bool {
        self.attn_slots()
            .into_iter()
            .any(|p| matches!(p, Proj::Moe(m) if m.num_experts() > 0))
    }

    /// Gates of this layer's mixture slots for the normalized input `x` of the first
    /// block that holds a mixture: task gates when routed by task, else the router's.
    fn route(
        &self,
        x: &Tensor<B, 3>,
        ctx: &Ctx<B>,
        layer: usize,
        pool: Option<&mut Option<PoolCache<B>>>,
        routing: &mut Vec<Routing<B>>,
    ) -> Result<Option<Tensor<B, 2>>> {
        let [b, s, d] = x.dims();
        let Some(e) = self.num_experts() else {
            return Ok(None);
        };
        if let Some(g) = ctx.gates(s, e, &x.device())? {
            return Ok(Some(g));
        }
        let Some(router) = self.router.as_ref() else {
            return Ok(None);
        };
        let input = match router.pooling() {
            RouterPooling::Token => x.clone(),
            RouterPooling::PrefixMean => prefix_mean(x.clone(), ctx.token_mask.clone(), pool),
        };
        let out = router.forward(input.reshape([b * s, d]), ctx.token_mask.clone());
        let g = out.gates.clone();
        routing.push(Routing {
            layer: Some(layer),
            module: None,
            output: out,
        });
        Ok(Some(g))
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
        let mut gates = GateCtx {
            gates: None,
            mask: ctx.token_mask.clone(),
            expert: ctx.single_task(),
            row_experts: ctx.row_experts.clone(),
        };
        let attn_first = self.attn_has_mixture();
        if attn_first {
            gates.gates = self.route(&x, ctx, layer, pool.take(), routing)?;
        }
        let h = h + self
            .self_attn
            .forward(x, ctx, &gates, cache, layer, routing)?;
        let x = self.post_attention_layernorm.forward(h.clone());
        if !attn_first {
            gates.gates = self.route(&x, ctx, layer, pool, routing)?;
        }
        Ok(h + self.mlp.forward(x, &gates, layer, routing)?)
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

    fn build(config: ModelConfig, mut init: Init<'_>, device: &B::Device) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        {
            let mut proj =
                |name: String, (out, inp): (usize, usize), bias: bool| -> Result<Proj<B>> {
                    let w = init.load::<B, 2>(&format!("{name}.weight"), [out, inp], device)?;
                    let b = if bias {
                        Some(init.load::<B, 1>(&format!("{name}.bias"), [out], device)?)
                    } else {
                        None
                    };
                    Ok(Proj::linear(w, b))
                };
            let dims = |n: &str| c.linear_dims(n).expect("known projection");
            for i in 0..c.num_hidden_layers {
                let p = format!("model.layers.{i}");
                let self_attn = SelfAttention {
                    q_proj: proj(format!("{p}.self_attn.q_proj"), dims("q_proj"), c.qkv_bias)?,
                    k_proj: proj(format!("{p}.self_attn.k_proj"), dims("k_proj"), c.qkv_bias)?,
                    v_proj: proj(format!("{p}.self_attn.v_proj"), dims("v_proj"), c.qkv_bias)?,
                    o_proj: proj(format!("{p}.self_attn.o_proj"), dims("o_proj"), c.o_bias)?,
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                    sliding_window: c.sliding_windows[i],
                };
                let mlp = Mlp {
                    gate_proj: proj(format!("{p}.mlp.gate_proj"), dims("gate_proj"), c.mlp_bias)?,
                    up_proj: proj(format!("{p}.mlp.up_proj"), dims("up_proj"), c.mlp_bias)?,
                    down_proj: proj(format!("{p}.mlp.down_proj"), dims("down_proj"), c.mlp_bias)?,
                };
                layers.push((p, self_attn, mlp));
            }
        }
        let mut norm = |name: String| -> Result<RmsNorm<B>> {
            Ok(RmsNorm {
                weight: Param::from_tensor(init.load::<B, 1>(&name, [c.hidden_size], device)?)
                    .set_require_grad(false),
                eps: c.rms_norm_eps,
            })
        };
        let mut built = Vec::with_capacity(layers.len());
        for (p, self_attn, mlp) in layers {
            built.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: norm(format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: norm(format!("{p}.post_attention_layernorm.weight"))?,
                router: None,
            });
        }
        let final_norm = norm("model.norm.weight".into())?;
        let embed = init.load::<B, 2>(
            "model.embed_tokens.weight",
            [c.vocab_size, c.hidden_size],
            device,
        )?;
        let lm_head = if c.tie_word_embeddings {
            Proj::linear(embed.clone(), None)
        } else {
            Proj::linear(
                init.load::<B, 2>("lm_head.weight", [c.vocab_size, c.hidden_size], device)?,
                None,
            )
        };
        Ok(Self {
            model: DecoderModel {
                embed_tokens: Param::from_tensor(embed).set_require_grad(false),
                layers: built,
                norm: final_norm,
            },
            lm_head,
            config,
        })
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
    ///   `[batch, seq]`, task_ids: `[batch]` → logits `[batch, seq, vocab]`, one
    ///   [`Routing`] per router that ran
    pub fn forward(&self, input: LmInput<B>) -> Result<CausalLmOutput<B>> {
        self.forward_impl(input, None)
    }

    /// Forward pass that reads and extends `cache` (prefill, then one token at a time).
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`, attention_mask: `[batch, cache.len() + seq]`,
    ///   position_ids: `[batch, seq]`, task_ids: `[batch]` → logits `[batch, seq, vocab]`
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
        mut cache: Option<&mut KvCache<B>>,
    ) -> Result<CausalLmOutput<B>> {
        let [b, s] = input.input_ids.dims();
        if b == 0 || s == 0 {
            return Err(ModelError::Input(format!(
                "empty input_ids of shape [{b}, {s}]"
            )));
        }
        let device = input.input_ids.device();
        let past = cache.as_ref().map(|c| c.len).unwrap_or(0);
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
        if let Some(ids) = &input.task_ids {
            if ids.len() != b {
                return Err(ModelError::Input(format!(
                    "{} task ids for a batch of {b} rows",
                    ids.len()
                )));
            }
        }
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
        let row_experts = input.task_ids.as_ref().map(|ids| {
            ids.iter()
                .flat_map(|&t| std::iter::repeat_n(t, s))
                .collect::<std::sync::Arc<[usize]>>()
        });
        let ctx = Ctx {
            cos,
            sin,
            masks,
            token_mask,
            task_ids: input.task_ids,
            row_experts,
        };

        let ids = input.input_ids.reshape([b * s]);
        let hidden = self.config.hidden_size;
        let mut h = self
            .model
            .embed_tokens
            .val()
            .select(0, ids)
            .reshape([b, s, hidden]);
        let mut routing = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            let (slot, pool) = match cache.as_deref_mut() {
                Some(c) => (Some(&mut c.layers[i]), Some(&mut c.pooled[i])),
                None => (None, None),
            };
            h = layer.forward(h, &ctx, slot, pool, i, &mut routing)?;
        }
        let h = self.model.norm.forward(h);
        let head_gates = GateCtx {
            expert: ctx.single_task(),
            row_experts: ctx.row_experts.clone(),
            gates: match &self.lm_head {
                Proj::Moe(m) if m.num_experts() > 0 => ctx.gates(s, m.num_experts(), &device)?,
                _ => None,
            },
            mask: ctx.token_mask.clone(),
        };
        let (logits, r) = self
            .lm_head
            .forward(h, &head_gates, &|| "lm_head".to_string())?;
        if let Some(output) = r {
            routing.push(Routing {
                layer: None,
                module: Some("lm_head".into()),
                output,
            });
        }
        if let Some(c) = cache {
            c.len = total;
        }
        Ok(CausalLmOutput { logits, routing })
    }
}
