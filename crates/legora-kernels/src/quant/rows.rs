//! A frozen weight built a block of rows at a time ([`RowBlocks`]), so that its f32 form
//! never exists whole: a random benchmark model generated straight into NF4, say.

use super::bnb::{Absmax, Bnb4bit, FourBit, NestedAbsmax, DEFAULT_BLOCKSIZE};
use super::matrix::numel;
use super::{Blob, Format, QuantMatrix, Storage};
use crate::{KernelError, Result};

/// Stacks blocks of rows, each quantized on its own into the format without double
/// quantization ([`Format::without_double_quant`]), into one `[rows, cols]` weight equal
/// to [`QuantMatrix::quantize`] of the whole: every block but the last has a multiple of
/// [`RowBlocks::row_block`] rows, so 4-bit blocks never straddle two row blocks, and
/// double quantization runs once over all block scales at the end. The finished part is
/// allocated once, up front: memory holds the weight plus the blocks not yet pushed.
#[derive(Debug)]
pub struct RowBlocks {
    name: String,
    rows: usize,
    cols: usize,
    format: Format,
    done: usize,
    blocks: usize,
    storage: Storage,
}

impl RowBlocks {
    /// Rows per block: a multiple of 128 (so that a block of any width holds whole 4-bit
    /// blocks and an even number of codes) of about 2^20 elements.
    pub fn row_block(cols: usize) -> usize {
        128 * (((1usize << 20) / cols.max(1)) / 128).max(1)
    }

    /// An empty `[rows, cols]` weight in `format` named `name` (in errors), its storage
    /// reserved; an error when the size overflows or cannot be allocated.
    pub fn new(name: &str, (rows, cols): (usize, usize), format: Format) -> Result<Self> {
        let n = numel(name, rows, cols)?;
        let storage = reserved(format, n, rows).map_err(|e| KernelError::Invalid {
            what: name.to_string(),
            message: format!("cannot allocate [{rows}, {cols}] {}: {e}", format.name()),
        })?;
        Ok(RowBlocks {
            name: name.to_string(),
            rows,
            cols,
            format,
            done: 0,
            blocks: 0,
            storage,
        })
    }

    /// Appends the next block of rows; refused when its width or format differs, it
    /// overruns the weight, or the block before it was not a multiple of
    /// [`RowBlocks::row_block`] rows.
    pub fn push(&mut self, block: QuantMatrix) -> Result<()> {
        let part = self.format.without_double_quant();
        let step = Self::row_block(self.cols);
        let (i, name) = (self.blocks, &self.name);
        let message = if block.cols() != self.cols || block.format() != part {
            Some(format!(
                "row block {i} is [{}, {}] {}, expected [_, {}] {}",
                block.rows(),
                block.cols(),
                block.format().name(),
                self.cols,
                part.name()
            ))
        } else if self.done % step != 0 {
            Some(format!(
                "the row blocks before block {i} end at row {}, not a multiple of {step}",
                self.done
            ))
        } else if self.done + block.rows() > self.rows {
            Some(format!(
                "row block {i} ends at row {}, past the weight's {}",
                self.done + block.rows(),
                self.rows
            ))
        } else {
            None
        };
        if let Some(message) = message {
            return Err(KernelError::Invalid {
                what: name.clone(),
                message,
            });
        }
        self.done += block.rows();
        self.blocks += 1;
        append(&mut self.storage, block.into_storage());
        Ok(())
    }

    /// The finished weight; an error when rows are missing.
    pub fn finish(mut self) -> Result<QuantMatrix> {
        if self.done != self.rows {
            return Err(KernelError::Length {
                what: format!("{} (rows pushed)", self.name),
                expected: self.rows,
                found: self.done,
            });
        }
        if let (Storage::Bnb4(q), Format::Nf4 { double_quant: true })
        | (Storage::Bnb4(q), Format::Fp4 { double_quant: true }) =
            (&mut self.storage, self.format)
        {
            if let Absmax::F32(a) = &q.absmax {
                q.absmax = Absmax::Nested(NestedAbsmax::quantize(a));
            }
        }
        QuantMatrix::new(&self.name, self.rows, self.cols, self.storage)
    }
}

impl QuantMatrix {
    /// Quantizes a weight produced a block of rows at a time ([`RowBlocks`]):
    /// `block(row0, nrows, out)` fills rows `row0..row0 + nrows` (`nrows · cols` elements
    /// of `out`). Equal to [`QuantMatrix::quantize`] of the whole weight.
    pub fn quantize_by_rows(
        name: &str,
        (rows, cols): (usize, usize),
        format: Format,
        mut block: impl FnMut(usize, usize, &mut [f32]),
    ) -> Result<Self> {
        let mut out = RowBlocks::new(name, (rows, cols), format)?;
        let step = RowBlocks::row_block(cols);
        let mut buf = Vec::new();
        for row0 in (0..rows).step_by(step) {
            let nrows = step.min(rows - row0);
            buf.resize(nrows * cols, 0.0);
            block(row0, nrows, &mut buf);
            let part = format.without_double_quant();
            out.push(Self::quantize(name, &buf, nrows, cols, part)?)?;
        }
        out.finish()
    }

    /// Stacks blocks of rows quantized one at a time (see [`RowBlocks`]).
    pub fn from_row_blocks(
        name: &str,
        cols: usize,
        format: Format,
        blocks: Vec<QuantMatrix>,
    ) -> Result<Self> {
        let rows = blocks.iter().map(|b| b.rows()).sum();
        let mut out = RowBlocks::new(name, (rows, cols), format)?;
        for b in blocks {
            out.push(b)?;
        }
        out.finish()
    }
}

/// Empty storage of `format` (without double quantization) with room for `n` elements
/// in `rows` rows.
fn reserved(
    format: Format,
    n: usize,
    rows: usize,
) -> std::result::Result<Storage, std::collections::TryReserveError> {
    fn vec<T>(n: usize) -> std::result::Result<Vec<T>, std::collections::TryReserveError> {
        let mut v = Vec::new();
        v.try_reserve_exact(n)?;
        Ok(v)
    }
    Ok(match format {
        Format::F32 => Storage::F32(vec(n)?),
        Format::Bf16 => Storage::Bf16(vec(n)?),
        Format::F16 => Storage::F16(vec(n)?),
        Format::Int8 => Storage::Int8 {
            codes: vec(n)?,
            scales: vec(rows)?,
        },
        Format::Nf4 { .. } | Format::Fp4 { .. } => Storage::Bnb4(Bnb4bit {
            kind: match format {
                Format::Fp4 { .. } => FourBit::Fp4,
                _ => FourBit::Nf4,
            },
            blocksize: DEFAULT_BLOCKSIZE,
            packed: vec(n.div_ceil(2))?,
            absmax: Absmax::F32(vec(n.div_ceil(DEFAULT_BLOCKSIZE))?),
        }),
        Format::Ggml(ty) => Storage::Ggml {
            ty,
            data: Blob::Owned(vec(n / ty.block_size() * ty.type_size())?),
        },
    })
}

/// `part` (checked to be of `out`'s format) appended to `out`.
fn append(out: &mut Storage, part: Storage) {
    match (out, part) {
        (Storage::F32(a), Storage::F32(b)) => a.extend(b),
        (Storage::Bf16(a), Storage::Bf16(b)) | (Storage::F16(a), Storage::F16(b)) => a.extend(b),
        (
            Storage::Int8 { codes, scales },
            Storage::Int8 {
                codes: c,
                scales: s,
            },
        ) => {
            codes.extend(c);
            scales.extend(s);
        }
        (
            Storage::Ggml {
                data: Blob::Owned(a),
                ..
            },
            Storage::Ggml { data: b, .. },
        ) => a.extend_from_slice(&b),
        (Storage::Bnb4(a), Storage::Bnb4(b)) => {
            a.packed.extend(b.packed);
            if let (Absmax::F32(x), Absmax::F32(y)) = (&mut a.absmax, b.absmax) {
                x.extend(y);
            }
        }
        _ => unreachable!("RowBlocks::push checks the format"),
    }
}
