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
