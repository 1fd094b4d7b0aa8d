//! The packed attention of continuous batching: the fused kernel against the reference
//! path, against [`legora_kernels::attention`] over each sequence alone (bit for bit:
//! the same products and masking), and its in-place cache writes.

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use legora_kernels::{self as k, reference, KvSeq};

/// Values in [-2, 2) from a local SplitMix64 (tests run in parallel).
fn random(shape: &[usize], seed: u64) -> Tensor<Flex, 3> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 22) as f32 - 2.0
        })
        .collect();
    Tensor::from_data(TensorData::new(v, shape.to_vec()), &Default::default())
}

const H: usize = 4;
const KV: usize = 2;
const HD: usize = 8;

/// Sequences `(past, rows)` with random cached rows in buffers of `capacity`.
fn seqs(shape: &[(usize, usize)], capacity: usize) -> Vec<KvSeq<Flex>> {
    shape
        .iter()
        .enumerate()
        .map(|(i, &(past, rows))| KvSeq {
            k: random(&[capacity, KV, HD], 10 + i as u64),
            v: random(&[capacity, KV, HD], 20 + i as u64),
            past,
            rows,
        })
        .collect()
}

fn values(t: Tensor<Flex, 3>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const SHAPE: [(usize, usize); 3] = [(0, 4), (3, 1), (5, 2)];

#[test]
fn fused_packed_attention_matches_the_reference() {
    let t: usize = SHAPE.iter().map(|s| s.1).sum();
    for window in [None, Some(3)] {
        let (q, kn, vn) = (
            random(&[t, H, HD], 1),
            random(&[t, KV, HD], 2),
            random(&[t, KV, HD], 3),
        );
        let scale = (HD as f64).powf(-0.5);
        let (fused, fs) = k::packed_attention(
            q.clone(),
            kn.clone(),
            vn.clone(),
            seqs(&SHAPE, 8),
            window,
            scale,
        )
        .unwrap();
        let (refr, rs) = reference::packed_attention(q, kn, vn, seqs(&SHAPE, 8), window, scale);
        let d = max_diff(&values(fused), &values(refr));
        assert!(d < 1e-5, "window {window:?}: {d}");
        for (f, r) in fs.into_iter().zip(rs) {
            assert_eq!((f.past, f.rows), (r.past, r.rows));
            assert_eq!(values(f.k), values(r.k), "written keys");
            assert_eq!(values(f.v), values(r.v), "written values");
        }
    }
}

#[test]
fn each_sequence_gets_what_attention_alone_gives_it() {
    let t: usize = SHAPE.iter().map(|s| s.1).sum();
    let (q, kn, vn) = (
        random(&[t, H, HD], 4),
        random(&[t, KV, HD], 5),
        random(&[t, KV, HD], 6),
    );
    let scale = (HD as f64).powf(-0.5);
    let (out, done) = k::packed_attention(q.clone(), kn, vn, seqs(&SHAPE, 7), None, scale).unwrap();
    let mut off = 0;
    for (s, &(past, rows)) in done.into_iter().zip(&SHAPE) {
        let total = past + rows;
        // The sequence alone: its cached and new keys, a causal mask of 0 / -1e9.
        let mask: Vec<f32> = (0..rows * total)
            .map(|i| {
                if i % total <= past + i / total {
                    0.0
                } else {
                    -1e9
                }
            })
            .collect();
        let mask = Tensor::<Flex, 4>::from_data(
            TensorData::new(mask, [1, 1, rows, total]),
            &Default::default(),
        );
        let alone = k::attention(
            q.clone().narrow(0, off, rows).unsqueeze_dim(0),
            s.k.narrow(0, 0, total).unsqueeze_dim(0),
            s.v.narrow(0, 0, total).unsqueeze_dim(0),
            k::AttnMask::Dense(mask),
            scale,
        );
        let packed = out.clone().narrow(0, off, rows);
        assert_eq!(
            values(packed),
            values(alone.reshape([rows, H, HD])),
            "sequence at past {past}: bit for bit"
        );
        off += rows;
    }
}

/// The address of a `Flex` tensor's storage.
fn storage(t: &Tensor<Flex, 3>) -> *const u8 {
    t.clone().into_primitive().tensor().bytes().as_ptr()
}

#[test]
fn cache_rows_are_written_in_place() {
    let (q, kn, vn) = (
        random(&[2, H, HD], 7),
        random(&[2, KV, HD], 8),
        random(&[2, KV, HD], 9),
    );
    let s = seqs(&[(3, 2)], 6);
    let before = (storage(&s[0].k), storage(&s[0].v));
    let (_, s) = k::packed_attention(q, kn.clone(), vn, s, None, 1.0).unwrap();
    assert_eq!(
        (storage(&s[0].k), storage(&s[0].v)),
        before,
        "no copy of a buffer"
    );
    let written: Vec<f32> = values(s[0].k.clone().narrow(0, 3, 2));
    assert_eq!(written, values(kn));
}

#[test]
fn bad_shapes_are_errors() {
    let (q, kn, vn) = (
        random(&[3, H, HD], 1),
        random(&[3, KV, HD], 2),
        random(&[3, KV, HD], 3),
    );
    let cases = [
        (seqs(&[(5, 3)], 7), "capacity ≥ 8"),
        (seqs(&[(0, 2)], 7), "2 new tokens, q has 3 rows"),
        (seqs(&[(0, 3), (1, 0)], 7), "at least one new token"),
        (Vec::new(), "at least one sequence"),
    ];
    for (s, want) in cases {
        let e = k::packed_attention(q.clone(), kn.clone(), vn.clone(), s, None, 1.0).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    let e = k::packed_attention(
        q,
        kn.clone(),
        kn.narrow(0, 0, 2),
        seqs(&[(0, 3)], 3),
        None,
        1.0,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("expected q [T, heads, head_dim]"),
        "{e}"
    );
}
