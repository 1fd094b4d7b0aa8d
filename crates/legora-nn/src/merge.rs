//! PEFT's `add_weighted_adapter` combinations (`tuners/lora/model.py`) and the task-vector
//! merges they use (`utils/merge_utils.py`), on host `f64` vectors.
//!
//! Every function here mirrors the PEFT function of the same name. A "task tensor" is one
//! source's flattened tensor (`lora_A`, `lora_B` or a full `ΔW`); all task tensors of one
//! merge have the same length.

use std::fmt;
use std::str::FromStr;

use crate::error::{NnError, Result};
use crate::svd;

/// How [`LoraLinear::add_weighted_adapter`](crate::LoraLinear::add_weighted_adapter)
/// combines adapters: PEFT's `combination_type`, spelled as PEFT spells it by
/// [`FromStr`] / [`Display`](fmt::Display).
///
/// With `sᵢ` the source scalings (`lora_alpha / r`, or `/ √r` with rsLoRA) and `wᵢ` the
/// weights:
/// - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` need adapters of equal
///   rank `r` and merge `lora_A` and `lora_B` separately, each source weighted
///   `sign(wᵢsᵢ)·√|wᵢsᵢ|` on A and `√|wᵢsᵢ|` on B (cross terms make these approximate);
///   the new rank is `r`.
/// - `cat` concatenates the ranks (`A = cat(wᵢsᵢ·Aᵢ)`, `B = cat(Bᵢ)`): exactly `Σ wᵢ·ΔWᵢ`.
/// - `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd` merge the
///   full `ΔWᵢ = sᵢ·BᵢAᵢ` and keep the top `svd_rank` singular triplets (`B = U·S`,
///   `A = Vh`); `svd` is exact when `svd_rank` reaches the rank of `Σ wᵢ·ΔWᵢ`.
///
/// As in PEFT, a combination of a single adapter is always `linear`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Combination {
    /// `svd`: truncated SVD of `Σ wᵢ·ΔWᵢ` (PEFT's default).
    Svd,
    /// `linear`: `Σ` of the weighted A and of the weighted B.
    Linear,
    /// `cat`: ranks concatenated, exactly `Σ wᵢ·ΔWᵢ`.
    Cat,
    /// `ties`: TIES-merging (magnitude pruning, sign election, disjoint mean) of A and B.
    Ties,
    /// `ties_svd`: TIES on the full `ΔWᵢ`, then SVD.
    TiesSvd,
    /// `dare_linear`: DARE random pruning (rescaled by `1/density`), then a weighted sum.
    DareLinear,
    /// `dare_ties`: DARE random pruning, then TIES' sign election and disjoint mean.
    DareTies,
    /// `dare_linear_svd`: `dare_linear` on the full `ΔWᵢ`, then SVD.
    DareLinearSvd,
    /// `dare_ties_svd`: `dare_ties` on the full `ΔWᵢ`, then SVD.
    DareTiesSvd,
    /// `magnitude_prune`: keep the `density` largest magnitudes, then a weighted sum.
    MagnitudePrune,
    /// `magnitude_prune_svd`: `magnitude_prune` on the full `ΔWᵢ`, then SVD.
    MagnitudePruneSvd,
}

/// The task-vector merge a combination applies (PEFT's `merge_utils` functions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    TaskArithmetic,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
}

impl Combination {
    /// Every combination, in PEFT's order.
    pub const ALL: [Combination; 11] = [
        Self::Svd,
        Self::Linear,
        Self::Cat,
        Self::Ties,
        Self::TiesSvd,
        Self::DareTies,
        Self::DareLinear,
        Self::DareTiesSvd,
        Self::DareLinearSvd,
        Self::MagnitudePrune,
        Self::MagnitudePruneSvd,
    ];

    /// PEFT's name (`"ties_svd"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Svd => "svd",
            Self::Linear => "linear",
            Self::Cat => "cat",
            Self::Ties => "ties",
            Self::TiesSvd => "ties_svd",
            Self::DareLinear => "dare_linear",
            Self::DareTies => "dare_ties",
            Self::DareLinearSvd => "dare_linear_svd",
            Self::DareTiesSvd => "dare_ties_svd",
            Self::MagnitudePrune => "magnitude_prune",
            Self::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    /// Whether the result is a truncated SVD of the merged `ΔW`.
    pub fn uses_svd(self) -> bool {
        self.as_str().ends_with("svd")
    }

    /// Whether the combination prunes, and so needs `density`.
    pub fn uses_density(self) -> bool {
        !matches!(self, Self::Svd | Self::Linear | Self::Cat)
    }

    /// Whether the combination elects signs, and so reads `majority_sign_method`.
    pub fn uses_majority_sign(self) -> bool {
        matches!(
            self,
            Self::Ties | Self::TiesSvd | Self::DareTies | Self::DareTiesSvd
        )
    }

    /// Whether the combination draws DARE's random masks.
    pub fn is_dare(self) -> bool {
        self.as_str().starts_with("dare")
    }

    /// The merge of the task tensors (`None` for `cat`).
    pub(crate) fn method(self) -> Option<Method> {
        Some(match self {
            Self::Cat => return None,
            Self::Svd | Self::Linear => Method::TaskArithmetic,
            Self::Ties | Self::TiesSvd => Method::Ties,
            Self::DareLinear | Self::DareLinearSvd => Method::DareLinear,
            Self::DareTies | Self::DareTiesSvd => Method::DareTies,
            Self::MagnitudePrune | Self::MagnitudePruneSvd => Method::MagnitudePrune,
        })
    }
}

impl fmt::Display for Combination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Combination {
    type Err = NnError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|c| c.as_str()).collect();
                NnError::config(
                    "combination_type",
                    format!("one of {}", names.join(", ")),
                    format!("{s:?}"),
                )
            })
    }
}

/// How TIES elects each entry's sign (PEFT's `majority_sign_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MajoritySignMethod {
    /// `"total"`: the sign of the sum of the (pruned, unweighted) task tensors.
    #[default]
    Total,
    /// `"frequency"`: the sign held by more task tensors.
    Frequency,
}

impl MajoritySignMethod {
    /// PEFT's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::Frequency => "frequency",
        }
    }
}

impl fmt::Display for MajoritySignMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MajoritySignMethod {
    type Err = NnError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "total" => Ok(Self::Total),
            "frequency" => Ok(Self::Frequency),
            _ => Err(NnError::config(
                "majority_sign_method",
                "\"total\" or \"frequency\"",
                format!("{s:?}"),
            )),
        }
    }
}

/// The settings of `add_weighted_adapter` besides the combination (PEFT's keyword
/// arguments). `svd_full_matrices` and `svd_driver` have no counterpart: the truncated
/// result does not depend on the first, and the second picks a cuSOLVER routine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergeOptions {
    /// Fraction of entries kept by the pruning combinations, in `[0, 1]`; required by
    /// them, ignored by `svd`, `linear` and `cat`. At `1` nothing is pruned (and DARE
    /// does not rescale), as PEFT.
    pub density: Option<f64>,
    /// Sign election of the TIES combinations.
    pub majority_sign_method: MajoritySignMethod,
    /// Rank of an SVD combination's result (default: the largest source rank); at least
    /// 1 and at most `min(out, in)`.
    pub svd_rank: Option<usize>,
    /// Quantile `q` in `[0, 1]`: an SVD combination's factors are clamped to
    /// `[-h, h]`, `h` the `q`-quantile of all their entries (default: no clamp).
    pub svd_clamp: Option<f64>,
    /// Seed of DARE's random masks. legora cannot reproduce torch's generator, so a DARE
    /// merge equals PEFT's only in distribution, or exactly when PEFT's masks are given
    /// ([`LoraLinear::add_weighted_adapter_with_masks`](crate::LoraLinear::add_weighted_adapter_with_masks)).
    pub seed: u64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self {
            density: None,
            majority_sign_method: MajoritySignMethod::Total,
            svd_rank: None,
            svd_clamp: None,
            seed: 0,
        }
    }
}

impl MergeOptions {
    /// With `density`.
    pub fn with_density(mut self, density: f64) -> Self {
        self.density = Some(density);
        self
    }

    /// With `majority_sign_method`.
    pub fn with_majority_sign_method(mut self, method: MajoritySignMethod) -> Self {
        self.majority_sign_method = method;
        self
    }

    /// With `svd_rank`.
    pub fn with_svd_rank(mut self, rank: usize) -> Self {
        self.svd_rank = Some(rank);
        self
    }

    /// With `svd_clamp`.
    pub fn with_svd_clamp(mut self, quantile: f64) -> Self {
        self.svd_clamp = Some(quantile);
        self
    }

    /// With DARE's `seed`.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The same options with the seed mixed with a module path, so that every module of
    /// a model draws its own DARE masks from one user seed.
    pub fn for_module(mut self, path: &str) -> Self {
        // FNV-1a of the path, then one SplitMix64 step of seed ^ hash.
        let hash = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        self.seed = SplitMix64(self.seed ^ hash).next_u64();
        self
    }

    /// Check the options `combination` reads: `density` in `[0, 1]` (and present when
    /// needed), `svd_clamp` in `[0, 1]`, `svd_rank` at least 1.
    pub fn validate(&self, combination: Combination) -> Result<()> {
        if let Some(d) = self.density {
            if !(0.0..=1.0).contains(&d) {
                return Err(NnError::config("density", "a value in [0, 1]", d));
            }
        } else if combination.uses_density() {
            return Err(NnError::config(
                "density",
                format!("a value in [0, 1] for \"{combination}\""),
                "none",
            ));
        }
        if !combination.uses_svd() {
            return Ok(());
        }
        if let Some(q) = self.svd_clamp {
            if !(0.0..=1.0).contains(&q) {
                return Err(NnError::config("svd_clamp", "a quantile in [0, 1]", q));
            }
        }
        if self.svd_rank == Some(0) {
            return Err(NnError::config("svd_rank", "at least 1", 0));
        }
        Ok(())
    }
}

/// SplitMix64, the generator of DARE's masks (small, seedable, good enough for masks).
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Where DARE's keep-masks come from, in the order PEFT draws them.
#[derive(Debug)]
pub(crate) enum Masks<'a> {
    /// `torch.bernoulli(full(density))`'s counterpart: keep where `u < density`.
    Seeded(SplitMix64),
    /// Given masks, consumed in order.
    Given(std::slice::Iter<'a, Vec<bool>>),
}

impl Masks<'_> {
    /// The next keep-mask for a task tensor of `len` entries.
    fn draw(&mut self, len: usize, density: f64) -> Result<Vec<bool>> {
        match self {
            Self::Seeded(rng) => Ok((0..len).map(|_| rng.next_f64() < density).collect()),
            Self::Given(it) => {
                let mask = it.next().ok_or_else(|| {
                    NnError::config("masks", "one mask per pruned task tensor", "too few")
                })?;
                if mask.len() != len {
                    return Err(NnError::shape("DARE mask", &[len], &[mask.len()]));
                }
                Ok(mask.clone())
            }
        }
    }

    /// Given masks must all be used.
    pub(crate) fn finish(self) -> Result<()> {
        match self {
            Self::Given(it) if it.len() > 0 => Err(NnError::config(
                "masks",
                "one mask per pruned task tensor",
                format!("{} left over", it.len()),
            )),
            _ => Ok(()),
        }
    }
}

/// PEFT's `task_arithmetic`: `Σ wᵢ·tᵢ`.
pub fn task_arithmetic(tensors: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    let len = tensors.first().map_or(0, Vec::len);
    let mut out = vec![0.0; len];
    for (t, w) in tensors.iter().zip(weights) {
        for (o, x) in out.iter_mut().zip(t) {
            *o += w * x;
        }
    }
    out
}

/// PEFT's `magnitude_based_pruning` behind `prune(.., "magnitude")`: keep the
/// `⌊density·len⌋` entries of largest magnitude (ties broken towards the lower index;
/// `torch.topk` leaves that order unspecified), zero the rest; `density ≥ 1` keeps all.
pub fn magnitude_based_pruning(tensor: &[f64], density: f64) -> Vec<f64> {
    if density >= 1.0 {
        return tensor.to_vec();
    }
    let k = (density * tensor.len() as f64) as usize;
    let mut order: Vec<usize> = (0..tensor.len()).collect();
    order.sort_by(|&a, &b| tensor[b].abs().total_cmp(&tensor[a].abs()).then(a.cmp(&b)));
    let mut out = vec![0.0; tensor.len()];
    for &i in &order[..k] {
        out[i] = tensor[i];
    }
    out
}

/// PEFT's `random_pruning(rescale=True)` with the keep-mask given: `t·mask / density`.
/// At `density = 0` every entry is dropped and the result is zero (PEFT divides by zero
/// there and returns NaN).
pub fn random_pruning(tensor: &[f64], density: f64, keep: &[bool]) -> Vec<f64> {
    tensor
        .iter()
        .zip(keep)
        .map(|(x, &k)| if k { x / density } else { 0.0 })
        .collect()
}

/// PEFT's `calculate_majority_sign_mask`: per entry, which task tensors have the majority
/// sign (`+1` where the total — or, for `frequency`, the sign count — is `≥ 0`).
/// A zero entry has sign 0 and is never in the majority.
pub fn majority_sign_mask(tensors: &[Vec<f64>], method: MajoritySignMethod) -> Vec<Vec<bool>> {
    let len = tensors.first().map_or(0, Vec::len);
    let sign = |x: f64| if x == 0.0 { 0.0 } else { x.signum() };
    let majority: Vec<f64> = (0..len)
        .map(|j| {
            let m: f64 = match method {
                MajoritySignMethod::Total => tensors.iter().map(|t| t[j]).sum(),
                MajoritySignMethod::Frequency => tensors.iter().map(|t| sign(t[j])).sum(),
            };
            if m >= 0.0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect();
    tensors
        .iter()
        .map(|t| {
            t.iter()
                .zip(&majority)
                .map(|(x, m)| sign(*x) == *m)
                .collect()
        })
        .collect()
}

/// PEFT's `disjoint_merge`: per entry, the sum of the entries in the majority divided by
/// how many there are (at least 1).
pub fn disjoint_merge(weighted: &[Vec<f64>], mask: &[Vec<bool>]) -> Vec<f64> {
    let len = weighted.first().map_or(0, Vec::len);
    (0..len)
        .map(|j| {
            let (sum, count) = weighted
                .iter()
                .zip(mask)
                .filter(|(_, m)| m[j])
                .fold((0.0, 0usize), |(s, c), (t, _)| (s + t[j], c + 1));
            sum / count.max(1) as f64
        })
        .collect()
}

fn weighted(tensors: &[Vec<f64>], weights: &[f64]) -> Vec<Vec<f64>> {
    tensors
        .iter()
        .zip(weights)
        .map(|(t, w)| t.iter().map(|x| x * w).collect())
        .collect()
}

/// PEFT's `magnitude_prune`: magnitude pruning of each task tensor, then `Σ wᵢ·tᵢ`.
pub fn magnitude_prune(tensors: &[Vec<f64>], weights: &[f64], density: f64) -> Vec<f64> {
    let pruned: Vec<Vec<f64>> = tensors
        .iter()
        .map(|t| magnitude_based_pruning(t, density))
        .collect();
    task_arithmetic(&pruned, weights)
}

/// PEFT's `ties`: magnitude pruning, sign election on the pruned tensors, disjoint mean
/// of the weighted ones.
pub fn ties(
    tensors: &[Vec<f64>],
    weights: &[f64],
    density: f64,
    method: MajoritySignMethod,
) -> Vec<f64> {
    let pruned: Vec<Vec<f64>> = tensors
        .iter()
        .map(|t| magnitude_based_pruning(t, density))
        .collect();
    elect_and_merge(&pruned, weights, method)
}

fn elect_and_merge(pruned: &[Vec<f64>], weights: &[f64], method: MajoritySignMethod) -> Vec<f64> {
    let mask = majority_sign_mask(pruned, method);
    disjoint_merge(&weighted(pruned, weights), &mask)
}

/// DARE's pruning of every task tensor with its keep-mask (none drawn at `density ≥ 1`,
/// where PEFT does not prune).
fn dare_prune(tensors: &[Vec<f64>], density: f64, masks: &mut Masks<'_>) -> Result<Vec<Vec<f64>>> {
    if density >= 1.0 {
        return Ok(tensors.to_vec());
    }
    tensors
        .iter()
        .map(|t| Ok(random_pruning(t, density, &masks.draw(t.len(), density)?)))
        .collect()
}

/// PEFT's `dare_linear` with the keep-masks given (one per task tensor).
pub fn dare_linear(
    tensors: &[Vec<f64>],
    weights: &[f64],
    density: f64,
    keep: &[Vec<bool>],
) -> Result<Vec<f64>> {
    let mut masks = Masks::Given(keep.iter());
    let pruned = dare_prune(tensors, density, &mut masks)?;
    masks.finish()?;
    Ok(task_arithmetic(&pruned, weights))
}

/// PEFT's `dare_ties` with the keep-masks given (one per task tensor).
pub fn dare_ties(
    tensors: &[Vec<f64>],
    weights: &[f64],
    density: f64,
    method: MajoritySignMethod,
    keep: &[Vec<bool>],
) -> Result<Vec<f64>> {
    let mut masks = Masks::Given(keep.iter());
    let pruned = dare_prune(tensors, density, &mut masks)?;
    masks.finish()?;
    Ok(elect_and_merge(&pruned, weights, method))
}

/// Apply `method` to the task tensors, drawing DARE masks from `masks`.
pub(crate) fn apply(
    method: Method,
    tensors: &[Vec<f64>],
    weights: &[f64],
    opts: &MergeOptions,
    masks: &mut Masks<'_>,
) -> Result<Vec<f64>> {
    let density = opts.density.unwrap_or(1.0);
    let sign = opts.majority_sign_method;
    Ok(match method {
        Method::TaskArithmetic => task_arithmetic(tensors, weights),
        Method::MagnitudePrune => magnitude_prune(tensors, weights, density),
        Method::Ties => ties(tensors, weights, density, sign),
        Method::DareLinear => task_arithmetic(&dare_prune(tensors, density, masks)?, weights),
        Method::DareTies => elect_and_merge(&dare_prune(tensors, density, masks)?, weights, sign),
    })
}

/// One source adapter on the host: `lora_A [r, in]`, `lora_B [out, r]` row-major, and
/// its scaling.
#[derive(Debug, Clone)]
pub(crate) struct HostLora {
    pub(crate) a: Vec<f64>,
    pub(crate) b: Vec<f64>,
    pub(crate) r: usize,
    pub(crate) scaling: f64,
}

/// The new adapter's `(lora_A [r, in], lora_B [out, r], r)`, scaling 1.
pub(crate) type Combined = (Vec<f64>, Vec<f64>, usize);

/// PEFT's `add_weighted_adapter` for one `[out, in]` module (the caller has checked the
/// names, the weights count and that no source is DoRA).
pub(crate) fn combine(
    srcs: &[HostLora],
    weights: &[f64],
    (d_in, d_out): (usize, usize),
    combination: Combination,
    opts: &MergeOptions,
    masks: &mut Masks<'_>,
) -> Result<Combined> {
    // PEFT: `combination_type = "linear" if len(adapters) == 1 else combination_type`
    let combination = if srcs.len() == 1 {
        Combination::Linear
    } else {
        combination
    };
    opts.validate(combination)?;
    match combination.method() {
        None => Ok(cat(srcs, weights, d_out)),
        Some(method) if combination.uses_svd() => {
            svd_combine(srcs, weights, (d_in, d_out), method, opts, masks)
        }
        Some(method) => factor_combine(srcs, weights, combination, method, opts, masks),
    }
}

/// `cat`: `A = cat(wᵢsᵢ·Aᵢ)` (rows), `B = cat(Bᵢ)` (columns).
fn cat(srcs: &[HostLora], weights: &[f64], d_out: usize) -> Combined {
    let r: usize = srcs.iter().map(|s| s.r).sum();
    let a = srcs
        .iter()
        .zip(weights)
        .flat_map(|(s, w)| s.a.iter().map(move |x| x * w * s.scaling))
        .collect();
    let mut b = Vec::with_capacity(d_out * r);
    for i in 0..d_out {
        for s in srcs {
            b.extend_from_slice(&s.b[i * s.r..(i + 1) * s.r]);
        }
    }
    (a, b, r)
}

/// PEFT's `_generalized_task_arithmetic_weighted_adapter`: A and B merged separately,
/// source `i` weighted `sign(tᵢ)·√|tᵢ|` on A and `√|tᵢ|` on B, `tᵢ = wᵢsᵢ`. DARE draws
/// the masks of every A, then of every B.
fn factor_combine(
    srcs: &[HostLora],
    weights: &[f64],
    combination: Combination,
    method: Method,
    opts: &MergeOptions,
    masks: &mut Masks<'_>,
) -> Result<Combined> {
    let r = srcs[0].r;
    if let Some(bad) = srcs.iter().find(|s| s.r != r) {
        return Err(NnError::config(
            "combination_type",
            format!("adapters of equal rank for \"{combination}\" (the first has r = {r})"),
            format!("an adapter with r = {} (use \"cat\" or \"svd\")", bad.r),
        ));
    }
    let t: Vec<f64> = srcs
        .iter()
        .zip(weights)
        .map(|(s, w)| w * s.scaling)
        .collect();
    let w_a: Vec<f64> = t
        .iter()
        .map(|t| if *t >= 0.0 { t.sqrt() } else { -(-t).sqrt() })
        .collect();
    let w_b: Vec<f64> = t.iter().map(|t| t.abs().sqrt()).collect();
    let a_parts: Vec<Vec<f64>> = srcs.iter().map(|s| s.a.clone()).collect();
    let b_parts: Vec<Vec<f64>> = srcs.iter().map(|s| s.b.clone()).collect();
    let a = apply(method, &a_parts, &w_a, opts, masks)?;
    let b = apply(method, &b_parts, &w_b, opts, masks)?;
    Ok((a, b, r))
}

/// PEFT's `_svd_generalized_task_arithmetic_weighted_adapter`: the merge of the full
/// `ΔWᵢ = sᵢ·BᵢAᵢ` weighted `wᵢ`, its top `svd_rank` singular triplets as `B = U·S`,
/// `A = Vh`, optionally clamped. DARE draws one mask per `ΔWᵢ`.
fn svd_combine(
    srcs: &[HostLora],
    weights: &[f64],
    (d_in, d_out): (usize, usize),
    method: Method,
    opts: &MergeOptions,
    masks: &mut Masks<'_>,
) -> Result<Combined> {
    let max_rank = d_in.min(d_out);
    let rank = opts
        .svd_rank
        .unwrap_or_else(|| srcs.iter().map(|s| s.r).max().unwrap_or(1));
    if rank > max_rank {
        return Err(NnError::config(
            "svd_rank",
            format!("at most min(out, in) = {max_rank}"),
            rank,
        ));
    }
    let deltas: Vec<Vec<f64>> = srcs.iter().map(|s| delta(s, d_in, d_out)).collect();
    let merged = apply(method, &deltas, weights, opts, masks)?;
    let (mut b, mut a) = svd::svd(&merged, d_out, d_in)?.truncate(rank);
    if let Some(q) = opts.svd_clamp {
        svd::clamp_quantile(&mut b, &mut a, q)?;
    }
    Ok((a, b, rank))
}

/// `ΔW = s·B·A`, row-major `[out, in]`.
fn delta(s: &HostLora, d_in: usize, d_out: usize) -> Vec<f64> {
    let mut out = vec![0.0; d_out * d_in];
    for i in 0..d_out {
        let row = &mut out[i * d_in..(i + 1) * d_in];
        for k in 0..s.r {
            let bik = s.b[i * s.r + k] * s.scaling;
            for (o, a) in row.iter_mut().zip(&s.a[k * d_in..(k + 1) * d_in]) {
                *o += bik * a;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for c in Combination::ALL {
            assert_eq!(c.as_str().parse::<Combination>().unwrap(), c);
        }
        let e = "sum".parse::<Combination>().unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("combination_type") && msg.contains("\"sum\""),
            "{msg}"
        );
        assert!(msg.contains("dare_ties_svd"), "{msg}");
        let e = "most".parse::<MajoritySignMethod>().unwrap_err();
        assert!(e.to_string().contains("majority_sign_method"), "{e}");
        assert_eq!(
            "frequency".parse::<MajoritySignMethod>().unwrap(),
            MajoritySignMethod::Frequency
        );
    }

    #[test]
    fn magnitude_pruning_keeps_the_largest_floor_density_len() {
        let t = [0.1, -0.5, 0.3, -0.2, 0.05];
        // k = int(0.5 * 5) = 2
        assert_eq!(magnitude_based_pruning(&t, 0.5), [0.0, -0.5, 0.3, 0.0, 0.0]);
        assert_eq!(magnitude_based_pruning(&t, 0.0), [0.0; 5]);
        assert_eq!(magnitude_based_pruning(&t, 1.0), t);
    }

    #[test]
    fn ties_by_hand() {
        // two task tensors, density 1 (no pruning), weights 1 and 2
        let ts = vec![vec![1.0, -2.0, 3.0], vec![-3.0, -1.0, 0.0]];
        // total: sums -2, -3, 3 -> majority -, -, +; frequency: 0, -2, 1 -> +, -, +
        let total = ties(&ts, &[1.0, 2.0], 1.0, MajoritySignMethod::Total);
        assert_eq!(total, vec![-6.0, (-2.0 - 2.0) / 2.0, 3.0]);
        let freq = ties(&ts, &[1.0, 2.0], 1.0, MajoritySignMethod::Frequency);
        assert_eq!(freq, vec![1.0, -2.0, 3.0]);
    }

    #[test]
    fn dare_rescales_the_kept_entries_and_zero_density_gives_zero() {
        let ts = vec![vec![1.0, 2.0, 3.0, 4.0]];
        let keep = vec![vec![true, false, true, false]];
        assert_eq!(
            dare_linear(&ts, &[2.0], 0.5, &keep).unwrap(),
            vec![4.0, 0.0, 12.0, 0.0]
        );
        let none = vec![vec![false; 4]];
        assert_eq!(dare_linear(&ts, &[1.0], 0.0, &none).unwrap(), vec![0.0; 4]);
        // at density 1 no mask is consumed, as PEFT draws none
        assert_eq!(dare_linear(&ts, &[1.0], 1.0, &[]).unwrap(), ts[0]);
        let e = dare_linear(&ts, &[1.0], 0.5, &[]).unwrap_err();
        assert!(e.to_string().contains("masks"), "{e}");
        let e = dare_linear(&ts, &[1.0], 0.5, &[vec![true; 3]]).unwrap_err();
        assert!(matches!(e, NnError::ShapeMismatch { .. }), "{e}");
    }

    #[test]
    fn module_seeds_differ_and_repeat() {
        let o = MergeOptions::default().with_seed(3);
        let q = o.for_module("model.layers.0.self_attn.q_proj").seed;
        let v = o.for_module("model.layers.0.self_attn.v_proj").seed;
        assert_ne!(q, v);
        assert_eq!(q, o.for_module("model.layers.0.self_attn.q_proj").seed);
    }
}
