//! The crate's error type.

/// Errors of legora-kernels (storage formats and their conversions).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A buffer does not have the size its format requires.
    #[error("{what}: expected {expected} bytes, found {found}")]
    Size {
        /// What the buffer holds (tensor name or format).
        what: String,
        /// Bytes required.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// A value outside what the format allows.
    #[error("{what}: {message}")]
    Invalid {
        /// What was checked (tensor name, format, field).
        what: String,
        /// What is wrong, with the expected and found values.
        message: String,
    },
    /// A buffer or tensor with the wrong number of elements.
    #[error("{what}: expected {expected} elements, found {found}")]
    Length {
        /// What the buffer holds (tensor name or format).
        what: String,
        /// Elements required.
        expected: usize,
        /// Elements present.
        found: usize,
    },
    /// A tensor a stored format needs is absent (e.g. a bitsandbytes quant state).
    #[error("missing tensor {what}")]
    Missing {
        /// The full key of the absent tensor.
        what: String,
    },
    /// A tensor stored with a dtype its format does not allow.
    #[error("{what}: expected dtype {expected}, found {found}")]
    Dtype {
        /// The tensor's key.
        what: String,
        /// The dtype(s) allowed.
        expected: String,
        /// The dtype present.
        found: String,
    },
    /// A storage format (or one of its types) the operation does not implement.
    #[error("{what}: {format} is not supported ({message})")]
    Unsupported {
        /// The operation (dequantization, ...).
        what: String,
        /// The format or type asked for (`IQ2_XXS`, ...).
        format: String,
        /// What is supported instead.
        message: String,
    },
}

/// `Result` with [`KernelError`].
pub type Result<T> = std::result::Result<T, KernelError>;
