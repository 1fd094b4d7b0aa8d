//! The storage formats against bitsandbytes 0.50, torch and transformers: codes, scales
//! and dequantized weights from `tests/fixtures/make_quant_fixtures.py`
//! (`tests/fixtures/quant/bnb.safetensors`, and two checkpoints transformers saved for a
//! tiny Llama; the script's docstring lists the keys and the special blocks: a zero row,
//! a block holding every rounding midpoint).

use std::collections::HashMap;
use std::sync::OnceLock;

use super::common::values;
use legora_kernels::quant::bnb::{self, FourBit, NestedAbsmax, DYNAMIC_MAP, FP4_CODE, NF4_CODE};
use legora_kernels::quant::{
    float16, int8, load_bnb_4bit, load_bnb_int8, Absmax, Format, QuantMatrix, RowBlocks,
    SavedTensor, Storage,
};
use legora_kernels::KernelError;
use safetensors::SafeTensors;

/// One fixture tensor: safetensors dtype name, shape, bytes.
type Entry = (String, Vec<usize>, Vec<u8>);

/// Every tensor of fixture file `name` by key.
fn read_fixture(name: &str) -> HashMap<String, Entry> {
    let path = format!(
        "{}/../../tests/fixtures/quant/{name}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let bytes = std::fs::read(&path).expect("fixture file (see make_quant_fixtures.py)");
    let st = SafeTensors::deserialize(&bytes).expect("a safetensors file");
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let dtype = format!("{:?}", v.dtype());
            (k, (dtype, v.shape().to_vec(), v.data().to_vec()))
        })
        .collect()
}

/// Every tensor of `bnb.safetensors` by key.
fn fixture() -> &'static HashMap<String, Entry> {
    static DATA: OnceLock<HashMap<String, Entry>> = OnceLock::new();
    DATA.get_or_init(|| read_fixture("bnb"))
}

/// An f32 tensor of a fixture map.
fn f32s_of(map: &HashMap<String, Entry>, key: &str) -> Vec<f32> {
    let e = map.get(key).unwrap_or_else(|| panic!("fixture has {key}"));
    assert_eq!(e.0, "F32", "{key}");
    e.2.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// A fixture tensor's bytes.
fn raw(key: &str) -> &'static [u8] {
    &fixture()
        .get(key)
        .unwrap_or_else(|| panic!("fixture has {key}"))
        .2
}

/// A fixture tensor as f32 (F32 only).
fn f32s(key: &str) -> Vec<f32> {
    f32s_of(fixture(), key)
}

/// A fixture tensor as u16 bits (BF16 / F16).
fn u16s(key: &str) -> Vec<u16> {
    raw(key)
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// `[rows, cols]` of source weight `s`.
fn shape(s: &str) -> (usize, usize) {
    let sh = &fixture()[&format!("source.{s}")].1;
    (sh[0], sh[1])
}

/// A lookup over the fixture with some keys replaced or removed.
struct Tampered {
    replace: HashMap<String, Option<Entry>>,
}

impl Tampered {
    fn new() -> Self {
        Tampered {
            replace: HashMap::new(),
        }
    }

    fn set(mut self, key: &str, entry: Option<Entry>) -> Self {
        self.replace.insert(key.to_string(), entry);
        self
    }

    fn get(&self, key: &str) -> Option<SavedTensor<'_>> {
        let e = match self.replace.get(key) {
            Some(over) => over.as_ref()?,
            None => fixture().get(key)?,
        };
        Some(SavedTensor {
            dtype: &e.0,
            shape: &e.1,
            data: &e.2,
        })
    }
}

/// A plain fixture lookup.
fn saved(key: &str) -> Option<SavedTensor<'static>> {
    fixture().get(key).map(|e| SavedTensor {
        dtype: &e.0,
        shape: &e.1,
        data: &e.2,
    })
}

/// Exact equality of two f32 slices (bit for bit, except that 0 equals -0: bitsandbytes'
/// C++ FP4 dequantizer gives code 8 the sign bit, its table and Python path do not),
/// naming the first difference.
fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a == 0.0 && b == 0.0);
    if let Some(i) = (0..got.len()).find(|&i| !same(got[i], want[i])) {
        panic!(
            "{what}: element {i}: {} vs bitsandbytes {}",
            got[i], want[i]
        );
    }
}

const SHAPES: [&str; 3] = ["a", "b", "c"];

#[test]
fn code_books_are_bitsandbytes() {
    assert_bits("nf4", &NF4_CODE, &f32s("nf4.a.weight.quant_map"));
    assert_bits("fp4", &FP4_CODE, &f32s("fp4.a.weight.quant_map"));
    assert_bits(
        "dynamic",
        &DYNAMIC_MAP,
        &f32s("nf4_dq.a.weight.nested_quant_map"),
    );
}

#[test]
fn four_bit_codes_and_absmax_match() {
    for (kind, q) in [(FourBit::Nf4, "nf4"), (FourBit::Fp4, "fp4")] {
        for s in SHAPES {
            let w = f32s(&format!("source.{s}"));
            let (packed, absmax) = bnb::quantize_4bit(&w, kind, 64);
            assert_eq!(packed, raw(&format!("{q}.{s}.weight")), "{q}.{s} codes");
            assert_bits(
                &format!("{q}.{s} absmax"),
                &absmax,
                &f32s(&format!("{q}.{s}.weight.absmax")),
            );
            // The double-quantized case packs the same 4-bit codes.
            assert_eq!(
                packed,
                raw(&format!("{q}_dq.{s}.weight")),
                "{q}_dq.{s} codes"
            );
            assert_bits(
                &format!("{q}_dq.{s} plain absmax"),
                &absmax,
                &f32s(&format!("{q}_dq.{s}.absmax_f32")),
            );
        }
    }
}

/// The nested codes and scales equal bitsandbytes' given its offset; the offset legora
/// computes itself (the exactly rounded mean) is within a float32 rounding of torch's.
#[test]
fn double_quantization_matches() {
    for q in ["nf4_dq", "fp4_dq"] {
        for s in SHAPES {
            let absmax = f32s(&format!("{q}.{s}.absmax_f32"));
            let state = raw(&format!(
                "{q}.{s}.weight.quant_state.bitsandbytes__{}",
                &q[..3]
            ));
            let json: serde_json::Value = serde_json::from_slice(state).unwrap();
            let offset = json["nested_offset"].as_f64().unwrap() as f32;
            let nested = NestedAbsmax::quantize_with_offset(&absmax, offset);
            assert_eq!(
                nested.codes,
                raw(&format!("{q}.{s}.weight.absmax")),
                "{q}.{s} nested codes"
            );
            assert_bits(
                &format!("{q}.{s} nested absmax"),
                &nested.absmax,
                &f32s(&format!("{q}.{s}.weight.nested_absmax")),
            );
            let own = NestedAbsmax::quantize(&absmax);
            assert!(
                (own.offset - offset).abs() <= 1e-6 * offset.abs(),
                "{q}.{s}: offset {} vs torch {offset}",
                own.offset
            );
        }
    }
}

/// Loading what `Linear4bit` saves and dequantizing gives bitsandbytes' `dequantize_4bit`
/// exactly (see [`assert_bits`]), for every shape: blocks straddling rows,
/// an odd element count, whole blocks.
#[test]
fn saved_4bit_weights_dequantize_as_bitsandbytes() {
    for q in ["nf4", "nf4_dq", "fp4", "fp4_dq"] {
        for s in SHAPES {
            let module = format!("{q}.{s}");
            let m = load_bnb_4bit(&module, saved).unwrap_or_else(|e| panic!("{module}: {e}"));
            assert_eq!((m.rows(), m.cols()), shape(s));
            let want = f32s(&format!("{module}.dequantized"));
            assert_bits(&module, &m.dequantize(), &want);
            // A few rows at a time (a block straddles rows 0 and 1 of `a`).
            let (rows, cols) = shape(s);
            let mut part = vec![0.0f32; 2 * cols];
            let r0 = rows / 2;
            m.dequantize_rows(r0, 2.min(rows - r0), &mut part[..2.min(rows - r0) * cols])
                .unwrap();
            let span = &want[r0 * cols..(r0 + 2.min(rows - r0)) * cols];
            assert_bits(&format!("{module} rows"), &part[..span.len()], span);
        }
    }
}

/// Quantizing here gives what bitsandbytes saved (same codes, same scales; with double
/// quantization the same nested codes once the offsets agree).
#[test]
fn quantizing_here_gives_the_saved_weight() {
    for (q, format) in [
        (
            "nf4",
            Format::Nf4 {
                double_quant: false,
            },
        ),
        (
            "fp4",
            Format::Fp4 {
                double_quant: false,
            },
        ),
        ("nf4_dq", Format::Nf4 { double_quant: true }),
        ("fp4_dq", Format::Fp4 { double_quant: true }),
    ] {
        for s in SHAPES {
            let (rows, cols) = shape(s);
            let w = f32s(&format!("source.{s}"));
            let ours = QuantMatrix::quantize("w", &w, rows, cols, format).unwrap();
            let theirs = load_bnb_4bit(&format!("{q}.{s}"), saved).unwrap();
            assert_eq!(ours.format(), format);
            let (Storage::Bnb4(a), Storage::Bnb4(b)) = (ours.storage(), theirs.storage()) else {
                panic!("4-bit storage");
            };
            assert_eq!(a.packed, b.packed, "{q}.{s}");
            match (&a.absmax, &b.absmax) {
                (Absmax::F32(x), Absmax::F32(y)) => assert_bits(q, x, y),
                (Absmax::Nested(x), Absmax::Nested(y)) => {
                    let same_offset = NestedAbsmax::quantize_with_offset(
                        &bnb::quantize_4bit(&w, a.kind, 64).1,
                        y.offset,
                    );
                    assert_eq!(same_offset.codes, y.codes, "{q}.{s}");
                    assert_eq!(x.codes.len(), y.codes.len());
                }
                _ => panic!("{q}: absmax kinds differ"),
            }
        }
    }
}

#[test]
fn int8_matches_bitsandbytes() {
    for s in SHAPES {
        let (rows, cols) = shape(s);
        let w = f32s(&format!("source.{s}"));
        let (codes, scales) = int8::quantize_int8(&w, cols);
        let want: Vec<i8> = raw(&format!("int8.{s}.weight"))
            .iter()
            .map(|&b| b as i8)
            .collect();
        assert_eq!(codes, want, "int8.{s} codes");
        assert_bits(
            &format!("int8.{s} SCB"),
            &scales,
            &f32s(&format!("int8.{s}.SCB")),
        );
        let m = load_bnb_int8(&format!("int8.{s}"), saved).unwrap();
        assert_eq!((m.rows(), m.cols(), m.format()), (rows, cols, Format::Int8));
        assert_bits(
            &format!("int8.{s}"),
            &m.dequantize(),
            &f32s(&format!("int8.{s}.dequantized")),
        );
        let ours = QuantMatrix::quantize("w", &w, rows, cols, Format::Int8).unwrap();
        assert_eq!(ours, m);
    }
}

#[test]
fn half_floats_round_as_torch() {
    for s in SHAPES.into_iter().chain(["ties"]) {
        let src = if s == "ties" {
            "ties".to_string()
        } else {
            format!("source.{s}")
        };
        let w = f32s(&src);
        assert_eq!(
            float16::to_bf16_bits(&w),
            u16s(&format!("bf16.{s}")),
            "bf16.{s}"
        );
        assert_eq!(
            float16::to_f16_bits(&w),
            u16s(&format!("f16.{s}")),
            "f16.{s}"
        );
    }
    let (rows, cols) = shape("a");
    let w = f32s("source.a");
    for format in [Format::Bf16, Format::F16] {
        let m = QuantMatrix::quantize("w", &w, rows, cols, format).unwrap();
        let want: Vec<f32> = match format {
            Format::Bf16 => u16s("bf16.a")
                .iter()
                .map(|&b| f32::from_bits(u32::from(b) << 16))
                .collect(),
            _ => u16s("f16.a")
                .iter()
                .map(|&b| half::f16::from_bits(b).to_f32())
                .collect(),
        };
        assert_bits(format.name(), &m.dequantize(), &want);
        assert_eq!(m.bytes(), 2 * rows * cols);
    }
}

/// Memory: NF4 holds half a byte per element plus 4 bytes per 64-element block; double
/// quantization 1 byte per block plus 4 per 256 blocks and the 1 KiB map.
#[test]
fn bytes_held() {
    let (rows, cols) = shape("a");
    let n = rows * cols;
    let blocks = n.div_ceil(64);
    let plain = load_bnb_4bit("nf4.a", saved).unwrap();
    assert_eq!(plain.bytes(), n.div_ceil(2) + 4 * blocks);
    let dq = load_bnb_4bit("nf4_dq.a", saved).unwrap();
    assert_eq!(
        dq.bytes(),
        n.div_ceil(2) + blocks + 4 * blocks.div_ceil(256) + 4 * 256
    );
    let i8m = load_bnb_int8("int8.a", saved).unwrap();
    assert_eq!(i8m.bytes(), n + 4 * rows);
}

/// Bad checkpoints give typed errors naming the key, expected and found.
#[test]
fn bad_checkpoints_name_the_tensor() {
    let state = "nf4_dq.a.weight.quant_state.bitsandbytes__nf4";
    let t = Tampered::new().set(state, None);
    let e = load_bnb_4bit("nf4_dq.a", |k| t.get(k)).unwrap_err();
    assert!(
        matches!(&e, KernelError::Missing { what } if what.contains("nf4_dq.a.weight.quant_state")),
        "{e}"
    );

    let short = ("U8".to_string(), vec![10], vec![0u8; 10]);
    let t = Tampered::new().set("nf4_dq.a.weight.absmax", Some(short));
    let e = load_bnb_4bit("nf4_dq.a", |k| t.get(k)).unwrap_err();
    assert!(
        matches!(&e, KernelError::Length { what, expected: 300, found: 10 } if what.contains("nf4_dq.a.weight.absmax")),
        "{e}"
    );

    let as_f16 = ("F16".to_string(), vec![300], vec![0u8; 600]);
    let t = Tampered::new().set("nf4.a.weight.absmax", Some(as_f16));
    let e = load_bnb_4bit("nf4.a", |k| t.get(k)).unwrap_err();
    assert!(
        matches!(&e, KernelError::Dtype { what, found, .. } if what == "nf4.a.weight.absmax" && found == "F16"),
        "{e}"
    );

    let t = Tampered::new().set("nf4_dq.a.weight.nested_absmax", None);
    let e = load_bnb_4bit("nf4_dq.a", |k| t.get(k)).unwrap_err();
    assert!(
        matches!(&e, KernelError::Missing { what } if what == "nf4_dq.a.weight.nested_absmax"),
        "{e}"
    );

    let cut = ("U8".to_string(), vec![100, 1], vec![0u8; 100]);
    let t = Tampered::new().set("fp4.a.weight", Some(cut));
    let e = load_bnb_4bit("fp4.a", |k| t.get(k)).unwrap_err();
    assert!(
        matches!(
            &e,
            KernelError::Size {
                expected: 9595,
                found: 100,
                ..
            }
        ),
        "{e}"
    );

    let mut map = raw("nf4.b.weight.quant_map").to_vec();
    map[4..8].copy_from_slice(&0.5f32.to_le_bytes());
    let t = Tampered::new().set(
        "nf4.b.weight.quant_map",
        Some(("F32".into(), vec![16], map)),
    );
    let e = load_bnb_4bit("nf4.b", |k| t.get(k)).unwrap_err();
    assert!(
        matches!(&e, KernelError::Invalid { what, .. } if what == "nf4.b.weight.quant_map"),
        "{e}"
    );

    let json = br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [95, 203]}"#;
    let blob = ("U8".to_string(), vec![json.len()], json.to_vec());
    let t = Tampered::new().set("nf4.a.weight.quant_state.bitsandbytes__nf4", Some(blob));
    let e = load_bnb_4bit("nf4.a", |k| t.get(k)).unwrap_err();
    assert!(e.to_string().contains("nf4.a.weight"), "{e}");

    let e = load_bnb_int8(
        "int8.a",
        |k| if k == "int8.a.SCB" { None } else { saved(k) },
    )
    .unwrap_err();
    assert!(
        matches!(&e, KernelError::Missing { what } if what == "int8.a.SCB"),
        "{e}"
    );

    let e = QuantMatrix::quantize(
        "w",
        &[1.0, f32::NAN],
        1,
        2,
        Format::Nf4 {
            double_quant: false,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("element 1 is NaN"), "{e}");
    let e = QuantMatrix::quantize("w", &[1.0e5], 1, 1, Format::F16).unwrap_err();
    assert!(e.to_string().contains("overflows f16"), "{e}");
    let e = QuantMatrix::quantize("w", &[1.0; 5], 2, 3, Format::Int8).unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::Length {
                expected: 6,
                found: 5,
                ..
            }
        ),
        "{e}"
    );
}

const MODULES: [&str; 2] = [
    "model.layers.0.mlp.down_proj",
    "model.layers.0.self_attn.q_proj",
];

/// What transformers' `save_pretrained` wrote for a 4-bit (NF4, double quantization)
/// tiny Llama loads under the HF keys and dequantizes as bitsandbytes does; quantizing
/// the original f32 weight here packs the same codes.
#[test]
fn transformers_4bit_checkpoint_loads() {
    let file = read_fixture("transformers_nf4_dq");
    let get = |k: &str| {
        file.get(k).map(|e| SavedTensor {
            dtype: &e.0,
            shape: &e.1,
            data: &e.2,
        })
    };
    for m in MODULES {
        let q = load_bnb_4bit(m, get).unwrap_or_else(|e| panic!("{m}: {e}"));
        assert_eq!(q.format(), Format::Nf4 { double_quant: true });
        assert_bits(
            m,
            &q.dequantize(),
            &f32s_of(&file, &format!("reference.{m}.dequantized")),
        );
        let w = f32s_of(&file, &format!("reference.{m}.weight"));
        let ours = QuantMatrix::quantize(m, &w, q.rows(), q.cols(), q.format()).unwrap();
        let (Storage::Bnb4(a), Storage::Bnb4(b)) = (ours.storage(), q.storage()) else {
            panic!("4-bit storage");
        };
        assert_eq!(a.packed, b.packed, "{m} codes");
    }
}

/// The same for 8-bit (`load_in_8bit`): `weight` / `SCB` / `weight_format` load and
/// dequantize as bitsandbytes; transformers quantizes the f16 rounding of the weight, so
/// quantizing that here gives the saved codes.
#[test]
fn transformers_int8_checkpoint_loads() {
    let file = read_fixture("transformers_int8");
    let get = |k: &str| {
        file.get(k).map(|e| SavedTensor {
            dtype: &e.0,
            shape: &e.1,
            data: &e.2,
        })
    };
    for m in MODULES {
        let q = load_bnb_int8(m, get).unwrap_or_else(|e| panic!("{m}: {e}"));
        assert_bits(
            m,
            &q.dequantize(),
            &f32s_of(&file, &format!("reference.{m}.dequantized")),
        );
        let w: Vec<f32> = f32s_of(&file, &format!("reference.{m}.weight"))
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        let ours = QuantMatrix::quantize(m, &w, q.rows(), q.cols(), Format::Int8).unwrap();
        assert_eq!(ours, q, "{m}");
    }
}

/// A weight quantized a block of rows at a time equals the weight quantized whole, in
/// every format (4-bit blocks and their double quantization included), with a short
/// last block; its byte count is the one `Format::bytes` predicts.
#[test]
fn quantize_by_rows_equals_whole() {
    for (rows, cols) in [(300, 8192), (3, 5), (129, 4097)] {
        let w = values(rows * cols, 5);
        let step = RowBlocks::row_block(cols);
        assert_eq!(step % 128, 0);
        for format in Format::ALL {
            let whole = QuantMatrix::quantize("w", &w, rows, cols, format).unwrap();
            let mut calls = 0;
            let by_rows = QuantMatrix::quantize_by_rows("w", (rows, cols), format, |r0, n, out| {
                calls += 1;
                out.copy_from_slice(&w[r0 * cols..(r0 + n) * cols]);
            })
            .unwrap();
            assert_eq!(calls, rows.div_ceil(step), "{}", format.name());
            assert!(by_rows == whole, "{} {rows}x{cols}", format.name());
            assert_eq!(
                format.bytes(rows, cols),
                Some(whole.bytes()),
                "{}",
                format.name()
            );
        }
    }
}

/// Row blocks of the wrong width or format, or a short block before the last, are
/// refused naming the weight.
#[test]
fn from_row_blocks_refuses_misfits() {
    let q = |rows: usize, cols: usize, f: Format| {
        QuantMatrix::quantize("b", &values(rows * cols, 1), rows, cols, f).unwrap()
    };
    let nf4 = Format::Nf4 {
        double_quant: false,
    };
    let step = RowBlocks::row_block(64);
    let cases = [
        vec![q(step, 64, nf4), q(3, 32, nf4)],
        vec![q(step, 64, nf4), q(3, 64, Format::Int8)],
        vec![q(3, 64, nf4), q(step, 64, nf4)],
        vec![q(3, 64, Format::Nf4 { double_quant: true })],
    ];
    for blocks in cases {
        let err = QuantMatrix::from_row_blocks("model.x.weight", 64, nf4, blocks).unwrap_err();
        assert!(err.to_string().contains("model.x.weight"), "{err}");
    }
    assert_eq!(Format::F32.bytes(usize::MAX, 2), None);
    // rows missing at the end, rows past the end, a size that cannot be allocated
    let mut w = RowBlocks::new("model.y.weight", (step + 3, 64), nf4).unwrap();
    w.push(q(step, 64, nf4)).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(
        err.contains("model.y.weight") && err.contains(&format!("{}", step + 3)),
        "{err}"
    );
    let mut w = RowBlocks::new("model.y.weight", (3, 64), nf4).unwrap();
    let err = w.push(q(5, 64, nf4)).unwrap_err().to_string();
    assert!(err.contains("past the weight's 3"), "{err}");
    let err = RowBlocks::new("huge", (1 << 40, 1 << 22), Format::F32).unwrap_err();
    assert!(err.to_string().contains("huge"), "{err}");
}
