//! A small singular value decomposition in f64 over host vectors (one-sided Jacobi,
//! Hestenes' method), for `add_weighted_adapter`'s `svd` combinations, and PEFT's
//! quantile clamp of the factors.
//!
//! Matrices are row-major `Vec<f64>`s. The decomposition is the thin one,
//! `M [m, n] = U [m, k] · diag(S [k]) · Vh [k, n]` with `k = min(m, n)`, singular values
//! in descending order. Singular vectors are unique only up to sign (and within a
//! repeated singular value up to rotation), so compare products, not factors.

use crate::error::{NnError, Result};

/// Sweeps after which a decomposition that still rotates is reported as not converged
/// (one-sided Jacobi converges quadratically; a handful of sweeps is typical).
const MAX_SWEEPS: usize = 80;

/// A thin SVD `M = U · diag(s) · Vh` of an `[m, n]` matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Svd {
    /// Left singular vectors, row-major `[m, k]` (a column of zeros for a zero singular
    /// value).
    pub u: Vec<f64>,
    /// Singular values, descending, `[k]`.
    pub s: Vec<f64>,
    /// Right singular vectors as rows, row-major `[k, n]`.
    pub vh: Vec<f64>,
    /// Rows of the matrix.
    pub m: usize,
    /// Columns of the matrix.
    pub n: usize,
}

impl Svd {
    /// `k = min(m, n)`, the number of singular values.
    pub fn k(&self) -> usize {
        self.s.len()
    }

    /// The rank-`r` truncation as PEFT builds its new adapter:
    /// `(U[:, :r]·diag(S[:r]), Vh[:r, :])`, i.e. `(lora_B [m, r], lora_A [r, n])`.
    /// `r` is capped at `k`.
    pub fn truncate(&self, r: usize) -> (Vec<f64>, Vec<f64>) {
        let (k, r) = (self.k(), r.min(self.k()));
        let mut us = Vec::with_capacity(self.m * r);
        for i in 0..self.m {
            us.extend((0..r).map(|j| self.u[i * k + j] * self.s[j]));
        }
        (us, self.vh[..r * self.n].to_vec())
    }
}

/// The thin SVD of the row-major `[m, n]` matrix `a`.
///
/// Errors when `a` does not hold `m·n` values, holds a non-finite value, or (never seen
/// in practice) the rotations do not settle within a bounded number of sweeps.
pub fn svd(a: &[f64], m: usize, n: usize) -> Result<Svd> {
    if a.len() != m * n {
        return Err(NnError::shape("svd input", &[m, n], &[a.len()]));
    }
    if let Some(bad) = a.iter().find(|v| !v.is_finite()) {
        return Err(NnError::config("delta weight", "finite values", bad));
    }
    if m >= n {
        let cols = (0..n)
            .map(|j| (0..m).map(|i| a[i * n + j]).collect())
            .collect();
        let (u, s, v) = jacobi(cols, m)?;
        Ok(assemble(&u, s, &v, m, n))
    } else {
        // Mᵀ = U'·S·V'ᵀ, so M = V'·S·U'ᵀ.
        let cols = (0..m).map(|i| a[i * n..(i + 1) * n].to_vec()).collect();
        let (u_t, s, v_t) = jacobi(cols, n)?;
        Ok(assemble(&v_t, s, &u_t, m, n))
    }
}

/// A matrix as its columns.
type Columns = Vec<Vec<f64>>;

/// One-sided Jacobi on the columns of a tall matrix `[len, c]` (`len ≥ c`): rotate pairs
/// of columns until all are orthogonal. Returns the unit left vectors, the singular
/// values (descending) and the right vectors, each vector a column.
fn jacobi(mut w: Columns, len: usize) -> Result<(Columns, Vec<f64>, Columns)> {
    let c = w.len();
    let mut v: Columns = (0..c)
        .map(|j| (0..c).map(|i| f64::from(u8::from(i == j))).collect())
        .collect();
    let mut converged = false;
    for _ in 0..MAX_SWEEPS {
        let mut rotated = false;
        for p in 0..c {
            for q in p + 1..c {
                rotated |= rotate(&mut w, &mut v, p, q);
            }
        }
        if !rotated {
            converged = true;
            break;
        }
    }
    if !converged {
        return Err(NnError::InvalidState(format!(
            "svd of a [{len}, {c}] matrix did not converge in {MAX_SWEEPS} sweeps"
        )));
    }
    let mut order: Vec<(f64, usize)> = w.iter().map(|col| (norm(col), 0)).collect();
    for (j, o) in order.iter_mut().enumerate() {
        o.1 = j;
    }
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let s: Vec<f64> = order.iter().map(|o| o.0).collect();
    let u = order
        .iter()
        .map(|&(sigma, j)| {
            let scale = if sigma > 0.0 { 1.0 / sigma } else { 0.0 };
            w[j].iter().map(|x| x * scale).collect()
        })
        .collect();
    let v = order.iter().map(|&(_, j)| v[j].clone()).collect();
    Ok((u, s, v))
}

/// Orthogonalise columns `p` and `q` of `w` by one Jacobi rotation (applied to `v` too);
/// `false` when they already are orthogonal to working precision.
fn rotate(w: &mut Columns, v: &mut Columns, p: usize, q: usize) -> bool {
    let alpha = dot(&w[p], &w[p]);
    let beta = dot(&w[q], &w[q]);
    let gamma = dot(&w[p], &w[q]);
    if gamma == 0.0 || gamma.abs() <= f64::EPSILON * (alpha * beta).sqrt() {
        return false;
    }
    let zeta = (beta - alpha) / (2.0 * gamma);
    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
    let cos = 1.0 / (1.0 + t * t).sqrt();
    let sin = cos * t;
    apply(w, p, q, cos, sin);
    apply(v, p, q, cos, sin);
    true
}

/// `(x_p, x_q) ← (c·x_p − s·x_q, s·x_p + c·x_q)`.
fn apply(x: &mut Columns, p: usize, q: usize, cos: f64, sin: f64) {
    let (left, right) = x.split_at_mut(q);
    for (a, b) in left[p].iter_mut().zip(right[0].iter_mut()) {
        let (xa, xb) = (*a, *b);
        *a = cos * xa - sin * xb;
        *b = sin * xa + cos * xb;
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// Row-major `U [m, k]` from left columns and `Vh [k, n]` from right columns.
fn assemble(left: &Columns, s: Vec<f64>, right: &Columns, m: usize, n: usize) -> Svd {
    let k = s.len();
    let mut u = vec![0.0; m * k];
    for (j, col) in left.iter().enumerate() {
        for (i, x) in col.iter().enumerate() {
            u[i * k + j] = *x;
        }
    }
    let vh = right.iter().flatten().copied().collect();
    Svd { u, s, vh, m, n }
}

/// `torch.quantile(values, q)` (linear interpolation between the sorted values).
///
/// `values` must be non-empty and `q` in `[0, 1]` (checked by the caller).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// PEFT's `svd_clamp`: `hi = quantile(cat(B.flatten(), A.flatten()), q)`, then every entry
/// of both factors clamped to `[-hi, hi]` (in place).
///
/// Errors when `q` is outside `[0, 1]` (as `torch.quantile`) or both factors are empty.
pub fn clamp_quantile(lora_b: &mut [f64], lora_a: &mut [f64], q: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&q) {
        return Err(NnError::config("svd_clamp", "a quantile in [0, 1]", q));
    }
    let all: Vec<f64> = lora_b.iter().chain(lora_a.iter()).copied().collect();
    if all.is_empty() {
        return Err(NnError::config("svd_clamp", "non-empty factors", "empty"));
    }
    let hi = quantile(&all, q);
    // torch.clamp(min = -hi, max = hi) applies min then max: for hi < 0 every entry is hi.
    for x in lora_b.iter_mut().chain(lora_a.iter_mut()) {
        *x = x.max(-hi).min(hi);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random matrix in [-1, 1).
    fn matrix(m: usize, n: usize, seed: u64) -> Vec<f64> {
        let mut state = seed;
        (0..m * n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
    }

    fn reconstruct(d: &Svd) -> Vec<f64> {
        let (us, vh) = d.truncate(d.k());
        let k = d.k();
        let mut out = vec![0.0; d.m * d.n];
        for i in 0..d.m {
            for j in 0..d.n {
                out[i * d.n + j] = (0..k).map(|l| us[i * k + l] * vh[l * d.n + j]).sum();
            }
        }
        out
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// Columns of U (rows of Vh when `rows`) are orthonormal.
    fn orthonormal(x: &[f64], count: usize, len: usize, rows: bool) -> f64 {
        let at = |v: usize, i: usize| {
            if rows {
                x[v * len + i]
            } else {
                x[i * count + v]
            }
        };
        let mut worst: f64 = 0.0;
        for a in 0..count {
            for b in 0..count {
                let d: f64 = (0..len).map(|i| at(a, i) * at(b, i)).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                worst = worst.max((d - want).abs());
            }
        }
        worst
    }

    #[test]
    fn tall_wide_and_square_matrices_are_reconstructed_with_orthonormal_factors() {
        for (m, n) in [(7, 4), (4, 7), (6, 6), (1, 5), (5, 1)] {
            let a = matrix(m, n, (m * 31 + n) as u64);
            let d = svd(&a, m, n).unwrap();
            assert_eq!(
                (d.k(), d.u.len(), d.vh.len()),
                (m.min(n), m * d.k(), d.k() * n)
            );
            assert!(max_diff(&reconstruct(&d), &a) < 1e-12, "[{m}, {n}]");
            assert!(
                orthonormal(&d.u, d.k(), m, false) < 1e-12,
                "U of [{m}, {n}]"
            );
            assert!(
                orthonormal(&d.vh, d.k(), n, true) < 1e-12,
                "Vh of [{m}, {n}]"
            );
            assert!(
                d.s.windows(2).all(|w| w[0] >= w[1]),
                "descending: {:?}",
                d.s
            );
        }
    }

    #[test]
    fn known_singular_values() {
        // [[3, 0], [4, 5]]: AᵀA = [[25, 20], [20, 25]], eigenvalues 45 and 5.
        let d = svd(&[3.0, 0.0, 4.0, 5.0], 2, 2).unwrap();
        assert!((d.s[0] - 45f64.sqrt()).abs() < 1e-14, "{:?}", d.s);
        assert!((d.s[1] - 5f64.sqrt()).abs() < 1e-14, "{:?}", d.s);
        // a diagonal matrix with its values out of order
        let d = svd(&[1.0, 0.0, 0.0, 0.0, -3.0, 0.0, 0.0, 0.0, 2.0], 3, 3).unwrap();
        assert_eq!(d.s, vec![3.0, 2.0, 1.0]);
    }

    #[test]
    fn a_rank_deficient_matrix_has_zero_trailing_values_and_truncates_exactly() {
        // rank 2: the product of [6, 2] and [2, 5]
        let (l, r) = (matrix(6, 2, 1), matrix(2, 5, 2));
        let a: Vec<f64> = (0..30)
            .map(|x| (0..2).map(|k| l[(x / 5) * 2 + k] * r[k * 5 + x % 5]).sum())
            .collect();
        let d = svd(&a, 6, 5).unwrap();
        assert!(d.s[2..].iter().all(|s| *s < 1e-12), "{:?}", d.s);
        let (us, vh) = d.truncate(2);
        let back: Vec<f64> = (0..30)
            .map(|x| {
                (0..2)
                    .map(|k| us[(x / 5) * 2 + k] * vh[k * 5 + x % 5])
                    .sum()
            })
            .collect();
        assert!(max_diff(&back, &a) < 1e-12);
        // the zero matrix
        let z = svd(&[0.0; 6], 2, 3).unwrap();
        assert_eq!(z.s, vec![0.0, 0.0]);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(
            svd(&[1.0; 5], 2, 3),
            Err(NnError::ShapeMismatch { .. })
        ));
        let e = svd(&[1.0, f64::NAN, 0.0, 1.0], 2, 2).unwrap_err();
        assert!(e.to_string().contains("finite"), "{e}");
    }

    #[test]
    fn quantile_interpolates_like_torch() {
        // torch.quantile(tensor([1., 2., 3., 4.]), 0.5) = 2.5; q = 1/3 -> 2.0
        assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 0.5), 2.5);
        assert!((quantile(&[4.0, 1.0, 3.0, 2.0], 1.0 / 3.0) - 2.0).abs() < 1e-15);
        assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 1.0), 4.0);
        let (mut b, mut a) = (vec![-5.0, 1.0], vec![0.5, 3.0]);
        clamp_quantile(&mut b, &mut a, 0.5).unwrap(); // hi = 0.75
        assert_eq!((b, a), (vec![-0.75, 0.75], vec![0.5, 0.75]));
        let e = clamp_quantile(&mut [1.0], &mut [], 1.5).unwrap_err();
        assert!(e.to_string().contains("svd_clamp"), "{e}");
    }
}
