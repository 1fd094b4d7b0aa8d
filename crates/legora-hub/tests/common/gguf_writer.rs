//! A minimal GGUF writer for tests (little-endian, version 3, alignment 32): whole files
//! from metadata and tensors, or a fixture's contents edited and written back.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use legora_hub::gguf::{GgufFile, MetadataArray, MetadataValue};

/// `tests/fixtures/gguf/<stem>.gguf` (made by tests/fixtures/make_gguf_fixtures.py).
pub fn fixture(stem: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../tests/fixtures/gguf/{stem}.gguf"))
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn type_id(v: &MetadataValue) -> u32 {
    v.value_type() as u32
}

fn put_array(out: &mut Vec<u8>, a: &MetadataArray) {
    out.extend((a.element_type() as u32).to_le_bytes());
    out.extend((a.len() as u64).to_le_bytes());
    match a {
        MetadataArray::U8(v) => out.extend(v),
        MetadataArray::I8(v) => v.iter().for_each(|x| out.push(*x as u8)),
        MetadataArray::U16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetadataArray::I16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetadataArray::U32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetadataArray::I32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetadataArray::F32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetadataArray::U64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetadataArray::I64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetadataArray::F64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetadataArray::Bool(v) => v.iter().for_each(|x| out.push(*x as u8)),
        MetadataArray::String(v) => v.iter().for_each(|s| put_str(out, s)),
        MetadataArray::Array(v) => v.iter().for_each(|x| put_array(out, x)),
    }
}

fn put_value(out: &mut Vec<u8>, v: &MetadataValue) {
    match v {
        MetadataValue::U8(x) => out.push(*x),
        MetadataValue::I8(x) => out.push(*x as u8),
        MetadataValue::U16(x) => out.extend(x.to_le_bytes()),
        MetadataValue::I16(x) => out.extend(x.to_le_bytes()),
        MetadataValue::U32(x) => out.extend(x.to_le_bytes()),
        MetadataValue::I32(x) => out.extend(x.to_le_bytes()),
        MetadataValue::F32(x) => out.extend(x.to_le_bytes()),
        MetadataValue::U64(x) => out.extend(x.to_le_bytes()),
        MetadataValue::I64(x) => out.extend(x.to_le_bytes()),
        MetadataValue::F64(x) => out.extend(x.to_le_bytes()),
        MetadataValue::Bool(x) => out.push(*x as u8),
        MetadataValue::String(s) => put_str(out, s),
        MetadataValue::Array(a) => put_array(out, a),
    }
}

/// One tensor to write: name, GGML dims, type id, its bytes, and an offset override.
pub struct T {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
    pub offset: Option<u64>,
}

/// A GGUF file of `meta` and `tensors`, aligned to `general.alignment` when `meta` sets
/// it as a `UINT32` (else 32).
pub fn write_gguf(meta: &[(String, MetadataValue)], tensors: &[T]) -> Vec<u8> {
    let align = meta
        .iter()
        .find_map(|(k, v)| match v {
            MetadataValue::U32(a) if k == "general.alignment" && *a > 0 => Some(u64::from(*a)),
            _ => None,
        })
        .unwrap_or(32);
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        out.extend(type_id(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(t.ty.to_le_bytes());
        out.extend(t.offset.unwrap_or(offset).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len() as u64).next_multiple_of(align);
    }
    out.resize(out.len().next_multiple_of(align as usize), 0);
    let start = out.len();
    for (t, o) in tensors.iter().zip(offsets) {
        out.resize(start + o as usize, 0);
        out.extend(&t.data);
    }
    out
}

/// A fixture's metadata and tensors, to edit and write back.
pub fn parts(stem: &str) -> (Vec<(String, MetadataValue)>, Vec<T>) {
    let f = GgufFile::open(fixture(stem)).unwrap();
    let tensors = f
        .tensor_infos()
        .iter()
        .map(|i| T {
            name: i.name.clone(),
            dims: i.dims.clone(),
            ty: i.ggml_type.id(),
            data: f.tensor(&i.name).unwrap().data.to_vec(),
            offset: None,
        })
        .collect();
    (f.metadata().to_vec(), tensors)
}
