//! The one error type of `legora-nn`.

/// Everything that can go wrong when building or running legora's layers.
///
/// Each variant names the offending field, adapter or tensor together with the
/// expected and the found value, so a message can be acted on without a debugger.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum NnError {
    /// A configuration field holds a value outside its domain.
    #[error("invalid value for `{field}`: expected {expected}, found {found}")]
    InvalidConfig {
        /// The config key, with PEFT / MixLoRA spelling (e.g. `lora_dropout`).
        field: String,
        /// What would have been accepted.
        expected: String,
        /// What was given.
        found: String,
    },
    /// A config option that PEFT knows but legora does not implement (yet).
    #[error("unsupported option `{field}` = {found}: {reason}")]
    Unsupported {
        /// The config key.
        field: String,
        /// The given value.
        found: String,
        /// Why, and what to use instead.
        reason: String,
    },
    /// A tensor did not have the shape the layer needs.
    #[error("shape mismatch for `{tensor}`: expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// Which tensor (PEFT/HF name where there is one).
        tensor: String,
        /// The required shape.
        expected: Vec<usize>,
        /// The shape given.
        found: Vec<usize>,
    },
    /// An adapter name that the layer does not hold.
    #[error("unknown adapter `{name}` (the layer has: {available:?})")]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The names the layer holds.
        available: Vec<String>,
    },
    /// An adapter name used twice.
    #[error("adapter `{name}` already exists")]
    DuplicateAdapter {
        /// The name.
        name: String,
    },
    /// An operation that is not valid in the layer's current state.
    #[error("{0}")]
    InvalidState(String),
}

/// `Result` with [`NnError`].
pub type Result<T> = std::result::Result<T, NnError>;

impl NnError {
    /// Shorthand for [`NnError::InvalidConfig`].
    pub fn config(
        field: impl Into<String>,
        expected: impl Into<String>,
        found: impl std::fmt::Display,
    ) -> Self {
        Self::InvalidConfig {
            field: field.into(),
            expected: expected.into(),
            found: found.to_string(),
        }
    }

    /// Shorthand for [`NnError::ShapeMismatch`].
    pub fn shape(tensor: impl Into<String>, expected: &[usize], found: &[usize]) -> Self {
        Self::ShapeMismatch {
            tensor: tensor.into(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        }
    }
}
