//! The GGUF container: header, metadata, tensor infos, data section (`gguf.cpp`'s
//! `gguf_init_from_file_impl`, version 2 and 3, little-endian).
//!
//! Layout: magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata count, the
//! metadata (`string` key, `u32` type, value), the tensor infos (`string` name, `u32`
//! n_dims, `u64` × n_dims dims `ne0` first, `u32` GGML type, `u64` offset into the data
//! section), padding to `general.alignment` (default 32), the data section.
//!
//! Everything is checked against the bytes actually present before it is used: a count or
//! a length is compared with what the rest of the file could hold before anything is
//! allocated for it, so a corrupt header gives a [`HubError`] naming the key, tensor or
//! field, never a huge allocation, a panic or a loop over made-up entries.

use std::collections::HashMap;
use std::path::Path;

use legora_kernels::quant::ggml::GgmlType;

use super::value::{MetadataArray, MetadataValue, ValueType};
use crate::error::{HubError, Result};

/// `GGUF` read as a little-endian `u32`.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// `GGML_MAX_DIMS`.
pub const GGML_MAX_DIMS: usize = 4;
/// Deepest nesting of arrays accepted in metadata (llama.cpp writes at most 2).
const MAX_ARRAY_DEPTH: usize = 8;

/// One tensor of a GGUF file, as its info describes it (validated: known type, whole
/// blocks per row, inside the data section, aligned, not overlapping another).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in GGML order: `dims[0]` = `ne0`, the innermost (contiguous) one; a
    /// PyTorch `[out, in]` weight is `[in, out]` here.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Offset of the first byte from the start of the data section.
    pub offset: u64,
    /// Offset of the first byte from the start of the file.
    pub file_offset: u64,
    /// Bytes of data (whole blocks).
    pub n_bytes: u64,
    /// Number of elements (product of `dims`).
    pub n_elements: u64,
}

impl GgufTensorInfo {
    /// The shape in PyTorch order (`dims` reversed): `[out, in]` for a weight.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// `ne0`, the elements of one row (1 for a 0-d tensor).
    pub fn ne0(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows (`n_elements / ne0`; 0 for an empty tensor).
    pub fn rows(&self) -> u64 {
        self.n_elements.checked_div(self.ne0()).unwrap_or(0)
    }
}

/// A parsed header: everything but the tensor bytes.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub version: u32,
    pub metadata: Vec<(String, MetadataValue)>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
}

/// Parse and validate the header of a GGUF file whose bytes are `b`.
pub(crate) fn parse(path: &Path, b: &[u8]) -> Result<Header> {
    let mut c = Cursor { path, b, pos: 0 };
    let magic = c.take(4, "magic")?;
    if magic != GGUF_MAGIC {
        return Err(c.format_at(0, "magic", "\"GGUF\"", format!("{magic:02x?}")));
    }
    let version = c.u32("version")?;
    if version != 2 && version != 3 {
        let found = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            format!(
                "{} written big-endian (not supported)",
                version.swap_bytes()
            )
        } else if version == 1 {
            "1 (GGUF v1, 32-bit lengths: not supported)".to_string()
        } else {
            version.to_string()
        };
        return Err(c.format_at(4, "version", "2 or 3", found));
    }
    let n_tensors = c.u64("tensor_count")?;
    let n_kv = c.u64("metadata_kv_count")?;
    // smallest entries: key len + type + 1-byte value; name len + n_dims + type + offset
    c.check_count(n_kv, 8 + 4 + 1, "metadata_kv_count")?;
    let metadata = read_metadata(&mut c, n_kv)?;
    c.check_count(n_tensors, 8 + 4 + 4 + 8, "tensor_count")?;
    let mut raw = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        raw.push(read_tensor_info(&mut c, i)?);
    }
    let alignment = alignment(path, &metadata)?;
    let end_of_infos = c.pos as u64;
    let data_offset = end_of_infos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| c.format_at(end_of_infos, "data section", "an offset", "an overflow"))?;
    let tensors = place_tensors(path, raw, alignment, data_offset, b.len() as u64)?;
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    path: &'a Path,
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }

    fn format_at(
        &self,
        offset: u64,
        what: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> HubError {
        HubError::GgufFormat {
            path: self.path.to_path_buf(),
            offset,
            what: what.into(),
            expected: expected.into(),
            found: found.into(),
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.format_at(
                self.pos as u64,
                what,
                format!("{n} bytes"),
                format!("{} (the file ends)", self.remaining()),
            ));
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        Ok(s.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// `count` entries of at least `min_size` bytes each must fit in the rest of the file.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        let fits = self.remaining() / min_size;
        if count > fits {
            return Err(self.format_at(
                self.pos as u64,
                what,
                format!(
                    "at most {fits} (entries of at least {min_size} bytes in the {} bytes left)",
                    self.remaining()
                ),
                count.to_string(),
            ));
        }
        Ok(())
    }

    /// A GGUF string: `u64` length, then that many bytes (UTF-8 checked by the caller).
    fn bytes_of_string(&mut self, what: &str) -> Result<&'a [u8]> {
        let at = self.pos as u64;
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(self.format_at(
                at,
                format!("{what} (string length)"),
                format!("at most {} (the bytes left in the file)", self.remaining()),
                len.to_string(),
            ));
        }
        self.take(len, what)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos as u64;
        let bytes = self.bytes_of_string(what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.format_at(at, what, "a UTF-8 string", e.to_string()))
    }
}

fn read_metadata(c: &mut Cursor<'_>, n_kv: u64) -> Result<Vec<(String, MetadataValue)>> {
    let mut out: Vec<(String, MetadataValue)> = Vec::with_capacity(n_kv as usize);
    let mut seen = HashMap::new();
    for i in 0..n_kv {
        let at = c.pos as u64;
        let key = c.string(&format!("key of metadata entry {i}"))?;
        if seen.insert(key.clone(), i).is_some() {
            return Err(c.format_at(
                at,
                format!("metadata key `{key}`"),
                "a unique key",
                "a duplicate",
            ));
        }
        let ty = c.u32(&format!("type of `{key}`"))?;
        let ty = ValueType::from_id(ty).ok_or_else(|| HubError::GgufMetadata {
            path: c.path.to_path_buf(),
            key: key.clone(),
            expected: "a GGUF value type (0..=12)".into(),
            found: format!("type id {ty}"),
        })?;
        let value = read_value(c, &key, ty, 0)?;
        out.push((key, value));
    }
    Ok(out)
}

fn read_value(c: &mut Cursor<'_>, key: &str, ty: ValueType, depth: usize) -> Result<MetadataValue> {
    let what = format!("value of `{key}`");
    Ok(match ty {
        ValueType::U8 => MetadataValue::U8(c.array::<1>(&what)?[0]),
        ValueType::I8 => MetadataValue::I8(c.array::<1>(&what)?[0] as i8),
        ValueType::U16 => MetadataValue::U16(u16::from_le_bytes(c.array(&what)?)),
        ValueType::I16 => MetadataValue::I16(i16::from_le_bytes(c.array(&what)?)),
        ValueType::U32 => MetadataValue::U32(u32::from_le_bytes(c.array(&what)?)),
        ValueType::I32 => MetadataValue::I32(i32::from_le_bytes(c.array(&what)?)),
        ValueType::F32 => MetadataValue::F32(f32::from_le_bytes(c.array(&what)?)),
        ValueType::U64 => MetadataValue::U64(u64::from_le_bytes(c.array(&what)?)),
        ValueType::I64 => MetadataValue::I64(i64::from_le_bytes(c.array(&what)?)),
        ValueType::F64 => MetadataValue::F64(f64::from_le_bytes(c.array(&what)?)),
        ValueType::Bool => MetadataValue::Bool(c.array::<1>(&what)?[0] != 0),
        ValueType::String => MetadataValue::String(c.string(&what)?),
        ValueType::Array => MetadataValue::Array(read_array(c, key, depth)?),
    })
}

fn read_array(c: &mut Cursor<'_>, key: &str, depth: usize) -> Result<MetadataArray> {
    let meta_err = |expected: String, found: String| HubError::GgufMetadata {
        path: c.path.to_path_buf(),
        key: key.to_string(),
        expected,
        found,
    };
    if depth >= MAX_ARRAY_DEPTH {
        return Err(meta_err(
            format!("arrays nested at most {MAX_ARRAY_DEPTH} deep"),
            "deeper nesting".into(),
        ));
    }
    let what = format!("array `{key}`");
    let ty = c.u32(&what)?;
    let ty = ValueType::from_id(ty).ok_or_else(|| {
        meta_err(
            "a GGUF element type (0..=12)".into(),
            format!("type id {ty}"),
        )
    })?;
    let n = c.u64(&what)?;
    let fits = c.remaining() / ty.min_size();
    if n > fits {
        return Err(meta_err(
            format!(
                "at most {fits} elements of {ty} (the {} bytes left in the file)",
                c.remaining()
            ),
            format!("{n} elements"),
        ));
    }
    let n = n as usize;
    macro_rules! fixed {
        ($variant:ident, $t:ty) => {{
            const W: usize = std::mem::size_of::<$t>();
            let bytes = c.take((n * W) as u64, &what)?;
            MetadataArray::$variant(
                bytes
                    .chunks_exact(W)
                    .map(|b| <$t>::from_le_bytes(b.try_into().expect("W bytes")))
                    .collect(),
            )
        }};
    }
    Ok(match ty {
        ValueType::U8 => MetadataArray::U8(c.take(n as u64, &what)?.to_vec()),
        ValueType::I8 => fixed!(I8, i8),
        ValueType::U16 => fixed!(U16, u16),
        ValueType::I16 => fixed!(I16, i16),
        ValueType::U32 => fixed!(U32, u32),
        ValueType::I32 => fixed!(I32, i32),
        ValueType::F32 => fixed!(F32, f32),
        ValueType::U64 => fixed!(U64, u64),
        ValueType::I64 => fixed!(I64, i64),
        ValueType::F64 => fixed!(F64, f64),
        ValueType::Bool => {
            MetadataArray::Bool(c.take(n as u64, &what)?.iter().map(|b| *b != 0).collect())
        }
        ValueType::String => {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                v.push(c.string(&format!("`{key}`[{i}]"))?);
            }
            MetadataArray::String(v)
        }
        ValueType::Array => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_array(c, key, depth + 1)?);
            }
            MetadataArray::Array(v)
        }
    })
}

/// A tensor info before it is placed in the data section.
struct RawInfo {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    offset: u64,
}

fn read_tensor_info(c: &mut Cursor<'_>, i: u64) -> Result<RawInfo> {
    let name = c.string(&format!("name of tensor info {i}"))?;
    let tensor_err = |expected: String, found: String| HubError::GgufTensor {
        path: c.path.to_path_buf(),
        tensor: name.clone(),
        expected,
        found,
    };
    let n_dims = c.u32(&format!("n_dims of `{name}`"))?;
    if n_dims as usize > GGML_MAX_DIMS {
        return Err(tensor_err(
            format!("at most {GGML_MAX_DIMS} dimensions"),
            n_dims.to_string(),
        ));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(c.u64(&format!("dims of `{name}`"))?);
    }
    let ty = c.u32(&format!("type of `{name}`"))?;
    let ggml_type = GgmlType::from_id(ty)
        .ok_or_else(|| tensor_err("a known GGML type id".into(), format!("type id {ty}")))?;
    let offset = c.u64(&format!("offset of `{name}`"))?;
    Ok(RawInfo {
        name,
        dims,
        ggml_type,
        offset,
    })
}

/// `general.alignment`: a `UINT32` power of two (32 when absent).
fn alignment(path: &Path, metadata: &[(String, MetadataValue)]) -> Result<u64> {
    let Some((_, v)) = metadata.iter().find(|(k, _)| k == "general.alignment") else {
        return Ok(GGUF_DEFAULT_ALIGNMENT);
    };
    match v {
        MetadataValue::U32(a) if a.is_power_of_two() => Ok(u64::from(*a)),
        other => Err(HubError::GgufMetadata {
            path: path.to_path_buf(),
            key: "general.alignment".into(),
            expected: "a UINT32 power of two".into(),
            found: match other {
                MetadataValue::U32(a) => a.to_string(),
                o => o.type_name(),
            },
        }),
    }
}

/// Size each tensor, check it against the data section and the other tensors.
fn place_tensors(
    path: &Path,
    raw: Vec<RawInfo>,
    alignment: u64,
    data_offset: u64,
    file_len: u64,
) -> Result<Vec<GgufTensorInfo>> {
    let err = |tensor: &str, expected: String, found: String| HubError::GgufTensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        expected,
        found,
    };
    if !raw.is_empty() && data_offset > file_len {
        return Err(HubError::GgufFormat {
            path: path.to_path_buf(),
            offset: data_offset,
            what: "data section".into(),
            expected: format!("to start at byte {data_offset}"),
            found: format!("a file of {file_len} bytes"),
        });
    }
    let mut names = HashMap::with_capacity(raw.len());
    let mut out = Vec::with_capacity(raw.len());
    for r in raw {
        if names.insert(r.name.clone(), ()).is_some() {
            return Err(err(
                &r.name,
                "a unique tensor name".into(),
                "a duplicate".into(),
            ));
        }
        let n_elements = r
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|n| *n <= i64::MAX as u64)
            .ok_or_else(|| {
                err(
                    &r.name,
                    "dims whose product fits in 63 bits".into(),
                    format!("{:?}", r.dims),
                )
            })?;
        let ne0 = r.dims.first().copied().unwrap_or(1);
        let row = r.ggml_type.row_bytes(ne0).map_err(|_| {
            err(
                &r.name,
                format!(
                    "ne0 a multiple of {} ({} blocks)",
                    r.ggml_type.block_size(),
                    r.ggml_type
                ),
                format!("ne0 = {ne0}"),
            )
        })? as u64;
        let rows = n_elements.checked_div(ne0).unwrap_or(0);
        let n_bytes = row.checked_mul(rows).ok_or_else(|| {
            err(
                &r.name,
                "a size that fits in 64 bits".into(),
                format!("{:?}", r.dims),
            )
        })?;
        if r.offset % alignment != 0 {
            return Err(err(
                &r.name,
                format!("an offset that is a multiple of the alignment {alignment}"),
                format!("offset {}", r.offset),
            ));
        }
        let file_offset = data_offset.checked_add(r.offset);
        let end = file_offset.and_then(|s| s.checked_add(n_bytes));
        match (file_offset, end) {
            (Some(start), Some(end)) if end <= file_len => out.push(GgufTensorInfo {
                name: r.name,
                dims: r.dims,
                ggml_type: r.ggml_type,
                offset: r.offset,
                file_offset: start,
                n_bytes,
                n_elements,
            }),
            _ => {
                return Err(err(
                    &r.name,
                    format!(
                        "{n_bytes} bytes of data ({} {:?}) inside the file",
                        r.ggml_type, r.dims
                    ),
                    format!(
                        "data at offset {} + {} of a {file_len}-byte file",
                        data_offset, r.offset
                    ),
                ))
            }
        }
    }
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by_key(|&i| out[i].file_offset);
    for w in order.windows(2) {
        let (a, b) = (&out[w[0]], &out[w[1]]);
        if a.n_bytes > 0 && b.n_bytes > 0 && a.file_offset + a.n_bytes > b.file_offset {
            return Err(err(
                &b.name,
                format!(
                    "data starting at or after offset {} (the end of `{}`)",
                    a.offset + a.n_bytes,
                    a.name
                ),
                format!("offset {}", b.offset),
            ));
        }
    }
    Ok(out)
}
