//! The error a plugin returns; it crosses the ABI as JSON and keeps its kind.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::types::RowError;

/// An error produced inside a plugin. It is serializable, so the host receives
/// exactly what the plugin returned (tagged by `kind` in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PluginError {
    /// The plugin has no format with this name.
    #[error("unknown format `{name}`")]
    UnknownFormat {
        /// Requested local name.
        name: String,
    },
    /// The plugin has no evaluator with this name.
    #[error("unknown evaluator `{name}`")]
    UnknownEvaluator {
        /// Requested local name.
        name: String,
    },
    /// The plugin has no preset with this name.
    #[error("unknown preset `{name}`")]
    UnknownPreset {
        /// Requested local name.
        name: String,
    },
    /// The plugin ships no expert with this name.
    #[error("unknown expert `{name}`")]
    UnknownExpert {
        /// Requested local name.
        name: String,
    },
    /// The request itself is unusable (mismatched lengths, bad parameter, ...).
    #[error("invalid request: {message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
    },
    /// Malformed rows in strict mode, or a file-level problem in any mode.
    #[error("{}", rows_message(file, errors, *total))]
    InvalidRows {
        /// The file.
        file: String,
        /// The first errors (at most `max_errors`).
        errors: Vec<RowError>,
        /// How many rows were malformed in all.
        total: usize,
    },
    /// The request's JSON schema version is not supported.
    #[error("unsupported schema_version {got}, this plugin speaks {supported}")]
    UnsupportedSchema {
        /// Version sent.
        got: u32,
        /// Version understood.
        supported: u32,
    },
    /// The plugin panicked; the call was caught and turned into this error.
    #[error("panicked: {message}")]
    Panicked {
        /// The panic message.
        message: String,
    },
    /// Anything else.
    #[error("{message}")]
    Other {
        /// What went wrong.
        message: String,
    },
}

impl PluginError {
    /// Shorthand for [`PluginError::InvalidRequest`].
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
        }
    }

    /// Shorthand for [`PluginError::Other`].
    pub fn other(message: impl Into<String>) -> Self {
        Self::Other {
            message: message.into(),
        }
    }

    /// A file-level error (fails the file in any mode).
    pub fn file_error(error: RowError) -> Self {
        Self::InvalidRows {
            file: error.file.clone(),
            errors: vec![error],
            total: 1,
        }
    }
}

fn rows_message(file: &str, errors: &[RowError], total: usize) -> String {
    let mut s = if total == 1 {
        format!("{file}: 1 malformed row")
    } else {
        format!("{file}: {total} malformed rows")
    };
    for e in errors.iter().take(5) {
        s.push_str("\n  ");
        s.push_str(&e.to_string());
    }
    if total > errors.len().min(5) {
        s.push_str(&format!("\n  ... and {} more", total - errors.len().min(5)));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_round_trip_as_tagged_json() {
        let e = PluginError::UnknownFormat { name: "x".into() };
        let json = serde_json::to_string(&e).expect("serializes");
        assert_eq!(json, r#"{"kind":"unknown_format","name":"x"}"#);
        let back: PluginError = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, e);
    }

    #[test]
    fn invalid_rows_message_lists_rows() {
        let e = PluginError::InvalidRows {
            file: "f.csv".into(),
            errors: vec![RowError {
                file: "f.csv".into(),
                line: Some(4),
                row: Some(3),
                message: "bad".into(),
            }],
            total: 2,
        };
        let s = e.to_string();
        assert!(s.starts_with("f.csv: 2 malformed rows"), "{s}");
        assert!(s.contains("f.csv:4: row 3: bad"), "{s}");
        assert!(s.contains("and 1 more"), "{s}");
    }
}
