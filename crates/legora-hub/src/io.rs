//! Files: atomic writes, JSON, safetensors (single and sharded), dtype casts.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use half::{bf16, f16};
use legora_kernels::quant::{
    load_bnb_4bit, load_bnb_int8, Format, QuantMatrix, SavedTensor, Storage,
};
use legora_models::{SourceError, WeightSource};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::de::DeserializeOwned;

use crate::error::{HubError, Result};
use crate::load::LoadOptions;

/// fsync a folder, so that a rename into it survives a power loss (a no-op where
/// folders cannot be opened, as on Windows).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Remove the entries of `dir` whose names start with `prefix`: temporary files (or
/// folders) left by a process killed mid-write. Best effort.
pub fn remove_stale_temps(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = fs::remove_dir_all(&p);
            } else {
                let _ = fs::remove_file(&p);
            }
        }
    }
}

/// Write `bytes` to `path` atomically: a temporary file in the same folder, fsync,
/// rename, fsync of the folder. Readers see either the old file or the complete new
/// one, never a partial file; on any error the temporary file is removed. The one
/// atomic write of legora (model, adapter and mixture folders, checkpoints, reports).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(HubError::io(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    remove_stale_temps(dir, &format!(".{name}.tmp-"));
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{seq}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(HubError::Io {
            path: path.to_path_buf(),
            source: e,
        });
    }
    Ok(())
}

/// Whether `path` is `dir` or lies inside it, once both are resolved (symlinks, `..`);
/// `path` need not exist yet (its nearest existing ancestor is resolved and the rest
/// appended). Used to refuse an output folder over an input folder.
pub fn path_within(path: &Path, dir: &Path) -> bool {
    let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let dir = canon(dir);
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    if existing.as_os_str().is_empty() {
        existing = PathBuf::from(".");
    }
    let mut full = canon(&existing);
    full.extend(rest.iter().rev());
    full.starts_with(&dir)
}

/// Copy a file atomically (read, then [`write_atomic`]).
pub fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let bytes = read_regular(from)?;
    write_atomic(to, &bytes)
}

/// Read a regular file: a FIFO, a device (or a link to one) or a folder is
/// [`HubError::NotAFile`] before any byte is read, so it can neither block nor stream
/// for ever; the read stops at the size the file had when opened.
pub fn read_regular(path: &Path) -> std::result::Result<Vec<u8>, HubError> {
    use std::io::Read;
    let (f, len) = open_regular(path)?;
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(usize::try_from(len).unwrap_or(usize::MAX))
        .map_err(|_| HubError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!("cannot allocate {len} bytes")),
        })?;
    f.take(len)
        .read_to_end(&mut bytes)
        .map_err(HubError::io(path))?;
    Ok(bytes)
}

/// Open `path` for reading if it is a regular file (a FIFO, a device or a folder is
/// [`HubError::NotAFile`], without blocking); returns the file and its length.
fn open_regular(path: &Path) -> std::result::Result<(fs::File, u64), HubError> {
    // O_NONBLOCK: opening a FIFO with no writer must not block.
    let mut opts = fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc_nonblock());
    }
    let f = opts.open(path).map_err(HubError::io(path))?;
    let meta = f.metadata().map_err(HubError::io(path))?;
    crate::gguf::check_regular(path, &meta.file_type())?;
    Ok((f, meta.len()))
}

/// `O_NONBLOCK` (the same value on every Linux architecture and on macOS: 0x800 / 0x4).
#[cfg(unix)]
fn libc_nonblock() -> i32 {
    if cfg!(target_os = "linux") {
        0o4000
    } else {
        0x0004
    }
}

/// Read a regular file that must exist; a missing file is [`HubError::MissingFile`].
pub fn read_required(path: &Path, what: &str) -> Result<Vec<u8>> {
    match read_regular(path) {
        Ok(b) => Ok(b),
        Err(HubError::Io { source: e, .. }) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(HubError::MissingFile {
                path: path.to_path_buf(),
                what: what.into(),
            })
        }
        Err(e) => Err(e),
    }
}

/// Parse a JSON file into `T`.
pub fn read_json<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let bytes = read_required(path, what)?;
    serde_json::from_slice(&bytes).map_err(|e| HubError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Write pretty JSON atomically (with a trailing newline, as transformers does).
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| HubError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Float dtypes legora reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    /// IEEE f32.
    F32,
    /// IEEE f16.
    F16,
    /// bfloat16.
    BF16,
}

impl FloatDtype {
    /// transformers' name (`float32`, `float16`, `bfloat16`).
    pub fn torch_name(&self) -> &'static str {
        match self {
            FloatDtype::F32 => "float32",
            FloatDtype::F16 => "float16",
            FloatDtype::BF16 => "bfloat16",
        }
    }

    fn safetensors(&self) -> Dtype {
        match self {
            FloatDtype::F32 => Dtype::F32,
            FloatDtype::F16 => Dtype::F16,
            FloatDtype::BF16 => Dtype::BF16,
        }
    }
}

/// Host f32 data of a safetensors tensor (F32, F16, BF16 and F64 are cast).
fn to_f32(path: &Path, name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => {
            return Err(HubError::TensorDtype {
                path: path.to_path_buf(),
                tensor: name.into(),
                found: format!("{other:?}"),
            })
        }
    })
}

/// Refuse a tensor holding NaN or ±inf, naming the tensor and the first bad element.
/// Called once per tensor where it is read (one pass, no allocation).
pub fn check_finite(path: &Path, tensor: &str, data: &[f32]) -> Result<()> {
    match data.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(index) => Err(HubError::NonFinite {
            path: path.to_path_buf(),
            tensor: tensor.into(),
            index,
            value: data[index],
        }),
    }
}

/// One safetensors file, memory-mapped (tensors are read one at a time as asked for; the
/// mapping goes when the file is dropped), validated on open.
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: memmap2::Mmap,
}

/// `path` memory-mapped, read-only.
fn map_file(path: &Path, what: &str) -> Result<memmap2::Mmap> {
    let (file, len) = match open_regular(path) {
        Ok(f) => f,
        Err(HubError::Io { source: e, .. }) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(HubError::MissingFile {
                path: path.to_path_buf(),
                what: what.into(),
            })
        }
        Err(e) => return Err(e),
    };
    if len == 0 {
        return Err(HubError::Safetensors {
            path: path.to_path_buf(),
            message: "the file is empty".into(),
        });
    }
    // SAFETY: the mapping is read-only and private to this process; legora never writes
    // through it. Another process truncating or rewriting the file while it is mapped is
    // outside what any reader can defend against (safetensors' and llama.cpp's mmap
    // loaders have the same contract); every offset is checked against the mapping's
    // length when the header is validated.
    unsafe { memmap2::Mmap::map(&file) }.map_err(HubError::io(path))
}

impl SafetensorsFile {
    /// Map and validate (header, offsets, file length: a truncated file is refused).
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = map_file(path, "safetensors weights")?;
        SafeTensors::deserialize(&bytes).map_err(|e| HubError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
        })
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated in open")
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self
            .tensors()
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        n.sort();
        n
    }

    /// `(dtype, shape)` of a tensor.
    pub fn info(&self, name: &str) -> Option<(String, Vec<usize>)> {
        let st = self.tensors();
        let v = st.tensor(name).ok()?;
        Some((format!("{:?}", v.dtype()), v.shape().to_vec()))
    }

    /// The `__metadata__` map.
    pub fn metadata(&self) -> HashMap<String, String> {
        SafeTensors::read_metadata(&self.bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .unwrap_or_default()
    }

    /// A tensor as f32 host data, or `None` if absent.
    pub fn tensor(&self, name: &str) -> Result<Option<TensorData>> {
        let st = self.tensors();
        let view = match st.tensor(name) {
            Ok(v) => v,
            Err(_) => return Ok(None),
        };
        let data = to_f32(&self.path, name, &view)?;
        self.release(view.data());
        check_finite(&self.path, name, &data)?;
        Ok(Some(TensorData::new(data, view.shape().to_vec())))
    }

    /// Drops the mapped pages of `data` (a tensor of this file that has just been copied
    /// out) from the process's resident memory, so that loading tensor by tensor peaks at
    /// what is kept plus one tensor, not plus the whole file. The pages stay in the page
    /// cache; reading them again maps them again. Best effort: a refusal changes nothing.
    fn release(&self, data: &[u8]) {
        #[cfg(unix)]
        {
            let offset = data.as_ptr() as usize - self.bytes.as_ptr() as usize;
            // SAFETY: the mapping is a read-only file mapping nothing in this process
            // writes; MADV_DONTNEED only drops its resident pages, and a later read of any
            // borrowed slice faults them in again from the unchanged file (the same
            // contract as the mapping itself). `data` lies inside the mapping (a view
            // of it), so the range is in bounds.
            let _ = unsafe {
                self.bytes.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    offset,
                    data.len(),
                )
            };
        }
        #[cfg(not(unix))]
        let _ = data;
    }

    /// `bits` (bf16 or f16) unless one is NaN or ±inf (all exponent bits set: `exp_mask`).
    fn finite_halves(&self, name: &str, bits: Vec<u16>, exp_mask: u16) -> Result<Vec<u16>> {
        match bits.iter().position(|h| h & exp_mask == exp_mask) {
            None => Ok(bits),
            Some(index) => {
                let h = bits[index];
                let value = if exp_mask == 0x7f80 {
                    half::bf16::from_bits(h).to_f32()
                } else {
                    half::f16::from_bits(h).to_f32()
                };
                Err(HubError::NonFinite {
                    path: self.path.clone(),
                    tensor: name.into(),
                    index,
                    value,
                })
            }
        }
    }

    /// A 2-D tensor in storage `format`, converted as read (a bf16 / f16 tensor asked in
    /// its own dtype is copied bit for bit, anything else goes through one f32 copy of
    /// this tensor), or `None` if absent.
    pub fn frozen(&self, name: &str, format: Format) -> Result<Option<QuantMatrix>> {
        let st = self.tensors();
        let Ok(view) = st.tensor(name) else {
            return Ok(None);
        };
        let [rows, cols] = view.shape()[..] else {
            return Err(HubError::TensorShape {
                path: self.path.clone(),
                tensor: name.into(),
                expected: vec![0, 0],
                found: view.shape().to_vec(),
            });
        };
        let halves = || -> Vec<u16> {
            view.data()
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        };
        let storage = match (format, view.dtype()) {
            (Format::Bf16, Dtype::BF16) => {
                Storage::Bf16(self.finite_halves(name, halves(), 0x7f80)?)
            }
            (Format::F16, Dtype::F16) => {
                Storage::F16(self.finite_halves(name, halves(), 0x7c00)?)
            }
            _ => {
                let data = to_f32(&self.path, name, &view)?;
                check_finite(&self.path, name, &data)?;
                Storage::F32(data)
            }
        };
        self.release(view.data());
        let m = QuantMatrix::new(name, rows, cols, storage).map_err(crate::load::kernel(name))?;
        crate::load::convert(name, m, format).map(Some)
    }
}

/// Where a multimodal checkpoint keeps its text model's tensors: `(HF prefix, stored
/// prefix)`, the layout transformers 4.52–4.57 wrote (`model.language_model.layers.0...`)
/// and the one of the Hub's Gemma 3 checkpoints, which transformers 5 writes again
/// (`language_model.model.layers.0...`, `language_model.lm_head`).
const TEXT_MODEL_PREFIXES: [(&str, &str); 3] = [
    ("model.", "model.language_model."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
];

/// `model.safetensors` or the shards of `model.safetensors.index.json`, as a
/// [`WeightSource`]. A multimodal checkpoint's text model is read under its prefix
/// (`model.layers.0.self_attn.q_proj.weight` from
/// `model.language_model.layers.0.self_attn.q_proj.weight`); its other tensors (the
/// vision tower) are not read.
pub struct Checkpoint {
    files: Vec<SafetensorsFile>,
    /// How the frozen projections are stored.
    options: LoadOptions,
    /// tensor name → index into `files`.
    index: HashMap<String, usize>,
    dir: PathBuf,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    /// Open the weights of an HF model folder.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut index = HashMap::new();
        if index_path.exists() {
            let idx: ShardIndex = read_json(&index_path, "shard index")?;
            let mut shard_names: Vec<&String> = idx.weight_map.values().collect();
            shard_names.sort();
            shard_names.dedup();
            for shard in shard_names {
                if shard.contains("..") || Path::new(shard).is_absolute() {
                    return Err(HubError::Json {
                        path: index_path.clone(),
                        message: format!("shard file name `{shard}` leaves the model folder"),
                    });
                }
                let f = SafetensorsFile::open(&dir.join(shard))?;
                let i = files.len();
                for (t, s) in &idx.weight_map {
                    if s == shard {
                        if f.info(t).is_none() {
                            return Err(HubError::MissingTensor {
                                path: f.path().to_path_buf(),
                                tensor: t.clone(),
                            });
                        }
                        index.insert(t.clone(), i);
                    }
                }
                files.push(f);
            }
        } else if single.exists() {
            let f = SafetensorsFile::open(&single)?;
            for n in f.names() {
                index.insert(n, 0);
            }
            files.push(f);
        } else if dir.join("pytorch_model.bin").exists() {
            return Err(HubError::MissingFile {
                path: single,
                what: "safetensors weights (pytorch_model.bin is a pickle, which legora does not \
                       read: convert it with transformers' save_pretrained(safe_serialization=True))"
                    .into(),
            });
        } else {
            return Err(HubError::MissingFile {
                path: single,
                what: "model weights (model.safetensors or model.safetensors.index.json)".into(),
            });
        }
        Ok(Self {
            files,
            options: LoadOptions::default(),
            index,
            dir: dir.to_path_buf(),
        })
    }

    /// Store the frozen projections as `options` says ([`WeightSource::frozen`]).
    pub fn with_options(mut self, options: LoadOptions) -> Self {
        self.options = options;
        self
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A weight transformers saved quantized with bitsandbytes (`name` = `M.weight`
    /// stored as U8 codes with its `M.weight.quant_state.*` and absmax tensors, or as I8
    /// with `M.SCB`), read as it is; `None` for a float weight.
    fn prequantized(&self, name: &str) -> Result<Option<QuantMatrix>> {
        let i = self.index[name];
        let file = &self.files[i];
        let dtype = file.tensors().tensor(name).map(|v| v.dtype());
        let Ok(dtype @ (Dtype::U8 | Dtype::I8)) = dtype else {
            return Ok(None);
        };
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let prefix = format!("{module}.");
        // Every tensor of the module, with owned dtype names and shapes for SavedTensor.
        let mut parts: Vec<(String, String, Vec<usize>, &[u8])> = Vec::new();
        for (key, &j) in self.index.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            let st = self.files[j].tensors();
            let Ok(v) = st.tensor(key) else { continue };
            parts.push((
                key.clone(),
                format!("{:?}", v.dtype()),
                v.shape().to_vec(),
                v.data(),
            ));
        }
        let get = |key: &str| {
            parts
                .iter()
                .find(|(k, ..)| k == key)
                .map(|(_, dtype, shape, data)| SavedTensor {
                    dtype: dtype.as_str(),
                    shape: shape.as_slice(),
                    data,
                })
        };
        let read = match dtype {
            Dtype::U8 => load_bnb_4bit(module, get),
            _ => load_bnb_int8(module, get),
        };
        read.map(Some).map_err(|e| HubError::Quantization {
            tensor: name.to_string(),
            message: format!(
                "{}: a bitsandbytes {} weight that cannot be read: {e}",
                file.path().display(),
                if dtype == Dtype::U8 { "4-bit" } else { "8-bit" }
            ),
        })
    }

    /// The name `name` (an HF text-model name) is stored under: itself, or the same under a
    /// multimodal checkpoint's text-model prefix ([`TEXT_MODEL_PREFIXES`]).
    fn stored_name(&self, name: &str) -> Option<String> {
        if self.index.contains_key(name) {
            return Some(name.to_string());
        }
        TEXT_MODEL_PREFIXES.iter().find_map(|(hf, stored)| {
            let rest = name.strip_prefix(hf)?;
            let key = format!("{stored}{rest}");
            self.index.contains_key(&key).then_some(key)
        })
    }

    /// The dtype of the first tensor (the checkpoint's dtype).
    pub fn dtype(&self) -> Option<String> {
        let f = self.files.first()?;
        let n = f.names().into_iter().next()?;
        f.info(&n).map(|(d, _)| d)
    }
}

impl WeightSource for Checkpoint {
    fn tensor(&mut self, name: &str) -> std::result::Result<Option<TensorData>, SourceError> {
        let Some(stored) = self.stored_name(name) else {
            return Ok(None);
        };
        self.files[self.index[&stored]]
            .tensor(&stored)
            .map_err(|e| Box::new(e) as SourceError)
    }

    fn frozen(&mut self, name: &str) -> std::result::Result<Option<QuantMatrix>, SourceError> {
        let Some(stored) = self.stored_name(name) else {
            return Ok(None);
        };
        let i = self.index[&stored];
        let read = match self.prequantized(&stored) {
            Ok(Some(m)) => Ok(Some(m)),
            Ok(None) => self.files[i].frozen(&stored, self.options.format_of(name)),
            Err(e) => Err(e),
        };
        read.map_err(|e| Box::new(e) as SourceError)
    }
}

/// Serialize tensors to safetensors bytes in `dtype`, with `metadata`.
pub fn safetensors_bytes(
    path: &Path,
    tensors: &[(String, TensorData)],
    dtype: FloatDtype,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, data) in tensors {
        let values: Vec<f32> = data
            .clone()
            .convert_dtype(DType::F32)
            .into_vec::<f32>()
            .map_err(|e| HubError::Safetensors {
                path: path.to_path_buf(),
                message: format!("tensor `{name}`: {e:?}"),
            })?;
        let bytes: Vec<u8> = match dtype {
            FloatDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            FloatDtype::F16 => values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            FloatDtype::BF16 => values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
        };
        buffers.push((name.clone(), data.shape.to_vec(), bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, shape, b)| {
            TensorView::new(dtype.safetensors(), shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| HubError::Safetensors {
                    path: path.to_path_buf(),
                    message: format!("tensor `{n}`: {e}"),
                })
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, metadata).map_err(|e| HubError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Write tensors as one safetensors file, atomically, with `{"format": "pt"}` metadata
/// (what transformers and PEFT write).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, TensorData)],
    dtype: FloatDtype,
) -> Result<()> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors_bytes(path, tensors, dtype, Some(meta))?;
    write_atomic(path, &bytes)
}
