//! Pre-quantized bitsandbytes weights as transformers saves them (`save_pretrained` of a
//! model loaded with `BitsAndBytesConfig`), read into a [`QuantMatrix`].
//!
//! 4-bit (`bnb.nn.Linear4bit`), under the module's key `M` (e.g.
//! `model.layers.0.mlp.down_proj`):
//!
//! | key | dtype, shape | what |
//! |---|---|---|
//! | `M.weight` | U8 `[ceil(n/2), 1]` | packed codes (another `quant_storage` dtype: same bytes) |
//! | `M.weight.absmax` | F32 `[blocks]`, or U8 when double-quantized | block scales |
//! | `M.weight.quant_map` | F32 `[16]` | the code book |
//! | `M.weight.nested_absmax` | F32 `[ceil(blocks/256)]` | double quantization only |
//! | `M.weight.nested_quant_map` | F32 `[256]` | double quantization only |
//! | `M.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) | U8 JSON | `quant_type`, `blocksize`, `dtype`, `shape`, `nested_blocksize`, `nested_offset`, ... |
//!
//! 8-bit (`bnb.nn.Linear8bitLt`): `M.weight` I8 `[out, in]`, `M.SCB` F32 `[out]` and
//! `M.weight_format` (U8 scalar, 0 = row-major).

use super::bnb::{Absmax, Bnb4bit, FourBit, NestedAbsmax};
use super::matrix::{QuantMatrix, Storage};
use crate::{KernelError, Result};

/// One tensor of a checkpoint as the file stores it: its safetensors dtype name (`"U8"`,
/// `"I8"`, `"F32"`, `"BF16"`, ...), shape and little-endian bytes.
#[derive(Clone, Copy, Debug)]
pub struct SavedTensor<'a> {
    /// The safetensors dtype name.
    pub dtype: &'a str,
    /// The shape.
    pub shape: &'a [usize],
    /// The raw bytes.
    pub data: &'a [u8],
}

/// The 4-bit quant state of `M.weight.quant_state.bitsandbytes__*`.
#[derive(Clone, Debug, PartialEq)]
struct QuantState {
    kind: FourBit,
    blocksize: usize,
    rows: usize,
    cols: usize,
    /// `(nested_blocksize, nested_offset)` when double-quantized.
    nested: Option<(usize, f32)>,
}

/// Reads a bitsandbytes 4-bit weight saved under module key `module` (see the module
/// docs); `get` returns the tensor of a full key. Every size, dtype and quant-state field
/// is checked, and errors name the key.
pub fn load_bnb_4bit<'a>(
    module: &str,
    get: impl Fn(&str) -> Option<SavedTensor<'a>>,
) -> Result<QuantMatrix> {
    let key = format!("{module}.weight");
    let state = read_quant_state(&key, &get)?;
    let n = state.rows * state.cols;
    let weight = need(&get, &key)?;
    let packed = packed_bytes(&key, weight, n)?;
    check_quant_map(&format!("{key}.quant_map"), &get, state.kind)?;
    let absmax_key = format!("{key}.absmax");
    let absmax_t = need(&get, &absmax_key)?;
    let blocks = n.div_ceil(state.blocksize);
    let absmax = match state.nested {
        None => Absmax::F32(f32s(&absmax_key, absmax_t, blocks)?),
        Some((nested_blocksize, offset)) => {
            let codes = u8s(&absmax_key, absmax_t, blocks)?;
            let nkey = format!("{key}.nested_absmax");
            let nested = f32s(&nkey, need(&get, &nkey)?, blocks.div_ceil(nested_blocksize))?;
            let mkey = format!("{key}.nested_quant_map");
            let code = f32s(&mkey, need(&get, &mkey)?, 256)?;
            Absmax::Nested(NestedAbsmax {
                codes,
                absmax: nested,
                code,
                blocksize: nested_blocksize,
                offset,
            })
        }
    };
    let q = Bnb4bit {
        kind: state.kind,
        blocksize: state.blocksize,
        packed,
        absmax,
    };
    QuantMatrix::new(&key, state.rows, state.cols, Storage::Bnb4(q))
}

/// Reads a bitsandbytes 8-bit (LLM.int8()) weight saved under module key `module`:
/// `M.weight` (I8 `[out, in]`), `M.SCB` (F32 `[out]`) and, when present,
/// `M.weight_format` (must be 0, row-major).
pub fn load_bnb_int8<'a>(
    module: &str,
    get: impl Fn(&str) -> Option<SavedTensor<'a>>,
) -> Result<QuantMatrix> {
    let key = format!("{module}.weight");
    let weight = need(&get, &key)?;
    check_dtype(&key, weight, &["I8"])?;
    let &[rows, cols] = weight.shape else {
        return Err(KernelError::Invalid {
            what: key,
            message: format!(
                "expected a 2-D [out, in] weight, found shape {:?}",
                weight.shape
            ),
        });
    };
    let n = rows.checked_mul(cols).ok_or_else(|| KernelError::Invalid {
        what: key.clone(),
        message: format!("shape [{rows}, {cols}] overflows"),
    })?;
    check_bytes(&key, weight, n)?;
    let codes = weight.data.iter().map(|&b| b as i8).collect();
    let scb_key = format!("{module}.SCB");
    let scales = f32s(&scb_key, need(&get, &scb_key)?, rows)?;
    let fmt_key = format!("{module}.weight_format");
    if let Some(t) = get(&fmt_key) {
        check_dtype(&fmt_key, t, &["U8"])?;
        if t.data != [0] {
            return Err(KernelError::Invalid {
                what: fmt_key,
                message: format!(
                    "only the row-major format (0) is supported, found {:?}",
                    t.data
                ),
            });
        }
    }
    QuantMatrix::new(&key, rows, cols, Storage::Int8 { codes, scales })
}

/// The tensor at `key`, or a [`KernelError::Missing`].
fn need<'a>(get: &impl Fn(&str) -> Option<SavedTensor<'a>>, key: &str) -> Result<SavedTensor<'a>> {
    get(key).ok_or_else(|| KernelError::Missing {
        what: key.to_string(),
    })
}

/// Finds and parses the one `quant_state.bitsandbytes__{nf4,fp4}` blob of `key`.
fn read_quant_state<'a>(
    key: &str,
    get: &impl Fn(&str) -> Option<SavedTensor<'a>>,
) -> Result<QuantState> {
    let found: Vec<(FourBit, String, SavedTensor<'a>)> = [FourBit::Nf4, FourBit::Fp4]
        .into_iter()
        .filter_map(|kind| {
            let k = format!("{key}.quant_state.bitsandbytes__{}", kind.name());
            get(&k).map(|t| (kind, k, t))
        })
        .collect();
    let (kind, state_key, blob) = match found.len() {
        1 => found.into_iter().next().expect("one element"),
        0 => {
            return Err(KernelError::Missing {
                what: format!("{key}.quant_state.bitsandbytes__nf4 (or __fp4)"),
            })
        }
        _ => {
            return Err(KernelError::Invalid {
                what: format!("{key}.quant_state"),
                message: "both bitsandbytes__nf4 and bitsandbytes__fp4 are present".into(),
            })
        }
    };
    check_dtype(&state_key, blob, &["U8"])?;
    parse_quant_state(&state_key, blob.data, kind)
}

/// The fields of a quant-state JSON blob (`pack_dict_to_tensor`).
fn parse_quant_state(what: &str, json: &[u8], kind: FourBit) -> Result<QuantState> {
    let bad = |message: String| KernelError::Invalid {
        what: what.to_string(),
        message,
    };
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| bad(format!("not JSON: {e}")))?;
    let field = |name: &str| {
        v.get(name)
            .ok_or_else(|| bad(format!("missing field `{name}`")))
    };
    let usize_field = |name: &str| {
        field(name)?
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| bad(format!("`{name}` must be a non-negative integer")))
    };
    let quant_type = field("quant_type")?.as_str().unwrap_or_default();
    if quant_type != kind.name() {
        return Err(bad(format!(
            "quant_type is {quant_type:?} under a bitsandbytes__{} key",
            kind.name()
        )));
    }
    let blocksize = usize_field("blocksize")?;
    if !super::bnb::BLOCKSIZES.contains(&blocksize) {
        return Err(bad(format!(
            "blocksize must be one of {:?}, found {blocksize}",
            super::bnb::BLOCKSIZES
        )));
    }
    let shape: Vec<usize> = field("shape")?
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|x| x as usize))
                .collect()
        })
        .unwrap_or_default();
    let [rows, cols] = shape[..] else {
        return Err(bad(format!(
            "expected a 2-D `shape` [out, in], found {}",
            field("shape")?
        )));
    };
    rows.checked_mul(cols)
        .ok_or_else(|| bad(format!("shape [{rows}, {cols}] overflows")))?;
    let nested = match v.get("nested_offset") {
        None => None,
        Some(off) => {
            let offset = off
                .as_f64()
                .ok_or_else(|| bad("`nested_offset` must be a number".into()))?;
            let nb = usize_field("nested_blocksize")?;
            if nb == 0 {
                return Err(bad("nested_blocksize must be positive, found 0".into()));
            }
            if let Some(dt) = v.get("nested_dtype").and_then(|d| d.as_str()) {
                if dt != "float32" {
                    return Err(bad(format!("nested_dtype must be float32, found {dt:?}")));
                }
            }
            Some((nb, offset as f32))
        }
    };
    Ok(QuantState {
        kind,
        blocksize,
        rows,
        cols,
        nested,
    })
}

/// The packed 4-bit bytes: `ceil(n / 2)` of them, in any `quant_storage` dtype.
fn packed_bytes(key: &str, t: SavedTensor<'_>, n: usize) -> Result<Vec<u8>> {
    check_dtype(key, t, &["U8", "I8", "BF16", "F16", "F32"])?;
    let bytes = n.div_ceil(2);
    if t.data.len() != bytes {
        return Err(KernelError::Size {
            what: format!("{key} (packed 4-bit codes of the quant state's shape)"),
            expected: bytes,
            found: t.data.len(),
        });
    }
    Ok(t.data.to_vec())
}

/// Checks `M.weight.quant_map` (when present) against the built-in code book, which
/// bitsandbytes' kernels use whatever the file says.
fn check_quant_map<'a>(
    key: &str,
    get: &impl Fn(&str) -> Option<SavedTensor<'a>>,
    kind: FourBit,
) -> Result<()> {
    let Some(t) = get(key) else {
        return Ok(());
    };
    let map = f32s(key, t, 16)?;
    let expected = kind.code();
    if let Some(i) = (0..16).find(|&i| (map[i] - expected[i]).abs() > 1e-6) {
        return Err(KernelError::Invalid {
            what: key.to_string(),
            message: format!(
                "entry {i} is {}, bitsandbytes' {} code book has {}",
                map[i],
                kind.name(),
                expected[i]
            ),
        });
    }
    Ok(())
}

/// An error unless `t.dtype` is one of `allowed`.
fn check_dtype(key: &str, t: SavedTensor<'_>, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&t.dtype) {
        Ok(())
    } else {
        Err(KernelError::Dtype {
            what: key.to_string(),
            expected: allowed.join(" or "),
            found: t.dtype.to_string(),
        })
    }
}

/// An error unless the shape holds `n` elements of the dtype's size and the bytes match.
fn check_bytes(key: &str, t: SavedTensor<'_>, n: usize) -> Result<()> {
    let elems = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if elems != Some(n) {
        return Err(KernelError::Length {
            what: format!("{key} (shape {:?})", t.shape),
            expected: n,
            found: elems.unwrap_or(usize::MAX),
        });
    }
    let size = match t.dtype {
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    };
    if t.data.len() != n * size {
        return Err(KernelError::Size {
            what: key.to_string(),
            expected: n * size,
            found: t.data.len(),
        });
    }
    Ok(())
}

/// `n` little-endian f32 values of an F32 tensor.
fn f32s(key: &str, t: SavedTensor<'_>, n: usize) -> Result<Vec<f32>> {
    check_dtype(key, t, &["F32"])?;
    check_bytes(key, t, n)?;
    Ok(t.data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// `n` bytes of a U8 tensor.
fn u8s(key: &str, t: SavedTensor<'_>, n: usize) -> Result<Vec<u8>> {
    check_dtype(key, t, &["U8"])?;
    check_bytes(key, t, n)?;
    Ok(t.data.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_state_fields_are_checked() {
        let ok = br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4, 6], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.5}"#;
        let st = parse_quant_state("k", ok, FourBit::Nf4).unwrap();
        assert_eq!(
            (st.rows, st.cols, st.blocksize, st.nested),
            (4, 6, 64, Some((256, 0.5)))
        );
        let wrong_type = parse_quant_state("k", ok, FourBit::Fp4).unwrap_err();
        assert!(
            wrong_type.to_string().contains("quant_type"),
            "{wrong_type}"
        );
        let bad_block =
            br#"{"quant_type": "nf4", "blocksize": 63, "dtype": "float32", "shape": [4, 6]}"#;
        let e = parse_quant_state("k", bad_block, FourBit::Nf4).unwrap_err();
        assert!(e.to_string().contains("blocksize"), "{e}");
        let three_d =
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, 2, 6]}"#;
        let e = parse_quant_state("k", three_d, FourBit::Nf4).unwrap_err();
        assert!(e.to_string().contains("2-D"), "{e}");
        let e = parse_quant_state("k", b"{", FourBit::Nf4).unwrap_err();
        assert!(e.to_string().contains("not JSON"), "{e}");
    }
}
