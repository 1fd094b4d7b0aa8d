//! The tile-dequantizing products (`matmul_xwt`: `y = x·Wᵀ`, `matmul_dyw`: `dx = dy·W`)
//! against dequantize-then-multiply, for every storage format, on odd sizes: `n` = 1 to 4
//! (the decode matrix–vector products), 7, 65 (the input gradient's row tiles with
//! partial sums) and 260 (its column tiles);
//! `out` and `in` not multiples of 64 (4-bit blocks straddle rows) and larger than one
//! tile (several row tiles, several column tiles).
#![cfg(feature = "flex")]

use super::common;
use common::values;

use legora_kernels::quant::{
    matmul_dyw, matmul_xwt, Format, QuantMatrix, Storage, DYW_COLUMN_TILES_FROM,
};

/// `a [m, k] · b [k, p]` in f64, with `b` read through `(row stride, col stride)`.
fn reference(
    a: &[f32],
    b: &[f32],
    (m, k, p): (usize, usize, usize),
    b_strides: (usize, usize),
) -> Vec<f32> {
    let mut out = vec![0.0f32; m * p];
    for i in 0..m {
        for j in 0..p {
            let s: f64 = (0..k)
                .map(|t| f64::from(a[i * k + t]) * f64::from(b[t * b_strides.0 + j * b_strides.1]))
                .sum();
            out[i * p + j] = s as f32;
        }
    }
    out
}

/// Relative max error (over the largest magnitude of `want`).
fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    legora_testing::assert_close(what, got, want, 1e-5, 1e-6);
}

/// `x` as ggml's reference `Q8_0` quantizer leaves it (per 32 values: scale
/// `max|x| / 127` rounded to f16, codes rounded halves away from zero), dequantized.
fn q8_0_round_trip(x: &[f32]) -> Vec<f32> {
    x.chunks(32)
        .flat_map(|b| {
            let d = b.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            let d16 = half::f16::from_f32(d).to_f32();
            b.iter().map(move |v| (v * inv).round() * d16)
        })
        .collect()
}

/// `x·Wᵀ` and `dy·W` over `m` equal the products with its dequantization `wd`, for each
/// row count in `ns`; with `q8_decode`, `x·Wᵀ` at ≤ 4 rows is the product with `x`
/// quantized to `Q8_0` (the decoding products over Q8_0 / Q4_0 blocks, as llama.cpp's).
fn check_products_with(what: &str, m: &QuantMatrix, wd: &[f32], ns: &[usize], q8_decode: bool) {
    let (view, dout, din) = (m.view(), m.rows(), m.cols());
    for &n in ns {
        let x = values(n * din, 11 + n as u64);
        let mut y = vec![0.0f32; n * dout];
        matmul_xwt(n, &x, &view, &mut y, false).unwrap();
        let xs = if q8_decode && n <= legora_kernels::quant::MATVEC_MAX_ROWS {
            q8_0_round_trip(&x)
        } else {
            x.clone()
        };
        // y = x·Wᵀ: W [dout, din] read as [din, dout] (strides 1, din).
        let want = reference(&xs, wd, (n, din, dout), (1, din));
        assert_close(&format!("{what} n={n} x·Wᵀ"), &y, &want);

        let dy = values(n * dout, 13 + n as u64);
        let mut dx = vec![0.0f32; n * din];
        matmul_dyw(n, &dy, &view, &mut dx, false).unwrap();
        let want = reference(&dy, wd, (n, dout, din), (din, 1));
        assert_close(&format!("{what} n={n} dy·W"), &dx, &want);
    }
}

/// [`check_products_with`] over the f32 `x` at every row count.
fn check_products(what: &str, m: &QuantMatrix, wd: &[f32], ns: &[usize]) {
    check_products_with(what, m, wd, ns, false);
}

#[test]
fn products_match_dequantize_then_multiply() {
    for (dout, din) in [(300, 197), (37, 45), (9, 5)] {
        let w = values(dout * din, 7);
        for format in Format::ALL {
            let m = QuantMatrix::quantize("w", &w, dout, din, format).unwrap();
            let wd = m.dequantize();
            let many = if dout > 128 {
                DYW_COLUMN_TILES_FROM + 4
            } else {
                1
            };
            let what = format!("{} [{dout}, {din}]", format.name());
            check_products(&what, &m, &wd, &[1, 2, 3, 4, 7, 65, many]);
        }
    }
}

/// `accumulate` adds to what is there (the tile path, NF4, and the matrix–vector path,
/// bf16 at 3 rows).
#[test]
fn products_accumulate() {
    let nf4 = Format::Nf4 { double_quant: true };
    for (n, format) in [(5, nf4), (3, Format::Bf16)] {
        accumulates(n, format);
    }
}

fn accumulates(n: usize, format: Format) {
    let (dout, din) = (70, 33);
    let w = values(dout * din, 3);
    let m = QuantMatrix::quantize("w", &w, dout, din, format).unwrap();
    let x = values(n * din, 4);
    let mut fresh = vec![0.0f32; n * dout];
    matmul_xwt(n, &x, &m.view(), &mut fresh, false).unwrap();
    let mut acc = vec![1.5f32; n * dout];
    matmul_xwt(n, &x, &m.view(), &mut acc, true).unwrap();
    let want: Vec<f32> = fresh.iter().map(|v| v + 1.5).collect();
    assert_close("accumulated y", &acc, &want);

    let dy = values(n * dout, 5);
    let mut fresh = vec![0.0f32; n * din];
    matmul_dyw(n, &dy, &m.view(), &mut fresh, false).unwrap();
    let mut acc = vec![-2.0f32; n * din];
    matmul_dyw(n, &dy, &m.view(), &mut acc, true).unwrap();
    let want: Vec<f32> = fresh.iter().map(|v| v - 2.0).collect();
    assert_close("accumulated dx", &acc, &want);
}

/// Wrong slice lengths are errors, not panics.
#[test]
fn products_check_lengths() {
    let m = QuantMatrix::quantize("w", &values(6, 1), 2, 3, Format::Int8).unwrap();
    let mut y = vec![0.0f32; 4];
    let e = matmul_xwt(2, &[0.0; 5], &m.view(), &mut y, false).unwrap_err();
    assert!(
        e.to_string().contains("expected 6 elements, found 5"),
        "{e}"
    );
    let mut dx = vec![0.0f32; 5];
    let e = matmul_dyw(2, &[0.0; 4], &m.view(), &mut dx, false).unwrap_err();
    assert!(
        e.to_string().contains("expected 6 elements, found 5"),
        "{e}"
    );
}

/// GGUF blocks kept as storage: the dequantization of any span equals decoding whole rows
/// (`dequantize_row`, bit-exact with the `gguf` package), and the tile products equal
/// dequantize-then-multiply, on odd row counts and rows of several blocks (cut by tiles);
/// the decoding products over Q8_0 / Q4_0 equal the products with `x` quantized to Q8_0
/// (llama.cpp's integer dot products), or with `x` as it is when exact decoding is asked.
#[test]
fn ggml_block_products_match_dequantize_then_multiply() {
    use legora_kernels::quant::ggml::{dequantize_row, GgmlType};
    for (ty, _) in common::GGML_BLOCKS {
        let bs = ty.block_size();
        // one and two rows too: their bytes end in padding to whole i32 words
        for (dout, din) in [
            (37, 3 * bs.max(32)),
            (130, 2 * bs.max(160)),
            (1, bs),
            (2, bs),
        ] {
            let din = din.next_multiple_of(bs);
            let m = common::ggml_matrix(ty, dout, din, 17);
            let what = format!("{} [{dout}, {din}]", ty.name());
            let wd = m.dequantize();
            let Storage::Ggml { data, .. } = m.storage() else {
                panic!("{what}: GGML storage")
            };
            let row_bytes = data.len() / dout;
            let mut row = vec![0.0f32; din];
            for r in 0..dout {
                dequantize_row(ty, &data[r * row_bytes..(r + 1) * row_bytes], &mut row).unwrap();
                assert_eq!(&wd[r * din..(r + 1) * din], &row[..], "{what} row {r}");
            }
            assert!(wd.iter().all(|v| v.is_finite()), "{what}");
            assert_eq!(m.format(), Format::Ggml(ty));
            assert_eq!(m.bytes(), data.len());
            let q8 = matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0);
            check_products_with(&what, &m, &wd, &[1, 2, 3, 4, 7, 65], q8);
            // asked for, decoding keeps f32 activations
            let exact = m.clone().with_exact_decode(true);
            check_products(&format!("{what} exact decode"), &exact, &wd, &[1, 3]);
        }
    }
}

/// GGML storage is refused where it cannot hold the weight: rows that are not whole
/// blocks, too few bytes, a type legora does not decode; and nothing quantizes into it.
#[test]
fn ggml_storage_checks_its_sizes() {
    use legora_kernels::quant::ggml::GgmlType;
    let bad = |ty, rows, cols, len| {
        let data = vec![0u8; len].into();
        QuantMatrix::new("w", rows, cols, Storage::Ggml { ty, data })
            .unwrap_err()
            .to_string()
    };
    assert!(bad(GgmlType::Q8_0, 2, 48, 200).contains("multiple of the block size"));
    assert!(bad(GgmlType::Q8_0, 2, 64, 135).contains("136"));
    assert!(bad(GgmlType::F32, 2, 64, 512).contains("F32"));
    let e = QuantMatrix::quantize("w", &values(64, 1), 1, 64, Format::Ggml(GgmlType::Q4_K));
    assert!(e.unwrap_err().to_string().contains("Q4_K"));
}
