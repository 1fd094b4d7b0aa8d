//! Helpers for parsers: collect records and row errors, read JSONL and JSON
//! documents with exact line numbers.
//!
//! ```
//! use legora_plugin_api::rows::RowSink;
//! use legora_plugin_api::{ParseRequest, ParseOptions, Record};
//! #[derive(serde::Deserialize)]
//! struct Row { q: String, a: String }
//!
//! let data = b"{\"q\":\"2+2\",\"a\":\"4\"}\n{\"q\":\"x\"}\n".to_vec();
//! let req = ParseRequest::new("qa", "qa.jsonl", data).with_options(ParseOptions::lenient());
//! let mut sink = RowSink::new(&req);
//! sink.jsonl(|row: Row, _pos| Ok(vec![Record::completion("demo/qa", row.q, row.a)]));
//! let out = sink.finish().unwrap();
//! assert_eq!(out.records.len(), 1);
//! assert_eq!(out.skipped, 1);
//! assert_eq!(out.errors[0].to_string(), "qa.jsonl:2: row 2: missing field `a` (column 9)");
//! ```

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::error::PluginError;
use crate::types::{ParseMode, ParseOutput, ParseRequest, Record, RowError};

/// Where a row sits in its file (both 1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowPos {
    /// Line of the row's first character.
    pub line: u64,
    /// Row / item number.
    pub row: u64,
}

/// Collects the records and row errors of one parse call.
#[derive(Debug)]
pub struct RowSink<'a> {
    request: &'a ParseRequest,
    records: Vec<Record>,
    errors: Vec<RowError>,
    skipped: usize,
}

impl<'a> RowSink<'a> {
    /// A sink for a request.
    pub fn new(request: &'a ParseRequest) -> Self {
        Self {
            request,
            records: Vec::new(),
            errors: Vec::new(),
            skipped: 0,
        }
    }

    /// The request.
    pub fn request(&self) -> &'a ParseRequest {
        self.request
    }

    /// Adds a record.
    pub fn push(&mut self, record: Record) {
        self.records.push(record);
    }

    /// Adds records.
    pub fn extend(&mut self, records: impl IntoIterator<Item = Record>) {
        self.records.extend(records);
    }

    /// Number of rows rejected so far.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Builds an error for this file.
    pub fn error(
        &self,
        line: Option<u64>,
        row: Option<u64>,
        message: impl Into<String>,
    ) -> RowError {
        RowError {
            file: self.request.file_name.clone(),
            line,
            row,
            message: message.into(),
        }
    }

    /// Rejects one row: counts it and keeps its error (up to `max_errors`).
    pub fn reject(&mut self, line: Option<u64>, row: Option<u64>, message: impl Into<String>) {
        self.skipped += 1;
        if self.errors.len() < self.request.options.max_errors {
            let error = self.error(line, row, message);
            self.errors.push(error);
        }
    }

    /// A file-level error (fails the file in any mode).
    pub fn fatal(&self, line: Option<u64>, message: impl Into<String>) -> PluginError {
        PluginError::file_error(self.error(line, None, message))
    }

    /// Finishes: strict mode with rejected rows gives
    /// [`PluginError::InvalidRows`]; otherwise the records and the count.
    pub fn finish(self) -> Result<ParseOutput, PluginError> {
        if self.request.options.mode == ParseMode::Strict && self.skipped > 0 {
            return Err(PluginError::InvalidRows {
                file: self.request.file_name.clone(),
                errors: self.errors,
                total: self.skipped,
            });
        }
        Ok(ParseOutput {
            records: self.records,
            skipped: self.skipped,
            errors: self.errors,
        })
    }

    /// The whole data as UTF-8, or a file-level error naming the line of the
    /// first invalid byte.
    pub fn text(&self) -> Result<&'a str, PluginError> {
        let data = &self.request.data;
        std::str::from_utf8(data).map_err(|e| {
            let line = 1 + data[..e.valid_up_to()]
                .iter()
                .filter(|b| **b == b'\n')
                .count() as u64;
            self.fatal(Some(line), "invalid UTF-8")
        })
    }

    /// Reads the data as JSON Lines: every non-blank line is deserialized into
    /// `T` and handed to `convert`, which returns the records of that row or a
    /// message. Undecodable lines and conversion failures are rejected with
    /// their line number; the row number counts non-blank lines.
    pub fn jsonl<T: DeserializeOwned>(
        &mut self,
        mut convert: impl FnMut(T, RowPos) -> Result<Vec<Record>, String>,
    ) {
        let data = self.request.data.as_slice();
        let mut row = 0u64;
        for (i, raw_line) in data.split(|b| *b == b'\n').enumerate() {
            let line = i as u64 + 1;
            let bytes = raw_line.strip_suffix(b"\r").unwrap_or(raw_line);
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            row += 1;
            let text = match std::str::from_utf8(bytes) {
                Ok(text) => text,
                Err(_) => {
                    self.reject(Some(line), Some(row), "invalid UTF-8");
                    continue;
                }
            };
            let text = text.strip_prefix('\u{feff}').unwrap_or(text);
            match serde_json::from_str::<T>(text) {
                Ok(value) => match convert(value, RowPos { line, row }) {
                    Ok(records) => self.extend(records),
                    Err(message) => self.reject(Some(line), Some(row), message),
                },
                Err(e) => {
                    let message = json_error_message(&e, true);
                    self.reject(Some(line), Some(row), message)
                }
            }
        }
    }

    /// Reads the data as one JSON array whose items are deserialized into `T`.
    /// A document that is not a JSON array is a file-level error; a bad item
    /// is rejected with the line where it starts (or where its error is) and
    /// its 1-based index as the row.
    pub fn json_array<T: DeserializeOwned>(
        &mut self,
        mut convert: impl FnMut(T, RowPos) -> Result<Vec<Record>, String>,
    ) -> Result<(), PluginError> {
        let text = self.text()?;
        let items: Vec<&RawValue> = serde_json::from_str(strip_bom(text)).map_err(|e| {
            self.fatal(
                Some(e.line() as u64),
                format!("not a JSON array: {}", json_error_message(&e, false)),
            )
        })?;
        for (i, item) in items.into_iter().enumerate() {
            let row = i as u64 + 1;
            let start = line_of(text, item.get());
            match from_raw::<T>(text, item) {
                Ok(value) => match convert(value, RowPos { line: start, row }) {
                    Ok(records) => self.extend(records),
                    Err(message) => self.reject(Some(start), Some(row), message),
                },
                Err((line, message)) => self.reject(Some(line), Some(row), message),
            }
        }
        Ok(())
    }
}

/// Drops a leading byte-order mark.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// 1-based line of `part` inside `text`, when `part` is a sub-slice of `text`
/// (as the borrowed `&RawValue`s of a document are); 1 otherwise.
pub fn line_of(text: &str, part: &str) -> u64 {
    let start = text.as_ptr() as usize;
    let at = part.as_ptr() as usize;
    if at < start || at > start + text.len() {
        return 1;
    }
    1 + text.as_bytes()[..at - start]
        .iter()
        .filter(|b| **b == b'\n')
        .count() as u64
}

/// Deserializes a borrowed item of `text`; an error carries the absolute line.
pub fn from_raw<T: DeserializeOwned>(text: &str, raw: &RawValue) -> Result<T, (u64, String)> {
    serde_json::from_str::<T>(raw.get()).map_err(|e| {
        let line = line_of(text, raw.get()) + (e.line() as u64).saturating_sub(1);
        // serde's column is relative to the item, not to the file's line: drop it.
        (line, json_error_message(&e, false))
    })
}

/// A serde_json error as a short message: syntax errors are prefixed with
/// `invalid JSON:`, the trailing "at line L column C" is dropped, and the
/// column is appended as `(column C)` when `with_column`.
pub fn json_error_message(e: &serde_json::Error, with_column: bool) -> String {
    let full = e.to_string();
    let core = match full.rfind(" at line ") {
        Some(i) => &full[..i],
        None => full.as_str(),
    };
    let mut message = match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            format!("invalid JSON: {core}")
        }
        _ => core.to_string(),
    };
    if with_column && e.column() > 0 {
        message.push_str(&format!(" (column {})", e.column()));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ParseOptions;

    #[derive(serde::Deserialize)]
    struct Row {
        a: String,
    }

    fn rec(a: String) -> Vec<Record> {
        vec![Record::completion("t", a.clone(), a)]
    }

    #[test]
    fn jsonl_reports_lines_and_kinds() {
        let data = b"{\"a\":\"x\"}\n\n{\"a\": 3}\n{\"a\":\n{\"b\":\"y\"}\r\n".to_vec();
        let req = ParseRequest::new("f", "d.jsonl", data).with_options(ParseOptions::lenient());
        let mut sink = RowSink::new(&req);
        sink.jsonl(|r: Row, _| Ok(rec(r.a)));
        let out = sink.finish().expect("lenient");
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.skipped, 3);
        let msgs: Vec<String> = out.errors.iter().map(|e| e.to_string()).collect();
        assert!(
            msgs[0].starts_with("d.jsonl:3: row 2: invalid type: integer `3`"),
            "{msgs:?}"
        );
        assert!(
            msgs[1].starts_with("d.jsonl:4: row 3: invalid JSON: EOF"),
            "{msgs:?}"
        );
        assert!(
            msgs[2].starts_with("d.jsonl:5: row 4: missing field `a`"),
            "{msgs:?}"
        );
    }

    #[test]
    fn json_array_items_get_their_lines() {
        let data = b"[\n {\"a\": \"x\"},\n {\"b\": 1},\n {\"a\":\n   5}\n]".to_vec();
        let req = ParseRequest::new("f", "d.json", data.clone());
        let mut sink = RowSink::new(&req);
        sink.json_array(|r: Row, _| Ok(rec(r.a))).expect("array");
        let err = sink.finish().expect_err("strict fails");
        match err {
            PluginError::InvalidRows { errors, total, .. } => {
                assert_eq!(total, 2);
                assert_eq!(errors[0].line, Some(3));
                assert_eq!(errors[0].row, Some(2));
                assert!(errors[0].message.contains("missing field `a`"));
                // the wrong type sits on line 5 inside the item that starts on line 4
                assert_eq!(errors[1].line, Some(5));
                assert_eq!(errors[1].row, Some(3));
            }
            other => panic!("{other:?}"),
        }
        let req = ParseRequest::new("f", "d.json", b"{\"a\":1}".to_vec());
        let mut sink = RowSink::new(&req);
        let err = sink
            .json_array(|r: Row, _| Ok(rec(r.a)))
            .expect_err("not an array");
        assert!(
            err.to_string().contains("d.json:1: not a JSON array"),
            "{err}"
        );
    }
}
