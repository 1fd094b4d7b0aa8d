//! A frozen `[rows, cols]` weight kept in its storage format ([`QuantMatrix`], owned, or
//! [`QuantView`], borrowed), dequantized a few rows or a tile at a time.

use super::bnb::{check_len, Bnb4View, Bnb4bit, FourBit, DEFAULT_BLOCKSIZE};
use super::ggml::{self, GgmlType};
use super::{float16, int8};
use crate::{KernelError, Result};

/// A storage format (what a weight is kept as), without its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// f32, as is.
    F32,
    /// bfloat16 bits.
    Bf16,
    /// IEEE half bits.
    F16,
    /// bitsandbytes LLM.int8(): int8 codes, one f32 scale per row.
    Int8,
    /// bitsandbytes NF4, block size [`DEFAULT_BLOCKSIZE`] when quantized here.
    Nf4 {
        /// Whether the block scales are themselves quantized (`compress_statistics`).
        double_quant: bool,
    },
    /// bitsandbytes FP4, block size [`DEFAULT_BLOCKSIZE`] when quantized here.
    Fp4 {
        /// Whether the block scales are themselves quantized (`compress_statistics`).
        double_quant: bool,
    },
    /// A GGUF file's blocks as they are (`Q8_0`, `Q4_0`, `Q4_K`, `Q6_K`, ...: the block
    /// types [`ggml::is_block_storage`] accepts), each row its whole blocks. Read, never
    /// made here: [`QuantMatrix::quantize`] refuses it.
    Ggml(GgmlType),
}

impl Format {
    /// Every storage format, dense first.
    pub const ALL: [Format; 8] = [
        Format::F32,
        Format::Bf16,
        Format::F16,
        Format::Int8,
        Format::Nf4 {
            double_quant: false,
        },
        Format::Nf4 { double_quant: true },
        Format::Fp4 {
            double_quant: false,
        },
        Format::Fp4 { double_quant: true },
    ];

    /// A short name for messages and reports (`"nf4-dq"`, `"bf16"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::Bf16 => "bf16",
            Format::F16 => "f16",
            Format::Int8 => "int8",
            Format::Nf4 {
                double_quant: false,
            } => "nf4",
            Format::Nf4 { double_quant: true } => "nf4-dq",
            Format::Fp4 {
                double_quant: false,
            } => "fp4",
            Format::Fp4 { double_quant: true } => "fp4-dq",
            Format::Ggml(ty) => ty.name(),
        }
    }

    /// Bytes a `[rows, cols]` weight takes in this format, as [`QuantMatrix::bytes`]
    /// counts them (4-bit formats at block size [`DEFAULT_BLOCKSIZE`]); `None` when the
    /// count overflows.
    pub fn bytes(self, rows: usize, cols: usize) -> Option<usize> {
        let n = rows.checked_mul(cols)?;
        let blocks = n.div_ceil(DEFAULT_BLOCKSIZE);
        let absmax = |double_quant: bool| {
            if double_quant {
                blocks + 4 * blocks.div_ceil(super::bnb::NESTED_BLOCKSIZE) + 4 * 256
            } else {
                4 * blocks
            }
        };
        match self {
            Format::F32 => n.checked_mul(4),
            Format::Bf16 | Format::F16 => n.checked_mul(2),
            Format::Int8 => n.checked_add(rows.checked_mul(4)?),
            Format::Nf4 { double_quant } | Format::Fp4 { double_quant } => {
                n.div_ceil(2).checked_add(absmax(double_quant))
            }
            Format::Ggml(ty) => ty.row_bytes(cols as u64).ok()?.checked_mul(rows),
        }
    }

    /// The same format with the 4-bit block scales kept as f32 (what each block of rows
    /// given to [`super::RowBlocks`] is quantized with).
    pub fn without_double_quant(self) -> Format {
        match self {
            Format::Nf4 { .. } => Format::Nf4 {
                double_quant: false,
            },
            Format::Fp4 { .. } => Format::Fp4 {
                double_quant: false,
            },
            f => f,
        }
    }
}

/// The data of a [`QuantMatrix`], one variant per format.
#[derive(Clone, Debug, PartialEq)]
pub enum Storage {
    /// Row-major f32.
    F32(Vec<f32>),
    /// Row-major bf16 bits.
    Bf16(Vec<u16>),
    /// Row-major f16 bits.
    F16(Vec<u16>),
    /// Row-major int8 codes and one scale (`SCB`) per row.
    Int8 {
        /// `rows · cols` codes.
        codes: Vec<i8>,
        /// `rows` scales.
        scales: Vec<f32>,
    },
    /// bitsandbytes 4-bit (NF4 or FP4), blocks over the flat row-major weight.
    Bnb4(Bnb4bit),
    /// GGML blocks, each row its whole blocks, rows back to back.
    Ggml {
        /// The block type.
        ty: GgmlType,
        /// `rows · row_bytes(cols)` bytes (a mapped blob may hold up to 3 more: its
        /// length rounded to whole `i32` words).
        data: Blob,
    },
}

/// The bytes of a stored weight: owned, or shared with the memory-mapped file they were
/// read from, without a copy (a GGUF file's blocks).
#[derive(Clone, Debug)]
pub enum Blob {
    /// Bytes in memory.
    Owned(Vec<u8>),
    /// A slice of a mapped file, reference-counted ([`bytes::Bytes::from_owner`] over the
    /// mapping); its pages are the file's, read in on first use and shared with the page
    /// cache.
    Mapped(bytes::Bytes),
}

impl Blob {
    /// Whether the bytes are the mapped file's.
    pub fn is_mapped(&self) -> bool {
        matches!(self, Blob::Mapped(_))
    }
}

impl std::ops::Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Blob::Owned(v) => v,
            Blob::Mapped(b) => b,
        }
    }
}

impl From<Vec<u8>> for Blob {
    fn from(v: Vec<u8>) -> Self {
        Blob::Owned(v)
    }
}

impl PartialEq for Blob {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

/// A frozen weight `[rows, cols]` (HF layout `[out, in]`) in its storage format. The f32
/// weight never exists whole: [`QuantMatrix::dequantize_rows`] and the products in
/// [`crate::quant`] expand a few rows or a tile at a time.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    storage: Storage,
    exact_decode: bool,
}

impl QuantMatrix {
    /// Wraps stored data after checking every size against `[rows, cols]`; `name` (the
    /// tensor's key) appears in errors.
    pub fn new(name: &str, rows: usize, cols: usize, storage: Storage) -> Result<Self> {
        let m = QuantMatrix {
            rows,
            cols,
            storage,
            exact_decode: false,
        };
        QuantView::new(name, rows, cols, m.view().data)?;
        Ok(m)
    }

    /// Quantizes (or converts) a row-major f32 weight into `format`; 4-bit formats use
    /// block size [`DEFAULT_BLOCKSIZE`], as bitsandbytes does by default. Errors when the
    /// length is not `rows · cols`, an element is not finite, or a value overflows f16.
    pub fn quantize(
        name: &str,
        w: &[f32],
        rows: usize,
        cols: usize,
        format: Format,
    ) -> Result<Self> {
        let n = numel(name, rows, cols)?;
        check_len(name, n, w.len())?;
        check_finite(name, w)?;
        let storage = match format {
            Format::F32 => Storage::F32(w.to_vec()),
            Format::Bf16 => Storage::Bf16(float16::to_bf16_bits(w)),
            Format::F16 => {
                let bits = float16::to_f16_bits(w);
                if let Some(i) = bits.iter().position(|b| b & 0x7C00 == 0x7C00) {
                    return Err(KernelError::Invalid {
                        what: name.to_string(),
                        message: format!("element {i} ({}) overflows f16 (±65504)", w[i]),
                    });
                }
                Storage::F16(bits)
            }
            Format::Int8 => {
                let (codes, scales) = int8::quantize_int8(w, cols);
                Storage::Int8 { codes, scales }
            }
            Format::Nf4 { double_quant } => Storage::Bnb4(Bnb4bit::quantize(
                w,
                FourBit::Nf4,
                DEFAULT_BLOCKSIZE,
                double_quant,
            )),
            Format::Fp4 { double_quant } => Storage::Bnb4(Bnb4bit::quantize(
                w,
                FourBit::Fp4,
                DEFAULT_BLOCKSIZE,
                double_quant,
            )),
            Format::Ggml(ty) => {
                return Err(KernelError::Unsupported {
                    what: name.to_string(),
                    format: ty.name().into(),
                    message: "legora keeps a GGUF file's blocks as they are but does not \
                              quantize into them"
                        .into(),
                })
            }
        };
        Self::new(name, rows, cols, storage)
    }

    /// Quantizes into bitsandbytes 4-bit with a chosen block size (one of
    /// [`super::bnb::BLOCKSIZES`]).
    pub fn quantize_4bit(
        name: &str,
        w: &[f32],
        (rows, cols): (usize, usize),
        kind: FourBit,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self> {
        let n = numel(name, rows, cols)?;
        check_len(name, n, w.len())?;
        check_finite(name, w)?;
        if !super::bnb::BLOCKSIZES.contains(&blocksize) {
            return Err(KernelError::Invalid {
                what: name.to_string(),
                message: format!(
                    "4-bit blocksize must be one of {:?}, found {blocksize}",
                    super::bnb::BLOCKSIZES
                ),
            });
        }
        let q = Bnb4bit::quantize(w, kind, blocksize, double_quant);
        Self::new(name, rows, cols, Storage::Bnb4(q))
    }

    /// Rows (`out`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (`in`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The storage format.
    pub fn format(&self) -> Format {
        self.view().format()
    }

    /// The stored data.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The stored data, by value.
    pub fn into_storage(self) -> Storage {
        self.storage
    }

    /// Memory held by the data, in bytes.
    pub fn bytes(&self) -> usize {
        self.view().bytes()
    }

    /// The borrowed form the products read.
    pub fn view(&self) -> QuantView<'_> {
        let data = match &self.storage {
            Storage::F32(w) => ViewData::F32(w),
            Storage::Bf16(w) => ViewData::Bf16(w),
            Storage::F16(w) => ViewData::F16(w),
            Storage::Int8 { codes, scales } => ViewData::Int8 { codes, scales },
            Storage::Bnb4(q) => ViewData::Bnb4(q.view()),
            Storage::Ggml { ty, data } => ViewData::Ggml { ty: *ty, data },
        };
        QuantView {
            rows: self.rows,
            cols: self.cols,
            data,
            exact_decode: self.exact_decode,
        }
    }

    /// With `exact`, decoding products over this weight (≤ [`crate::quant::MATVEC_MAX_ROWS`]
    /// rows) keep f32 activations even where the storage has a faster integer path
    /// (GGML `Q8_0` / `Q4_0`, which otherwise quantize the activations to `Q8_0` as
    /// llama.cpp does): every product is then dequantize-then-f32 up to summation order.
    pub fn with_exact_decode(mut self, exact: bool) -> Self {
        self.exact_decode = exact;
        self
    }

    /// Whether decoding products keep f32 activations ([`Self::with_exact_decode`]).
    pub fn exact_decode(&self) -> bool {
        self.exact_decode
    }

    /// Rows `row0..row0 + nrows` as f32, into `out` (`nrows · cols` elements).
    pub fn dequantize_rows(&self, row0: usize, nrows: usize, out: &mut [f32]) -> Result<()> {
        self.view().dequantize_rows(row0, nrows, out)
    }

    /// The whole weight as f32 (for tests and export; the products never call it).
    pub fn dequantize(&self) -> Vec<f32> {
        self.view().dequantize()
    }
}

/// Borrowed storage of one weight: slices of a [`QuantMatrix`] or of tensors holding the
/// same bytes.
#[derive(Clone, Copy, Debug)]
pub enum ViewData<'a> {
    /// Row-major f32.
    F32(&'a [f32]),
    /// Row-major bf16 bits.
    Bf16(&'a [u16]),
    /// Row-major f16 bits.
    F16(&'a [u16]),
    /// Int8 codes and row scales.
    Int8 {
        /// `rows · cols` codes (more are ignored).
        codes: &'a [i8],
        /// `rows` scales.
        scales: &'a [f32],
    },
    /// bitsandbytes 4-bit.
    Bnb4(Bnb4View<'a>),
    /// GGML blocks, each row its whole blocks.
    Ggml {
        /// The block type.
        ty: GgmlType,
        /// `rows · row_bytes(cols)` bytes (more are ignored).
        data: &'a [u8],
    },
}

/// A borrowed `[rows, cols]` weight whose sizes have been checked.
#[derive(Clone, Copy, Debug)]
pub struct QuantView<'a> {
    rows: usize,
    cols: usize,
    data: ViewData<'a>,
    exact_decode: bool,
}

impl<'a> QuantView<'a> {
    /// The view with decoding products in f32 activations or not (see
    /// [`QuantMatrix::with_exact_decode`]).
    pub fn with_exact_decode(mut self, exact: bool) -> Self {
        self.exact_decode = exact;
        self
    }

    /// Whether decoding products keep f32 activations.
    pub fn exact_decode(&self) -> bool {
        self.exact_decode
    }

    /// Checks every size of `data` against `[rows, cols]` (`name` appears in errors).
    pub fn new(name: &str, rows: usize, cols: usize, data: ViewData<'a>) -> Result<Self> {
        let n = numel(name, rows, cols)?;
        match data {
            ViewData::F32(w) => check_len(name, n, w.len())?,
            ViewData::Bf16(w) | ViewData::F16(w) => check_len(name, n, w.len())?,
            ViewData::Int8 { codes, scales } => {
                if codes.len() < n {
                    return Err(KernelError::Length {
                        what: name.to_string(),
                        expected: n,
                        found: codes.len(),
                    });
                }
                check_len(
                    &format!("{name} (int8 row scales, SCB)"),
                    rows,
                    scales.len(),
                )?;
            }
            ViewData::Bnb4(q) => q.validate(name, n)?,
            ViewData::Ggml { ty, data } => check_ggml(name, ty, rows, cols, data.len())?,
        }
        Ok(QuantView {
            rows,
            cols,
            data,
            exact_decode: false,
        })
    }

    /// Rows (`out`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (`in`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The borrowed data.
    pub fn data(&self) -> ViewData<'a> {
        self.data
    }

    /// The storage format.
    pub fn format(&self) -> Format {
        match self.data {
            ViewData::F32(_) => Format::F32,
            ViewData::Bf16(_) => Format::Bf16,
            ViewData::F16(_) => Format::F16,
            ViewData::Int8 { .. } => Format::Int8,
            ViewData::Bnb4(q) => {
                let double_quant = matches!(q.absmax, super::bnb::AbsmaxView::Nested { .. });
                match q.kind {
                    FourBit::Nf4 => Format::Nf4 { double_quant },
                    FourBit::Fp4 => Format::Fp4 { double_quant },
                }
            }
            ViewData::Ggml { ty, .. } => Format::Ggml(ty),
        }
    }

    /// Memory held by the data, in bytes.
    pub fn bytes(&self) -> usize {
        let n = self.rows * self.cols;
        match self.data {
            ViewData::F32(_) => 4 * n,
            ViewData::Bf16(_) | ViewData::F16(_) => 2 * n,
            ViewData::Int8 { .. } => n + 4 * self.rows,
            ViewData::Bnb4(q) => q.bytes(n),
            // rows of whole blocks: checked when the view was made
            ViewData::Ggml { ty, .. } => self.rows * ty.row_bytes(self.cols as u64).unwrap_or(0),
        }
    }

    /// Rows `row0..row0 + nrows` as f32, into `out` (`nrows · cols` elements).
    pub fn dequantize_rows(&self, row0: usize, nrows: usize, out: &mut [f32]) -> Result<()> {
        let end = row0.checked_add(nrows).filter(|&e| e <= self.rows);
        if end.is_none() {
            return Err(KernelError::Invalid {
                what: format!(
                    "{} weight [{}, {}]",
                    self.format().name(),
                    self.rows,
                    self.cols
                ),
                message: format!("rows {row0}..{row0}+{nrows} out of range"),
            });
        }
        check_len("dequantize_rows output", nrows * self.cols, out.len())?;
        self.dequantize_flat(row0 * self.cols, out);
        Ok(())
    }

    /// The whole weight as f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        self.dequantize_flat(0, &mut out);
        out
    }

    /// Columns `col0..col0 + out.len() / nrows` of rows `row0..row0 + nrows`, row-major
    /// into `out` (a 2-D tile). In range: the caller's duty.
    #[cfg_attr(not(feature = "flex"), allow(dead_code))]
    pub(crate) fn dequantize_tile(&self, row0: usize, nrows: usize, col0: usize, out: &mut [f32]) {
        if nrows == 0 {
            return;
        }
        let width = out.len() / nrows;
        if width == self.cols {
            self.dequantize_flat(row0 * self.cols, out);
            return;
        }
        for (r, dst) in out.chunks_exact_mut(width).enumerate() {
            self.dequantize_flat((row0 + r) * self.cols + col0, dst);
        }
    }

    /// Flat elements `start..start + out.len()` as f32, into `out`. In range: the
    /// caller's duty.
    pub(crate) fn dequantize_flat(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self.data {
            ViewData::F32(w) => out.copy_from_slice(&w[start..end]),
            ViewData::Bf16(w) => float16::bf16_run(&w[start..end], out),
            ViewData::F16(w) => float16::f16_run(&w[start..end], out),
            ViewData::Int8 { codes, scales } => {
                let mut i = start;
                while i < end {
                    let row = i / self.cols;
                    let stop = ((row + 1) * self.cols).min(end);
                    let dst = &mut out[i - start..stop - start];
                    int8::dequantize_run(&codes[i..stop], scales[row], dst);
                    i = stop;
                }
            }
            ViewData::Bnb4(q) => q.dequantize_flat(start, out),
            ViewData::Ggml { ty, data } => ggml::dequantize_span(ty, data, self.cols, start, out),
        }
    }
}

/// A GGML weight's checks: a block type legora decodes, rows of whole blocks, and the
/// bytes of `rows` such rows.
fn check_ggml(name: &str, ty: GgmlType, rows: usize, cols: usize, len: usize) -> Result<()> {
    if !ggml::is_block_storage(ty) {
        return Err(KernelError::Unsupported {
            what: name.to_string(),
            format: ty.name().into(),
            message: "a frozen weight keeps only GGML block types legora decodes \
                      (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, ...)"
                .into(),
        });
    }
    let row_bytes = ty.row_bytes(cols as u64)?;
    let want = row_bytes
        .checked_mul(rows)
        .ok_or_else(|| KernelError::Invalid {
            what: name.to_string(),
            message: format!("{rows} rows of {row_bytes} bytes overflow"),
        })?;
    if len < want {
        return Err(KernelError::Size {
            what: format!("{name} ({} blocks of [{rows}, {cols}])", ty.name()),
            expected: want,
            found: len,
        });
    }
    Ok(())
}

/// `rows · cols`, or an error when it overflows.
pub(super) fn numel(name: &str, rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols).ok_or_else(|| KernelError::Invalid {
        what: name.to_string(),
        message: format!("shape [{rows}, {cols}] overflows"),
    })
}

/// An error naming the first non-finite element.
fn check_finite(name: &str, w: &[f32]) -> Result<()> {
    match w.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(KernelError::Invalid {
            what: name.to_string(),
            message: format!("element {i} is {}, cannot be quantized", w[i]),
        }),
    }
}
