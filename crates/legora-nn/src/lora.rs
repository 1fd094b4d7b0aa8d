//! `LoraAdapter` (one low-rank pair) and `LoraLinear` (a frozen linear with named adapters).
//!
//! Math, in activation space (never materialising `W + s·BA` during training):
//!
//! ```text
//! y = x·Wᵀ + b + Σ_active scale_a · (dropout(x)·A_aᵀ)·B_aᵀ
//! ```
//!
//! `A [r, in]` and `B [out, r]` keep PEFT's layout and names (`lora_A`, `lora_B`).
//!
//! DoRA (`use_dora`) adds a trained magnitude `m [out]` and rescales each output row of the
//! adapted weight to it, with the norm detached from the graph as PEFT does:
//!
//! ```text
//! n = ‖W + scale·B·A‖ per row (no gradient),   f = m / n
//! y = x·Wᵀ + b + (f − 1)·(x'·Wᵀ) + f·scale·(x'·Aᵀ)·Bᵀ,   x' = dropout(x)
//! ```
//!
//! so that without dropout `y = f·(x·(W + scale·B·A)ᵀ) + b`.
#![allow(non_snake_case)]

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};

use crate::error::{NnError, Result};
use crate::merge::{self, Combination, HostLora, Masks, MergeOptions, SplitMix64};
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
/// [`legora_kernels::frozen_linear`] (on the CPU kernels: matrix–vector products in the
/// stored type for a few rows, as when decoding; tile-dequantizing `gemm` for many).
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

/// [`base_linear`] over the last dimension: the frozen product of a slot without adapters.
///
/// # Shapes
/// - x: `[..., in]`, weight: `[out, in]`, bias: `[out]` → `[..., out]`
pub fn frozen_forward<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: &FrozenWeight<B>,
    bias: &Option<Param<Tensor<B, 1>>>,
) -> Tensor<B, D> {
    let (x, dims) = flatten(x);
    let d_out = weight.dims()[0];
    unflatten(base_linear(x, weight, bias), dims, d_out)
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

/// A tensor's values as f64, for the host-side merges.
fn host<B: Backend>(t: Tensor<B, 2>, adapter: &str, tensor: &str) -> Result<Vec<f64>> {
    let v = t
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| {
            NnError::InvalidState(format!("reading `{adapter}.{tensor}.weight`: {e:?}"))
        })?;
    Ok(v.into_iter().map(f64::from).collect())
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
    /// DoRA's magnitude, PEFT `lora_magnitude_vector`, shape `[out]` (`None`: plain LoRA).
    pub lora_magnitude_vector: Option<Param<Tensor<B, 1>>>,
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
        let adapter = Self::new_unchecked(a, b, spec);
        if spec.use_dora {
            // the row norms of the base weight are set by `LoraLinear::add_adapter`
            return Ok(adapter.with_magnitude(Tensor::ones([d_out], device)));
        }
        Ok(adapter)
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
            lora_magnitude_vector: None,
        }
    }

    /// This adapter as DoRA with magnitude `m [out]` (PEFT `lora_magnitude_vector`);
    /// its length is checked when the adapter is inserted into a layer.
    pub fn with_magnitude(mut self, m: Tensor<B, 1>) -> Self {
        let trainable = self.lora_A.is_require_grad();
        self.lora_magnitude_vector = Some(Param::from_tensor(m).set_require_grad(trainable));
        self
    }

    /// Whether this is a DoRA adapter.
    pub fn is_dora(&self) -> bool {
        self.lora_magnitude_vector.is_some()
    }

    /// PEFT's `get_weight_norm`: `‖W + scale·B·A‖` per output row, detached.
    ///
    /// # Shapes
    /// - weight: `[out, in]` → `[out]`
    pub fn weight_norm(&self, weight: Tensor<B, 2>) -> Tensor<B, 1> {
        let w = weight + self.delta_weight().detach();
        w.powi_scalar(2).sum_dim(1).sqrt().squeeze_dim(1).detach()
    }

    /// DoRA's row factor `m / ‖W + scale·B·A‖` for base weight `W` (`None` for plain LoRA).
    ///
    /// # Shapes
    /// - weight: `[out, in]` → `[out]`
    pub fn dora_factor(&self, weight: Tensor<B, 2>) -> Option<Tensor<B, 1>> {
        let m = self.lora_magnitude_vector.as_ref()?.val();
        Some(m / self.weight_norm(weight))
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
            use_dora: self.is_dora(),
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
        self.lora_path(lora_dropout(x, self.lora_dropout))
    }

    /// `scale · (x·Aᵀ)·Bᵀ` on an input already through dropout.
    fn lora_path(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        (x.matmul(self.lora_A.val().transpose()) * self.scaling())
            .matmul(self.lora_B.val().transpose())
    }

    /// A DoRA adapter's contribution given `base = x·Wᵀ` (without bias; PEFT passes the
    /// layer's result so far): `(f − 1)·base + f·scale·(x·Aᵀ)·Bᵀ`, where under dropout
    /// `base` is recomputed on the dropped input, as PEFT's `DoraLinearLayer`.
    ///
    /// # Shapes
    /// - x: `[N, in]`, base: `[N, out]` → `[N, out]`
    pub fn dora_forward(
        &self,
        x: Tensor<B, 2>,
        base: Tensor<B, 2>,
        weight: &FrozenWeight<B>,
    ) -> Tensor<B, 2> {
        let f = match self.dora_factor(weight.val()) {
            Some(f) => f.unsqueeze_dim::<2>(0),
            None => return self.forward(x),
        };
        let dropped = self.lora_dropout > 0.0 && B::ad_enabled(&x.device());
        let (x, base) = if dropped {
            let x = lora_dropout(x, self.lora_dropout);
            let base = base_linear(x.clone(), weight, &None);
            (x, base)
        } else {
            (x, base)
        };
        base * (f.clone() - 1.0) + self.lora_path(x) * f
    }

    /// Mark the adapter's tensors trainable or frozen.
    pub fn set_trainable(self, trainable: bool) -> Self {
        Self {
            lora_A: self.lora_A.set_require_grad(trainable),
            lora_B: self.lora_B.set_require_grad(trainable),
            lora_magnitude_vector: self
                .lora_magnitude_vector
                .map(|m| m.set_require_grad(trainable)),
            ..self
        }
    }
}

/// Which adapters a layer holds and uses; not a tensor, so ignored by records.
#[derive(Debug, Clone, Default)]
struct AdapterState {
    names: Vec<String>,
    active: Vec<String>,
    merged: Vec<String>,
    /// The DoRA factor `m / ‖W + ΔW‖` of each merged DoRA adapter, to unmerge it.
    dora_factors: Vec<(String, Vec<f32>)>,
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
        let mut adapter = LoraAdapter::init(spec, d_in, d_out, &self.weight.device())?;
        if spec.use_dora {
            // PEFT's `dora_init`: the magnitude starts as the adapted weight's row norms
            let norm = adapter.weight_norm(self.weight.val());
            adapter = adapter.with_magnitude(norm);
        }
        self.insert_adapter(name, adapter)
    }

    /// `name` is not yet an adapter of this layer.
    fn check_free_name(&self, name: &str) -> Result<()> {
        if self.state.names.iter().any(|n| n == name) {
            return Err(NnError::DuplicateAdapter { name: name.into() });
        }
        Ok(())
    }

    /// Add an existing adapter (e.g. loaded from disk); its shapes are checked.
    pub fn insert_adapter(&mut self, name: &str, adapter: LoraAdapter<B>) -> Result<()> {
        self.check_free_name(name)?;
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
        if let Some(m) = &adapter.lora_magnitude_vector {
            check_dims(
                &format!("{name}.lora_magnitude_vector"),
                &[d_out],
                &m.dims(),
            )?;
        }
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
            let adapter = self.adapter(&name)?;
            let base = self.weight.val();
            let w = match adapter.dora_factor(base.clone()) {
                // PEFT: W ← (m / ‖W + ΔW‖)·(W + ΔW), the factor kept to unmerge
                Some(f) => {
                    let values = f.clone().into_data().to_vec::<f32>().map_err(|e| {
                        NnError::InvalidState(format!("reading the DoRA factor: {e:?}"))
                    })?;
                    let w = (base + adapter.delta_weight()) * f.unsqueeze_dim(1);
                    self.state.dora_factors.push((name.clone(), values));
                    w
                }
                None => base + adapter.delta_weight(),
            };
            self.weight = self.weight.with_dense_value(w);
            self.state.merged.push(name);
        }
        Ok(())
    }

    /// Subtract every merged adapter from the base weight again (`W ← W − scale·B·A`).
    pub fn unmerge(&mut self) {
        while let Some(name) = self.state.merged.pop() {
            let factors = &mut self.state.dora_factors;
            let factor = factors
                .iter()
                .position(|(n, _)| *n == name)
                .map(|i| factors.remove(i).1);
            if let Ok(a) = self.adapter(&name) {
                let mut w = self.weight.val();
                if let Some(f) = factor {
                    let n = f.len();
                    let f = Tensor::<B, 1>::from_data(TensorData::new(f, [n]), &w.device());
                    w = w / f.unsqueeze_dim(1);
                }
                let w = w - a.delta_weight();
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

    /// Create `new_name` from a weighted combination of existing adapters: PEFT's
    /// `add_weighted_adapter(adapters, weights, new_name, combination_type, ...)`, every
    /// [`Combination`] with its [`MergeOptions`] (see there for the math).
    ///
    /// The sources' real scalings (`alpha / r`, or `alpha / √r` with rsLoRA) are folded
    /// into the new matrices and the new adapter is plain LoRA with `lora_alpha = r`, i.e.
    /// scaling 1, so its `ΔW` is the intended combination. (PEFT copies the first source's
    /// config with `r = lora_alpha = new rank`: when that source uses rsLoRA the merged
    /// adapter keeps `use_rslora` and its `ΔW` comes out `√r` times too large; legora does
    /// not follow that.) Other deliberate differences: weights must be one per adapter
    /// (PEFT zips and drops the extra), `svd_rank = 0` is refused (PEFT reads it as
    /// unset), a `new_name` already taken is an error (PEFT returns without a word), DARE
    /// at `density = 0` gives zero (PEFT: NaN), and DARE's masks come from
    /// [`MergeOptions::seed`], not torch's generator.
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        new_name: &str,
        combination: Combination,
        options: &MergeOptions,
    ) -> Result<()> {
        let masks = Masks::Seeded(SplitMix64(options.seed));
        self.weighted_adapter(adapters, weights, new_name, combination, options, masks)
    }

    /// [`add_weighted_adapter`](Self::add_weighted_adapter) with DARE's keep-masks given
    /// (`true` = kept), to reproduce a merge made elsewhere (e.g. PEFT's, whose masks come
    /// from `torch.bernoulli`). The masks are taken in PEFT's draw order: for `dare_linear`
    /// and `dare_ties` the `lora_A` of every source (`[r·in]` each), then every `lora_B`
    /// (`[out·r]`); for the `_svd` variants one `[out·in]` mask per source `ΔW`; none at
    /// `density = 1`. A missing, extra or wrongly sized mask is an error.
    pub fn add_weighted_adapter_with_masks(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        new_name: &str,
        combination: Combination,
        options: &MergeOptions,
        masks: &[Vec<bool>],
    ) -> Result<()> {
        let masks = Masks::Given(masks.iter());
        self.weighted_adapter(adapters, weights, new_name, combination, options, masks)
    }

    fn weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        new_name: &str,
        combination: Combination,
        options: &MergeOptions,
        mut masks: Masks<'_>,
    ) -> Result<()> {
        // Before the merge's work; `insert_adapter` checks it again.
        self.check_free_name(new_name)?;
        let srcs = self.merge_sources(adapters, weights)?;
        let (d_in, d_out) = self.dims();
        let (a, b, r) = merge::combine(
            &srcs,
            weights,
            (d_in, d_out),
            combination,
            options,
            &mut masks,
        )?;
        masks.finish()?;
        let device = self.weight.device();
        let to_tensor = |v: Vec<f64>, shape: [usize; 2]| {
            let v: Vec<f32> = v.into_iter().map(|x| x as f32).collect();
            Tensor::<B, 2>::from_data(TensorData::new(v, shape), &device)
        };
        let dropout = self.adapter(adapters[0])?.lora_dropout;
        let spec = AdapterSpec::new(r, r as f64).with_dropout(dropout);
        let (a, b) = (to_tensor(a, [r, d_in]), to_tensor(b, [d_out, r]));
        let adapter = LoraAdapter::from_tensors(a, b, &spec, d_in, d_out)?;
        self.insert_adapter(new_name, adapter)
    }

    /// The named sources on the host, checked: one finite weight per adapter, known
    /// names, no DoRA.
    fn merge_sources(&self, adapters: &[&str], weights: &[f64]) -> Result<Vec<HostLora>> {
        if adapters.is_empty() || adapters.len() != weights.len() {
            return Err(NnError::config(
                "weights",
                format!("one weight per adapter ({} adapters)", adapters.len()),
                format!("{} weights", weights.len()),
            ));
        }
        if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
            return Err(NnError::config("weights", "finite values", w));
        }
        adapters
            .iter()
            .map(|name| {
                let s = self.adapter(name)?;
                if s.is_dora() {
                    return Err(NnError::config(
                        "adapters",
                        "LoRA adapters (PEFT cannot combine DoRA adapters either)",
                        format!("DoRA adapter `{name}`"),
                    ));
                }
                Ok(HostLora {
                    a: host(s.lora_A.val(), name, "lora_A")?,
                    b: host(s.lora_B.val(), name, "lora_B")?,
                    r: s.rank(),
                    scaling: s.scaling(),
                })
            })
            .collect()
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
            if !adapter.is_dora() {
                // One adapter (the training case): one fused op.
                let y = adapted_linear(x, &self.weight, &self.bias, adapter);
                return unflatten(y, dims, d_out);
            }
        }
        // PEFT's loop: a DoRA adapter rescales the result so far (bias excluded)
        let mut y = base_linear(x.clone(), &self.weight, &None);
        for adapter in self.live_adapters() {
            y = if adapter.is_dora() {
                y.clone() + adapter.dora_forward(x.clone(), y, &self.weight)
            } else {
                y + adapter.forward(x.clone())
            };
        }
        if let Some(b) = &self.bias {
            y = y + b.val().unsqueeze_dim(0);
        }
        unflatten(y, dims, d_out)
    }
}
