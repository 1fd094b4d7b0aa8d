//! [`GgufFile`]: a memory-mapped, validated GGUF file.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use legora_kernels::quant::ggml::{dequantize, GgmlType};
use memmap2::Mmap;

use super::reader::{parse, GgufTensorInfo};
use super::value::{MetadataArray, MetadataValue};
use crate::error::{HubError, Result};

/// A GGUF file (llama.cpp, Ollama), memory-mapped: the header is parsed and validated on
/// [`open`](Self::open); tensor bytes are read from the mapping when asked for, in their
/// block form ([`tensor`](Self::tensor)), shared with the mapping
/// ([`shared_words`](Self::shared_words)) or decoded to f32 ([`dequantize`](Self::dequantize)).
pub struct GgufFile {
    path: PathBuf,
    /// The mapping, reference-counted: slices handed out by `shared_words` keep it mapped
    /// after the file is dropped.
    map: bytes::Bytes,
    version: u32,
    metadata: Vec<(String, MetadataValue)>,
    keys: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    names: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// One tensor's bytes as stored: type, GGML dims (`ne0` first) and whole blocks, borrowed
/// from the mapping (for kernels that keep weights in block form).
#[derive(Debug, Clone, Copy)]
pub struct GgufTensor<'a> {
    /// The tensor's info (name, dims, type, offsets).
    pub info: &'a GgufTensorInfo,
    /// Its `info.n_bytes` bytes of blocks, `info.rows()` rows of
    /// `ggml_type.row_bytes(ne0)` bytes each.
    pub data: &'a [u8],
}

impl<'a> GgufTensor<'a> {
    /// Storage type.
    pub fn ggml_type(&self) -> GgmlType {
        self.info.ggml_type
    }

    /// GGML dims, `ne0` first.
    pub fn dims(&self) -> &'a [u64] {
        &self.info.dims
    }
}

impl GgufFile {
    /// Open, map and validate `path` (a regular file; a FIFO, a device or a folder is
    /// refused before it is opened, so nothing blocks on it).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => HubError::MissingFile {
                path: path.to_path_buf(),
                what: "GGUF model file".into(),
            },
            _ => HubError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        check_regular(path, &meta.file_type())?;
        let file = File::open(path).map_err(HubError::io(path))?;
        // Re-checked on the opened handle: the path may have been swapped in between.
        let meta = file.metadata().map_err(HubError::io(path))?;
        check_regular(path, &meta.file_type())?;
        if meta.len() < 24 {
            return Err(HubError::GgufFormat {
                path: path.to_path_buf(),
                offset: 0,
                what: "header".into(),
                expected: "at least 24 bytes (magic, version, tensor and metadata counts)".into(),
                found: format!("a file of {} bytes", meta.len()),
            });
        }
        // SAFETY: the mapping is read-only and private to this process; legora never writes
        // through it. Another process truncating or rewriting the file while it is mapped
        // is outside what any reader can defend against (it is the same contract as
        // llama.cpp's and safetensors' mmap loaders); every offset read from the mapping
        // is checked against its length when the header is parsed.
        let map = unsafe { Mmap::map(&file) }.map_err(HubError::io(path))?;
        let header = parse(path, &map)?;
        let keys = header
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let names = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            map: bytes::Bytes::from_owner(map),
            version: header.version,
            metadata: header.metadata,
            keys,
            tensors: header.tensors,
            names,
            alignment: header.alignment,
            data_offset: header.data_offset,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// `general.alignment` (32 when absent).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Offset of the data section from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Every metadata entry, in file order.
    pub fn metadata(&self) -> &[(String, MetadataValue)] {
        &self.metadata
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.keys.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Every tensor info, in file order.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The info of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.names.get(name).map(|&i| &self.tensors[i])
    }

    /// Tensor `name` in block form (bytes borrowed from the mapping).
    pub fn tensor(&self, name: &str) -> Option<GgufTensor<'_>> {
        let info = self.tensor_info(name)?;
        // Bounds checked in `parse` (file_offset + n_bytes <= file length).
        let start = info.file_offset as usize;
        let data = &self.map[start..start + info.n_bytes as usize];
        Some(GgufTensor { info, data })
    }

    /// Tensor `name`'s bytes as a slice of the mapping (no copy; the slice keeps the file
    /// mapped), extended to whole 4-byte words when the file holds the bytes after it —
    /// what legora's CPU kernels read in place as `i32` words. `None` when the file has no
    /// such tensor, its data does not start on a 4-byte boundary (a `general.alignment` of
    /// 1 or 2 allows that), or the rounding would run past the end of the file.
    pub fn shared_words(&self, name: &str) -> Option<bytes::Bytes> {
        let info = self.tensor_info(name)?;
        let start = info.file_offset as usize;
        let end = start.checked_add((info.n_bytes as usize).next_multiple_of(4))?;
        // The mapping starts on a page, so file offsets and addresses agree modulo 4.
        (start % 4 == 0 && end <= self.map.len()).then(|| self.map.slice(start..end))
    }

    /// Tensor `name` decoded to f32 (row-major, PyTorch shape [`GgufTensorInfo::shape`]),
    /// or `None` if the file has no such tensor. The buffer is sized by the validated
    /// tensor info (at most ~8 elements per byte of the tensor's data in the file).
    pub fn dequantize(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some(t) = self.tensor(name) else {
            return Ok(None);
        };
        let mut out = vec![0f32; t.info.n_elements as usize];
        dequantize(t.info.ggml_type, t.data, &mut out).map_err(|e| HubError::GgufTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            expected: "a type legora can dequantize".into(),
            found: e.to_string(),
        })?;
        Ok(Some(out))
    }

    fn meta_err(
        &self,
        key: &str,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> HubError {
        HubError::GgufMetadata {
            path: self.path.clone(),
            key: key.to_string(),
            expected: expected.into(),
            found: found.into(),
        }
    }

    fn missing(&self, key: &str, expected: &str) -> HubError {
        self.meta_err(key, expected, "no such key")
    }

    /// `key` as a non-negative integer of any width (`None` when absent; an error when it
    /// is another type).
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| self.meta_err(key, "a non-negative integer", describe(v)))
            })
            .transpose()
    }

    /// [`get_u64`](Self::get_u64) of a key that must be present, as `usize`.
    pub fn require_usize(&self, key: &str) -> Result<usize> {
        let v = self
            .get_u64(key)?
            .ok_or_else(|| self.missing(key, "a non-negative integer"))?;
        usize::try_from(v)
            .map_err(|_| self.meta_err(key, "an integer that fits in usize", v.to_string()))
    }

    /// `key` as a number (float or integer; `None` when absent).
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.meta_err(key, "a number", describe(v)))
            })
            .transpose()
    }

    /// `key` as a string (`None` when absent).
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.meta_err(key, "a STRING", describe(v)))
            })
            .transpose()
    }

    /// [`get_str`](Self::get_str) of a key that must be present.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key)?
            .ok_or_else(|| self.missing(key, "a STRING"))
    }

    /// `key` as a boolean (`None` when absent).
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.meta_err(key, "a BOOL", describe(v)))
            })
            .transpose()
    }

    /// `key` as an array (`None` when absent).
    pub fn get_array(&self, key: &str) -> Result<Option<&MetadataArray>> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .ok_or_else(|| self.meta_err(key, "an ARRAY", describe(v)))
            })
            .transpose()
    }

    /// `key` as an array of strings (`None` when absent).
    pub fn get_strings(&self, key: &str) -> Result<Option<&[String]>> {
        self.get_array(key)?
            .map(|a| {
                a.as_strings().ok_or_else(|| {
                    self.meta_err(
                        key,
                        "an ARRAY of STRING",
                        format!("an ARRAY of {}", a.element_type()),
                    )
                })
            })
            .transpose()
    }

    /// `key` as an array of floats (`None` when absent).
    pub fn get_f32s(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.get_array(key)?
            .map(|a| {
                a.to_f32s().ok_or_else(|| {
                    self.meta_err(
                        key,
                        "an ARRAY of FLOAT32",
                        format!("an ARRAY of {}", a.element_type()),
                    )
                })
            })
            .transpose()
    }

    /// `key` as an array of integers (`None` when absent).
    pub fn get_i64s(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.get_array(key)?
            .map(|a| {
                a.to_i64s().ok_or_else(|| {
                    self.meta_err(
                        key,
                        "an ARRAY of integers",
                        format!("an ARRAY of {}", a.element_type()),
                    )
                })
            })
            .transpose()
    }
}

/// A value's type and, for scalars, the value itself (for error messages).
fn describe(v: &MetadataValue) -> String {
    match v {
        MetadataValue::String(s) if s.len() <= 64 => format!("STRING {s:?}"),
        MetadataValue::Array(a) => {
            format!("an ARRAY of {} ({} elements)", a.element_type(), a.len())
        }
        MetadataValue::String(_) => "a STRING".into(),
        other => format!("{} {}", other.type_name(), scalar(other)),
    }
}

fn scalar(v: &MetadataValue) -> String {
    match v {
        MetadataValue::Bool(b) => b.to_string(),
        MetadataValue::F32(x) => x.to_string(),
        MetadataValue::F64(x) => x.to_string(),
        other => other
            .as_u64()
            .map(|u| u.to_string())
            .or_else(|| other.as_f64().map(|f| f.to_string()))
            .unwrap_or_default(),
    }
}

/// A regular file, or [`HubError::NotAFile`] saying what `path` is instead.
pub(crate) fn check_regular(path: &Path, ft: &std::fs::FileType) -> Result<()> {
    if ft.is_file() {
        return Ok(());
    }
    let found = if ft.is_dir() {
        "a folder".to_string()
    } else {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_fifo() {
                "a FIFO".to_string()
            } else if ft.is_char_device() || ft.is_block_device() {
                "a device".to_string()
            } else if ft.is_socket() {
                "a socket".to_string()
            } else {
                "not a regular file".to_string()
            }
        }
        #[cfg(not(unix))]
        {
            "not a regular file".to_string()
        }
    };
    Err(HubError::NotAFile {
        path: path.to_path_buf(),
        found,
    })
}
