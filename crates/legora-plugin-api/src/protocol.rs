//! The JSON envelopes exchanged through [`crate::abi::PluginVTable::call`].
//!
//! A request is `{"schema_version":1,"call":{"method":"...","params":{...}}}`;
//! a response is `{"schema_version":1,"reply":{"type":"...","value":{...}}}`.
//! Parse calls send only a [`ParseHeader`] as JSON; the file's bytes and the
//! attachments' bytes follow, concatenated, in the separate payload buffer.

use serde::{Deserialize, Serialize};

use crate::error::PluginError;
use crate::types::{
    Attachment, EvalOutput, EvalRequest, ExpertFiles, Manifest, ParseOptions, ParseOutput,
    ParseRequest, Preset, SCHEMA_VERSION,
};

/// A request envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// [`SCHEMA_VERSION`] of the sender.
    pub schema_version: u32,
    /// The call.
    pub call: Call,
}

impl Request {
    /// Wraps a call with the current schema version.
    pub fn new(call: Call) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            call,
        }
    }
}

/// The calls a plugin answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", content = "params", rename_all = "snake_case")]
pub enum Call {
    /// Return the [`Manifest`].
    Manifest,
    /// Parse a file (bytes in the payload).
    Parse(ParseHeader),
    /// Compute metrics.
    Evaluate(EvalRequest),
    /// Return a preset by local name.
    Preset {
        /// Local preset name.
        name: String,
    },
    /// Return a shipped expert's files by local name.
    Expert {
        /// Local expert name.
        name: String,
    },
}

impl Call {
    /// The method name as it appears in JSON.
    pub fn method(&self) -> &'static str {
        match self {
            Call::Manifest => "manifest",
            Call::Parse(_) => "parse",
            Call::Evaluate(_) => "evaluate",
            Call::Preset { .. } => "preset",
            Call::Expert { .. } => "expert",
        }
    }
}

/// A response envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// [`SCHEMA_VERSION`] of the plugin.
    pub schema_version: u32,
    /// The answer.
    pub reply: Reply,
}

/// The answer to a [`Call`]: the matching variant, or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
// One reply per call, moved once: boxing the large variants buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Reply {
    /// Answer to [`Call::Manifest`].
    Manifest(Manifest),
    /// Answer to [`Call::Parse`].
    Parse(ParseOutput),
    /// Answer to [`Call::Evaluate`].
    Evaluate(EvalOutput),
    /// Answer to [`Call::Preset`].
    Preset(Preset),
    /// Answer to [`Call::Expert`].
    Expert(ExpertFiles),
    /// Any call failed.
    Error(PluginError),
}

impl Reply {
    /// The reply type name as it appears in JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            Reply::Manifest(_) => "manifest",
            Reply::Parse(_) => "parse",
            Reply::Evaluate(_) => "evaluate",
            Reply::Preset(_) => "preset",
            Reply::Expert(_) => "expert",
            Reply::Error(_) => "error",
        }
    }
}

/// Length of one attachment in the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentHeader {
    /// Attachment name.
    pub name: String,
    /// Its byte length in the payload.
    pub len: usize,
}

/// The JSON part of a parse call: a [`ParseRequest`] without its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParseHeader {
    /// Local format name.
    pub format: String,
    /// Name of the data file.
    pub file_name: String,
    /// Options.
    #[serde(default)]
    pub options: ParseOptions,
    /// Byte length of the data file at the start of the payload.
    pub data_len: usize,
    /// Attachments following the data, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<AttachmentHeader>,
}

impl ParseHeader {
    /// Splits a request into its JSON header and its payload bytes.
    pub fn split(request: &ParseRequest) -> (ParseHeader, Vec<u8>) {
        let total = request.data.len()
            + request
                .attachments
                .iter()
                .map(|a| a.data.len())
                .sum::<usize>();
        let mut payload = Vec::with_capacity(total);
        payload.extend_from_slice(&request.data);
        let mut attachments = Vec::with_capacity(request.attachments.len());
        for a in &request.attachments {
            payload.extend_from_slice(&a.data);
            attachments.push(AttachmentHeader {
                name: a.name.clone(),
                len: a.data.len(),
            });
        }
        let header = ParseHeader {
            format: request.format.clone(),
            file_name: request.file_name.clone(),
            options: request.options.clone(),
            data_len: request.data.len(),
            attachments,
        };
        (header, payload)
    }

    /// Rebuilds the request from the header and the payload; the lengths must
    /// add up to the payload's length exactly.
    pub fn join(self, payload: &[u8]) -> Result<ParseRequest, PluginError> {
        let declared = self
            .attachments
            .iter()
            .try_fold(self.data_len, |acc, a| acc.checked_add(a.len));
        if declared != Some(payload.len()) {
            return Err(PluginError::invalid_request(format!(
                "parse payload is {} bytes, header declares {}",
                payload.len(),
                declared.map_or_else(|| "an overflowing length".to_string(), |d| d.to_string())
            )));
        }
        let (data, mut rest) = payload.split_at(self.data_len);
        let mut attachments = Vec::with_capacity(self.attachments.len());
        for a in self.attachments {
            let (bytes, tail) = rest.split_at(a.len);
            rest = tail;
            attachments.push(Attachment {
                name: a.name,
                data: bytes.to_vec(),
            });
        }
        Ok(ParseRequest {
            format: self.format,
            file_name: self.file_name,
            options: self.options,
            data: data.to_vec(),
            attachments,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_request_splits_and_joins() {
        let mut req = ParseRequest::new("fmt", "a.jsonl", b"hello".to_vec());
        req.attachments.push(Attachment {
            name: "x".into(),
            data: b"12".to_vec(),
        });
        req.attachments.push(Attachment {
            name: "y".into(),
            data: Vec::new(),
        });
        let (header, payload) = ParseHeader::split(&req);
        assert_eq!(payload, b"hello12");
        let json = serde_json::to_string(&Request::new(Call::Parse(header.clone()))).expect("ser");
        assert!(json.contains(r#""method":"parse""#), "{json}");
        assert_eq!(header.clone().join(&payload).expect("joins"), req);
        assert!(header.join(b"short").is_err());
    }

    #[test]
    fn envelopes_have_stable_json() {
        let json = serde_json::to_string(&Request::new(Call::Manifest)).expect("ser");
        assert_eq!(json, r#"{"schema_version":1,"call":{"method":"manifest"}}"#);
        let resp = Response {
            schema_version: 1,
            reply: Reply::Error(PluginError::other("x")),
        };
        let json = serde_json::to_string(&resp).expect("ser");
        assert_eq!(
            json,
            r#"{"schema_version":1,"reply":{"type":"error","value":{"kind":"other","message":"x"}}}"#
        );
    }
}
