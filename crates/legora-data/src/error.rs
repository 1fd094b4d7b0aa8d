//! The one error type of `legora-data`.

/// Everything that can go wrong between a record and a batch.
///
/// Each variant names the task, record, key or state field involved, with the
/// expected and the found value.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum DataError {
    /// A record cannot be rendered by the chosen template.
    #[error("task `{task}`, record {index}: {message}")]
    Record {
        /// Task name of the record.
        task: String,
        /// Index of the record within its task (0-based), when known.
        index: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An option holds a value outside its domain.
    #[error("invalid value for `{key}`: expected {expected}, found {found}")]
    Config {
        /// The option name (run-file spelling).
        key: String,
        /// What would have been accepted.
        expected: String,
        /// What was given.
        found: String,
    },
    /// A task has no examples left to sample from.
    #[error("task `{task}` has no {what}")]
    EmptyTask {
        /// The task.
        task: String,
        /// What is missing (e.g. "training examples").
        what: String,
    },
    /// A saved sampler/loader state does not fit the data it is restored onto.
    #[error("cannot restore data state: `{field}` expected {expected}, found {found}")]
    State {
        /// The state field.
        field: String,
        /// Value required by the current data.
        expected: String,
        /// Value in the saved state.
        found: String,
    },
}

/// `Result` with [`DataError`].
pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    /// Shorthand for [`DataError::Config`].
    pub fn config(
        key: impl Into<String>,
        expected: impl Into<String>,
        found: impl std::fmt::Display,
    ) -> Self {
        Self::Config {
            key: key.into(),
            expected: expected.into(),
            found: found.to_string(),
        }
    }

    /// Shorthand for [`DataError::State`].
    pub fn state(
        field: impl Into<String>,
        expected: impl std::fmt::Display,
        found: impl std::fmt::Display,
    ) -> Self {
        Self::State {
            field: field.into(),
            expected: expected.to_string(),
            found: found.to_string(),
        }
    }
}
