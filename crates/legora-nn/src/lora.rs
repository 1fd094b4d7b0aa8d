//! `LoraAdapter` (one low-rank pair) and `LoraLinear` (a frozen linear with named adapters).
//!
//! Math, in activation space (never materialising `W + s·BA` during training):
//!
//! ```text
//! y = x·Wᵀ + b + Σ_active scale_a · (dropout(x)·A_aᵀ)·B_aᵀ
//! ```
//!
//! `A [r, in]` and `B [out, r]` keep PEFT's layout and names (`lora_A`, `lora_B`).
#![allow(non_snake_case)]

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

use crate::error::{NnError, Result};
use legora_config::{AdapterSpec, InitLoraWeights};
use legora_kernels::quant::Format;
use legora_kernels::FrozenWeight;

/// Flatten `[..., d]` to `[N, d]`, returning the leading dims for [`unflatten`].
pub(crate) fn flatten<B: Backend, const D: usize>(x: Tensor<B, D>) -> (Tensor<B, 2>, [usize; D]) {
    let dims: [usize; D] = x.dims();
    let d = dims[D - 1];
    let n = dims[..D - 1].iter().product::<usize>();
    (x.reshape([n, d]), dims)
}

/// Inverse of [`flatten`] with a new last dimension `d_out`.
pub(crate) fn unflatten<B: Backend, const D: usize>(
    y: Tensor<B, 2>,
    mut dims: [usize; D],
    d_out: usize,
) -> Tensor<B, D> {
    dims[D - 1] = d_out;
    y.reshape(dims)
}

/// Inverted dropout applied only when autodiff is on (training), as burn's `Dropout`.
pub(crate) fn lora_dropout<B: Backend>(x: Tensor<B, 2>, p: f64) -> Tensor<B, 2> {
    legora_kernels::dropout(x, p)
}

/// `x·Wᵀ + b` for a frozen HF-layout weight `[out, in]` in its storage format: an f32
/// weight by burn's matmul (as a plain `nn.Linear`), any other by
/// [`legora_kernels::frozen_linear`] (tile-dequantizing on the CPU kernels).
///
/// # Shapes
/// - x: `[N, in]`, weight: `[out, in]`, bias: `[out]` → `[N, out]`
pub(crate) fn base_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: &FrozenWeight<B>,
    bias: &Option<Param<Tensor<B, 1>>>,
) -> Tensor<B, 2> {
    let bias = bias.as_ref().map(|b| b.val());
    match weight {
        FrozenWeight::Dense(w) if weight.format() == Format::F32 => {
            let y = x.matmul(w.val().transpose());
            match bias {
                Some(b) => y + b.unsqueeze_dim(0),
                None => y,
            }
        }
        _ => legora_kernels::frozen_linear(x, weight, bias),
    }
}

/// `x·Wᵀ + b + adapter(x)` as one [`legora_kernels::stacked_lora_frozen`] op (the weight
/// read in its storage format).
///
/// # Shapes
/// - x: `[N, in]`, weight: `[out, in]`, bias: `[out]` → `[N, out]`
pub(crate) fn adapted_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: &FrozenWeight<B>,
    bias: &Option<Param<Tensor<B, 1>>>,
    adapter: &LoraAdapter<B>,
) -> Tensor<B, 2> {
    let lora = legora_kernels::StackedLora {
        lora_a: adapter.lora_A.val(),
        lora_b: adapter.lora_B.val(),
        ranks: vec![adapter.rank()],
        scales: vec![adapter.scaling()],
        dropout: adapter.lora_dropout,
        gating: legora_kernels::Gating::Single(0),
    };
    legora_kernels::stacked_lora_frozen(x, weight, bias.as_ref().map(|b| b.val()), lora)
}

/// Make a frozen parameter (no gradient, no optimizer state).
pub(crate) fn frozen<B: Backend, const D: usize>(t: Tensor<B, D>) -> Param<Tensor<B, D>> {
    Param::from_tensor(t).set_require_grad(false)
}

/// Check a tensor's dims.
pub(crate) fn check_dims(name: &str, expected: &[usize], found: &[usize]) -> Result<()> {
    if expected != found {
        return Err(NnError::shape(name, expected, found));
    }
    Ok(())
}

/// One LoRA pair: `lora_A [r, in]`, `lora_B [out, r]` and its scaling.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// Down projection, PEFT `lora_A.weight`, shape `[r, in]`.
    pub lora_A: Param<Tensor<B, 2>>,
    /// Up projection, PEFT `lora_B.weight`, shape `[out, r]`.
    pub lora_B: Param<Tensor<B, 2>>,
    /// `lora_alpha`.
    pub lora_alpha: f64,
    /// Dropout on this adapter's input, training only.
    pub lora_dropout: f64,
    /// rsLoRA scaling (`alpha / sqrt(r)`).
    pub use_rslora: bool,
}

impl<B: Backend> LoraAdapter<B> {
    /// A new adapter for a `d_in → d_out` linear, initialised per `spec.init`
    /// (PEFT's `reset_lora_parameters`).
    pub fn init(spec: &AdapterSpec, d_in: usize, d_out: usize, device: &B::Device) -> Result<Self> {
        spec.validate()?;
        let r = spec.r;
        // nn.init.kaiming_uniform_(w, a=sqrt(5)) gives bound = 1/sqrt(fan_in).
        let kaiming = |shape: [usize; 2], fan_in: usize| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            Tensor::<B, 2>::random(shape, Distribution::Uniform(-bound, bound), device)
        };
        let (a, b) = match spec.init {
            InitLoraWeights::Default => {
                (kaiming([r, d_in], d_in), Tensor::zeros([d_out, r], device))
            }
            // nn.init.normal_(lora_A, std=1/r)
            InitLoraWeights::Gaussian => (
                Tensor::random([r, d_in], Distribution::Normal(0.0, 1.0 / r as f64), device),
                Tensor::zeros([d_out, r], device),
            ),
            InitLoraWeights::Random => (kaiming([r, d_in], d_in), kaiming([d_out, r], r)),
        };
        Ok(Self::new_unchecked(a, b, spec))
    }

    /// An adapter from given tensors (e.g. read from a PEFT file); shapes are checked
    /// against `d_in`, `d_out` and `spec.r`.
    pub fn from_tensors(
        lora_A: Tensor<B, 2>,
        lora_B: Tensor<B, 2>,
        spec: &AdapterSpec,
        d_in: usize,
        d_out: usize,
    ) -> Result<Self> {
        spec.validate()?;
        check_dims("lora_A.weight", &[spec.r, d_in], &lora_A.dims())?;
        check_dims("lora_B.weight", &[d_out, spec.r], &lora_B.dims())?;
        Ok(Self::new_unchecked(lora_A, lora_B, spec))
    }

    fn new_unchecked(a: Tensor<B, 2>, b: Tensor<B, 2>, spec: &AdapterSpec) -> Self {
        Self {
            lora_A: Param::from_tensor(a),
            lora_B: Param::from_tensor(b),
            lora_alpha: spec.lora_alpha,
            lora_dropout: spec.lora_dropout,
            use_rslora: spec.use_rslora,
        }
    }

    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.lora_A.shape().dims::<2>()[0]
    }

    /// The settings this adapter was made with.
    pub fn spec(&self) -> AdapterSpec {
        AdapterSpec {
            r: self.rank(),
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            use_rslora: self.use_rslora,
            init: InitLoraWeights::Default,
        }
    }

    /// `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    pub fn scaling(&self) -> f64 {
        self.spec().scaling()
    }

    /// `scale · B·A`, shape `[out, in]` — only for merging and export, never in training.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_B.val().matmul(self.lora_A.val()) * self.scaling()
    }

    /// The adapter's contribution `scale · (dropout(x)·Aᵀ)·Bᵀ`.
    ///
    /// The scale multiplies the rank-`r` intermediate rather than the `[N, out]` result
    /// (the same product; `r` is much smaller than `out`).
    ///
    /// # Shapes
    /// - x: `[N, in]` → `[N, out]`
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = lora_dropout(x, self.lora_dropout);
        (x.matmul(self.lora_A.val().transpose()) * self.scaling())
            .matmul(self.lora_B.val().transpose())
    }

    /// Mark both matrices trainable or frozen.
    pub fn set_trainable(self, trainable: bool) -> Self {
        Self {
            lora_A: self.lora_A.set_require_grad(trainable),
            lora_B: self.lora_B.set_require_grad(trainable),
            ..self
        }
    }
}

/// How [`LoraLinear::add_weighted_adapter`] combines adapters (PEFT's `combination_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// Same-rank adapters: `A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ`, `B = Σ √|wᵢsᵢ|·Bᵢ`
    /// (approximate: cross terms appear when more than one adapter is combined).
    Linear,
    /// Concatenate ranks: `A = cat(wᵢsᵢ·Aᵢ)`, `B = cat(Bᵢ)` — exactly `Σ wᵢ·ΔWᵢ`.
    Cat,
}

/// Which adapters a layer holds and uses; not a tensor, so ignored by records.
#[derive(Debug, Clone, Default)]
struct AdapterState {
    names: Vec<String>,
    active: Vec<String>,
    merged: Vec<String>,
    disabled: bool,
}

/// A frozen linear layer with any number of named LoRA adapters (PEFT's `lora.Linear`).
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// Frozen base weight in HF layout, `[out, in]`, in its storage format (f32, bf16,
    /// f16, int8, NF4, FP4); [`FrozenWeight::val`] gives it as f32.
    pub weight: FrozenWeight<B>,
    /// Frozen base bias, `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Adapters in insertion order; names in the same order.
    adapters: Vec<LoraAdapter<B>>,
    #[module(skip)]
    state: AdapterState,
}

impl<B: Backend> LoraLinear<B> {
    /// Wrap a frozen base weight `[out, in]` (+ bias `[out]`).
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Result<Self> {
        Self::from_frozen(FrozenWeight::dense(weight), bias)
    }

    /// Wrap a frozen base weight `[out, in]` kept in its storage format (+ bias `[out]`).
    pub fn from_frozen(weight: FrozenWeight<B>, bias: Option<Tensor<B, 1>>) -> Result<Self> {
        let [d_out, _] = weight.dims();
        if let Some(b) = &bias {
            check_dims("bias", &[d_out], &b.dims())?;
        }
        Ok(Self {
            weight,
            bias: bias.map(frozen),
            adapters: Vec::new(),
            state: AdapterState::default(),
        })
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        let [o, i] = self.weight.dims();
        (i, o)
    }

    /// Adapter names in insertion order.
    pub fn adapter_names(&self) -> &[String] {
        &self.state.names
    }

    /// The active adapters (PEFT `active_adapters`).
    pub fn active_adapters(&self) -> &[String] {
        &self.state.active
    }

    /// The adapters currently merged into the base weight.
    pub fn merged_adapters(&self) -> &[String] {
        &self.state.merged
    }

    /// Whether adapters are disabled (forward = base only).
    pub fn is_disabled(&self) -> bool {
        self.state.disabled
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.state
            .names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| NnError::UnknownAdapter {
                name: name.to_string(),
                available: self.state.names.clone(),
            })
    }

    /// The adapter called `name`.
    pub fn adapter(&self, name: &str) -> Result<&LoraAdapter<B>> {
        Ok(&self.adapters[self.index(name)?])
    }

    /// Add a freshly initialised adapter. The first adapter added becomes active.
    pub fn add_adapter(&mut self, name: &str, spec: &AdapterSpec) -> Result<()> {
        let (d_in, d_out) = self.dims();
        let adapter = LoraAdapter::init(spec, d_in, d_out, &self.weight.device())?;
        self.insert_adapter(name, adapter)
    }

    /// Add an existing adapter (e.g. loaded from disk); its shapes are checked.
    pub fn insert_adapter(&mut self, name: &str, adapter: LoraAdapter<B>) -> Result<()> {
        if self.state.names.iter().any(|n| n == name) {
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
        let first = self.state.active.is_empty();
        self.adapters.push(adapter.set_trainable(first));
        self.state.names.push(name.to_string());
        if first {
            self.state.active.push(name.to_string());
        }
        Ok(())
    }

    /// Activate exactly these adapters (PEFT `set_adapter`); the others are frozen.
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        let idx: Vec<usize> = names.iter().map(|n| self.index(n)).collect::<Result<_>>()?;
        let adapters = std::mem::take(&mut self.adapters);
        self.adapters = adapters
            .into_iter()
            .enumerate()
            .map(|(i, a)| a.set_trainable(idx.contains(&i)))
            .collect();
        self.state.active = names.iter().map(|s| s.to_string()).collect();
        Ok(())
    }

    /// Forward through the base only (PEFT `disable_adapter`). Merged adapters are
    /// unmerged first so that the result really is the base.
    pub fn disable_adapters(&mut self) {
        self.unmerge();
        self.state.disabled = true;
    }

    /// Undo [`disable_adapters`](Self::disable_adapters).
    pub fn enable_adapters(&mut self) {
        self.state.disabled = false;
    }

    /// Remove an adapter. A merged adapter must be unmerged first.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        if self.state.merged.iter().any(|n| n == name) {
            return Err(NnError::InvalidState(format!(
                "adapter `{name}` is merged into the base weight: unmerge it before deleting"
            )));
        }
        self.adapters.remove(i);
        self.state.names.remove(i);
        self.state.active.retain(|n| n != name);
        Ok(())
    }

    /// Merge the active adapters into the base weight: `W ← W + scale·B·A` (a dense
    /// weight keeps its dtype; a quantized one becomes f32, as dequantized).
    pub fn merge(&mut self) -> Result<()> {
        if self.state.disabled {
            return Err(NnError::InvalidState(
                "adapters are disabled: enable them before merging".into(),
            ));
        }
        for name in self.state.active.clone() {
            if self.state.merged.contains(&name) {
                continue;
            }
            let delta = self.adapter(&name)?.delta_weight();
            let w = self.weight.val() + delta;
            self.weight = self.weight.with_dense_value(w);
            self.state.merged.push(name);
        }
        Ok(())
    }

    /// Subtract every merged adapter from the base weight again (`W ← W − scale·B·A`).
    pub fn unmerge(&mut self) {
        while let Some(name) = self.state.merged.pop() {
            if let Ok(a) = self.adapter(&name) {
                let w = self.weight.val() - a.delta_weight();
                self.weight = self.weight.with_dense_value(w);
            }
        }
    }

    /// PEFT's `merge_and_unload` for one layer: the merged weight (f32) and bias,
    /// adapters dropped.
    pub fn merge_and_unload(mut self) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        if !self.state.disabled {
            self.merge()?;
        }
        Ok((self.weight.val(), self.bias.map(|b| b.val())))
    }

    /// Create `new_name` from a weighted combination of existing adapters
    /// (PEFT `add_weighted_adapter` with `combination_type` `"linear"` or `"cat"`).
    /// The new adapter has `lora_alpha = r`, i.e. scaling 1: the weights and the
    /// source scalings are folded into its matrices.
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        new_name: &str,
        combination: Combination,
    ) -> Result<()> {
        if adapters.is_empty() || adapters.len() != weights.len() {
            return Err(NnError::config(
                "weights",
                format!("one weight per adapter ({} adapters)", adapters.len()),
                format!("{} weights", weights.len()),
            ));
        }
        let srcs: Vec<&LoraAdapter<B>> = adapters
            .iter()
            .map(|n| self.adapter(n))
            .collect::<Result<_>>()?;
        let (a, b) = match combination {
            Combination::Linear => {
                let r0 = srcs[0].rank();
                if let Some(bad) = srcs.iter().find(|s| s.rank() != r0) {
                    return Err(NnError::config(
                        "combination_type",
                        format!("adapters of equal rank for \"linear\" (first has r = {r0})"),
                        format!("an adapter with r = {} (use \"cat\")", bad.rank()),
                    ));
                }
                let mut a_sum: Option<Tensor<B, 2>> = None;
                let mut b_sum: Option<Tensor<B, 2>> = None;
                for (s, w) in srcs.iter().zip(weights) {
                    let t = w * s.scaling();
                    let root = t.abs().sqrt();
                    let a = s.lora_A.val() * (t.signum() * root);
                    let b = s.lora_B.val() * root;
                    a_sum = Some(match a_sum {
                        Some(acc) => acc + a,
                        None => a,
                    });
                    b_sum = Some(match b_sum {
                        Some(acc) => acc + b,
                        None => b,
                    });
                }
                (a_sum.expect("non-empty"), b_sum.expect("non-empty"))
            }
            Combination::Cat => {
                let a_parts = srcs
                    .iter()
                    .zip(weights)
                    .map(|(s, w)| s.lora_A.val() * (w * s.scaling()))
                    .collect();
                let b_parts = srcs.iter().map(|s| s.lora_B.val()).collect();
                (Tensor::cat(a_parts, 0), Tensor::cat(b_parts, 1))
            }
        };
        let r = a.dims()[0];
        let spec = AdapterSpec::new(r, r as f64).with_dropout(srcs[0].lora_dropout);
        let (d_in, d_out) = self.dims();
        let adapter = LoraAdapter::from_tensors(a.detach(), b.detach(), &spec, d_in, d_out)?;
        self.insert_adapter(new_name, adapter)
    }

    /// The adapters that take part in `forward`: active, not merged, not disabled.
    fn live_adapters(&self) -> impl Iterator<Item = &LoraAdapter<B>> {
        let on = !self.state.disabled;
        self.state
            .names
            .iter()
            .zip(&self.adapters)
            .filter(move |(name, _)| {
                on && self.state.active.contains(name) && !self.state.merged.contains(name)
            })
            .map(|(_, adapter)| adapter)
    }

    /// Apply the layer.
    ///
    /// # Shapes
    /// - x: `[..., in]` → `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let (x, dims) = flatten(x);
        let (_, d_out) = self.dims();
        let mut live = self.live_adapters();
        if let (Some(adapter), None) = (live.next(), live.next()) {
            // One adapter (the training case): one fused op.
            let y = adapted_linear(x, &self.weight, &self.bias, adapter);
            return unflatten(y, dims, d_out);
        }
        let mut y = base_linear(x.clone(), &self.weight, &self.bias);
        for adapter in self.live_adapters() {
            y = y + adapter.forward(x.clone());
        }
        unflatten(y, dims, d_out)
    }
}
