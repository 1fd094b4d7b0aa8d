//! Products with a frozen weight kept in its storage format, on the CPU: `x·Wᵀ` (the
//! forward) and `dy·W` (the input gradient), with `W` dequantized one tile at a time into
//! a per-thread f32 scratch buffer that `gemm` then reads. `W` never exists whole in f32;
//! the tiles run in parallel (rayon), each with a single-threaded `gemm`.
//!
//! - forward: a tile is [`ROW_TILE`] rows of `W` × all columns (a contiguous flat range),
//!   giving the matching [`ROW_TILE`] columns of `y`;
//! - input gradient, many rows (`n ≥` [`DYW_COLUMN_TILES_FROM`]): a tile is all rows × a
//!   block of columns of `W`, giving that block of columns of `dx` (no reduction);
//! - input gradient, few rows: a tile is [`ROW_TILE`] rows of `W` (as in the forward),
//!   each giving a partial `dx` summed into one accumulator per rayon split, then
//!   reduced (with few rows the accumulators are small, and the products too skinny for
//!   column tiles to pay: measured 3–4× faster at `n = 1..64`).
//!
//! f32 weights are not copied: the forward and the many-row input gradient are one
//! multi-threaded `gemm` on the weight itself, the few-row input gradient reads its row
//! tiles in place.

use rayon::prelude::*;

use super::{gemm, gemm_with, matvec, SendPtr};
use crate::quant::{QuantView, ViewData};
use crate::{KernelError, Result};

/// Rows of `W` per row tile. Measured on 2 threads at `n = 512, in = 896, out = 4864`
/// (NF4, `benches/quant_products.rs`, a shared machine): tiles of 32–512 rows (and
/// column tiles of 32–256) all land within the run-to-run noise, 0.9–1.2× the f32
/// product; 128 keeps the scratch (128 × in f32) small.
pub const ROW_TILE: usize = 128;

/// Most columns of `W` per column tile of the input-gradient product (fewer when the
/// weight is narrow, so that every thread gets several tiles).
pub const COL_TILE: usize = 128;

/// From this many rows of `dy` on, the input gradient uses column tiles; below, row
/// tiles with partial sums (the crossover measured at the shape above lies between 256
/// and 512).
pub const DYW_COLUMN_TILES_FROM: usize = 256;

/// `y[n, out] (+)= x[n, in] · Wᵀ` for `W` `[out, in]` in any storage format
/// (`accumulate`: add to `y` instead of overwriting it).
///
/// # Shapes
/// - x: `[n, in]`, w: `[out, in]`, y: `[n, out]`
pub fn matmul_xwt(
    n: usize,
    x: &[f32],
    w: &QuantView<'_>,
    y: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    let (dout, din) = (w.rows(), w.cols());
    check("matmul_xwt x", n * din, x.len())?;
    check("matmul_xwt y", n * dout, y.len())?;
    xwt(n, x, w, y, accumulate);
    Ok(())
}

/// `dx[n, in] (+)= dy[n, out] · W` for `W` `[out, in]` in any storage format
/// (`accumulate`: add to `dx` instead of overwriting it).
///
/// # Shapes
/// - dy: `[n, out]`, w: `[out, in]`, dx: `[n, in]`
pub fn matmul_dyw(
    n: usize,
    dy: &[f32],
    w: &QuantView<'_>,
    dx: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    let (dout, din) = (w.rows(), w.cols());
    check("matmul_dyw dy", n * dout, dy.len())?;
    check("matmul_dyw dx", n * din, dx.len())?;
    dyw(n, dy, w, dx, accumulate);
    Ok(())
}

/// The frozen part's output `bias + x·Wᵀ` `[n, out]` (what `base_forward` computes for
/// an f32 weight).
///
/// # Shapes
/// - x: `[n, in]`, w: `[out, in]`, bias: `[out]` → `[n, out]`
pub(crate) fn base_forward(
    x: &[f32],
    w: &QuantView<'_>,
    bias: Option<&[f32]>,
    n: usize,
) -> Vec<f32> {
    let mut y = match bias {
        Some(bias) => bias.repeat(n),
        None => vec![0.0f32; n * w.rows()],
    };
    xwt(n, x, w, &mut y, bias.is_some());
    y
}

/// `dY·W`, `[n, in]`: the input gradient of the frozen part.
///
/// # Shapes
/// - dy: `[n, out]`, w: `[out, in]` → `[n, in]`
pub(crate) fn base_dx(dy: &[f32], w: &QuantView<'_>, n: usize) -> Vec<f32> {
    let mut dx = vec![0.0f32; n * w.cols()];
    dyw(n, dy, w, &mut dx, false);
    dx
}

/// [`matmul_xwt`] on checked sizes.
fn xwt(n: usize, x: &[f32], w: &QuantView<'_>, y: &mut [f32], accumulate: bool) {
    let (dout, din) = (w.rows(), w.cols());
    if n == 0 || dout == 0 {
        return;
    }
    if din == 0 {
        if !accumulate {
            y.fill(0.0);
        }
        return;
    }
    if n <= matvec::MATVEC_MAX_ROWS && matvec::supports(w) {
        matvec::xwt(n, x, w, y, accumulate);
        return;
    }
    if let ViewData::F32(wf) = w.data() {
        // SAFETY: x [n, din], wf [dout, din] read as Wᵀ, y [n, dout]; sizes checked.
        unsafe {
            gemm_with(
                gemm::Parallelism::Rayon(0),
                (n, dout, din),
                y.as_mut_ptr(),
                dout,
                accumulate,
                (x.as_ptr(), din, 1),
                (wf.as_ptr(), 1, din),
                1.0,
            );
        }
        return;
    }
    let y_p = SendPtr(y.as_mut_ptr());
    let tiles = dout.div_ceil(ROW_TILE);
    (0..tiles)
        .into_par_iter()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, t| {
            let r0 = t * ROW_TILE;
            let rows = ROW_TILE.min(dout - r0);
            buf.resize(rows * din, 0.0);
            w.dequantize_tile(r0, rows, 0, buf);
            // SAFETY: tile t owns columns r0..r0+rows of y (row stride dout); buf holds
            // rows × din, read as its transpose; x is [n, din].
            unsafe {
                gemm(
                    (n, rows, din),
                    y_p.get().add(r0),
                    dout,
                    accumulate,
                    (x.as_ptr(), din, 1),
                    (buf.as_ptr(), 1, din),
                    1.0,
                );
            }
        });
}

/// [`matmul_dyw`] on checked sizes.
fn dyw(n: usize, dy: &[f32], w: &QuantView<'_>, dx: &mut [f32], accumulate: bool) {
    let (dout, din) = (w.rows(), w.cols());
    if n == 0 || din == 0 {
        return;
    }
    if dout == 0 {
        if !accumulate {
            dx.fill(0.0);
        }
        return;
    }
    if n < DYW_COLUMN_TILES_FROM {
        dyw_row_tiles(n, dy, w, dx, accumulate);
        return;
    }
    if let ViewData::F32(wf) = w.data() {
        // SAFETY: dy [n, dout], wf [dout, din], dx [n, din]; sizes checked.
        unsafe {
            gemm_with(
                gemm::Parallelism::Rayon(0),
                (n, din, dout),
                dx.as_mut_ptr(),
                din,
                accumulate,
                (dy.as_ptr(), dout, 1),
                (wf.as_ptr(), din, 1),
                1.0,
            );
        }
        return;
    }
    let width = col_tile(din);
    let dx_p = SendPtr(dx.as_mut_ptr());
    let tiles = din.div_ceil(width);
    (0..tiles)
        .into_par_iter()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, t| {
            let c0 = t * width;
            let cols = width.min(din - c0);
            buf.resize(dout * cols, 0.0);
            w.dequantize_tile(0, dout, c0, buf);
            // SAFETY: tile t owns columns c0..c0+cols of dx (row stride din); buf holds
            // W[:, c0..c0+cols] as [dout, cols]; dy is [n, dout].
            unsafe {
                gemm(
                    (n, cols, dout),
                    dx_p.get().add(c0),
                    din,
                    accumulate,
                    (dy.as_ptr(), dout, 1),
                    (buf.as_ptr(), cols, 1),
                    1.0,
                );
            }
        });
}

/// The input gradient from row tiles: tile `t` adds `dy[:, rows of t] · W[rows of t, :]`
/// to its split's accumulator `[n, in]`; the accumulators are then summed.
fn dyw_row_tiles(n: usize, dy: &[f32], w: &QuantView<'_>, dx: &mut [f32], accumulate: bool) {
    let (dout, din) = (w.rows(), w.cols());
    let tiles = dout.div_ceil(ROW_TILE);
    // At most about four splits (so four accumulators) per thread.
    let min_len = tiles.div_ceil(4 * rayon::current_num_threads().max(1));
    let sum = (0..tiles)
        .into_par_iter()
        .with_min_len(min_len)
        .fold(
            || (vec![0.0f32; n * din], Vec::<f32>::new()),
            |(mut acc, mut buf), t| {
                let r0 = t * ROW_TILE;
                let rows = ROW_TILE.min(dout - r0);
                let tile = match w.data() {
                    ViewData::F32(wf) => &wf[r0 * din..(r0 + rows) * din],
                    _ => {
                        buf.resize(rows * din, 0.0);
                        w.dequantize_tile(r0, rows, 0, &mut buf);
                        &buf[..]
                    }
                };
                // SAFETY: acc is this split's own [n, din]; dy [n, dout] read from column
                // r0 (rows columns); tile holds W[r0..r0+rows, :] as [rows, din].
                unsafe {
                    gemm(
                        (n, din, rows),
                        acc.as_mut_ptr(),
                        din,
                        true,
                        (dy.as_ptr().add(r0), dout, 1),
                        (tile.as_ptr(), din, 1),
                        1.0,
                    );
                }
                (acc, buf)
            },
        )
        .map(|(acc, _)| acc)
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        });
    match (sum, accumulate) {
        (Some(s), true) => dx.iter_mut().zip(&s).for_each(|(x, y)| *x += y),
        (Some(s), false) => dx.copy_from_slice(&s),
        (None, true) => {}
        (None, false) => dx.fill(0.0),
    }
}

/// Columns per input-gradient tile: at most [`COL_TILE`], few enough that each thread
/// gets about four tiles, a multiple of 16, at least 32.
fn col_tile(din: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let per = din.div_ceil(4 * threads).next_multiple_of(16);
    per.clamp(32, COL_TILE)
}

/// A length check for the products' slices.
fn check(what: &str, expected: usize, found: usize) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(KernelError::Length {
            what: what.to_string(),
            expected,
            found,
        })
    }
}
