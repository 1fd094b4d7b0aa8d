//! The [`Plugin`] trait and the request dispatcher shared by the dynamic
//! (exported C entry) and static (rlib) paths.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

use crate::error::PluginError;
use crate::protocol::{Call, Reply, Request, Response};
use crate::types::{
    EvalOutput, EvalRequest, ExpertFiles, Manifest, ParseMode, ParseOutput, ParseRequest, Preset,
    SCHEMA_VERSION,
};

/// What a plugin implements. Write plain Rust; [`crate::export_plugin!`] turns
/// it into the C entry point, and a host can also register it directly when
/// the crate is linked as an rlib.
///
/// Names in requests are local (`medqa`, not `medical/medqa`). The dispatcher
/// has already checked that a requested format / evaluator / preset is in the
/// manifest, that evaluation inputs line up ([`EvalRequest::validate`]), and
/// it enforces strict / lenient mode on what `parse` returns, so an
/// implementation only collects row errors (see [`crate::rows::RowSink`]).
///
/// A panic in any method is caught and reported to the host as
/// [`PluginError::Panicked`].
pub trait Plugin: Send + Sync + 'static {
    /// The plugin's name, version and offerings. Called often: keep it cheap.
    fn manifest(&self) -> Manifest;

    /// Parses a file into records.
    fn parse(&self, request: &ParseRequest) -> Result<ParseOutput, PluginError> {
        Err(PluginError::UnknownFormat {
            name: request.format.clone(),
        })
    }

    /// Computes metrics.
    fn evaluate(&self, request: &EvalRequest) -> Result<EvalOutput, PluginError> {
        Err(PluginError::UnknownEvaluator {
            name: request.evaluator.clone(),
        })
    }

    /// Returns a preset by local name.
    fn preset(&self, name: &str) -> Result<Preset, PluginError> {
        Err(PluginError::UnknownPreset {
            name: name.to_string(),
        })
    }

    /// Returns a shipped expert's files by local name.
    fn expert(&self, name: &str) -> Result<ExpertFiles, PluginError> {
        Err(PluginError::UnknownExpert {
            name: name.to_string(),
        })
    }
}

impl<P: Plugin + ?Sized> Plugin for Box<P> {
    fn manifest(&self) -> Manifest {
        (**self).manifest()
    }
    fn parse(&self, request: &ParseRequest) -> Result<ParseOutput, PluginError> {
        (**self).parse(request)
    }
    fn evaluate(&self, request: &EvalRequest) -> Result<EvalOutput, PluginError> {
        (**self).evaluate(request)
    }
    fn preset(&self, name: &str) -> Result<Preset, PluginError> {
        (**self).preset(name)
    }
    fn expert(&self, name: &str) -> Result<ExpertFiles, PluginError> {
        (**self).expert(name)
    }
}

impl<P: Plugin + ?Sized> Plugin for Arc<P> {
    fn manifest(&self) -> Manifest {
        (**self).manifest()
    }
    fn parse(&self, request: &ParseRequest) -> Result<ParseOutput, PluginError> {
        (**self).parse(request)
    }
    fn evaluate(&self, request: &EvalRequest) -> Result<EvalOutput, PluginError> {
        (**self).evaluate(request)
    }
    fn preset(&self, name: &str) -> Result<Preset, PluginError> {
        (**self).preset(name)
    }
    fn expert(&self, name: &str) -> Result<ExpertFiles, PluginError> {
        (**self).expert(name)
    }
}

/// Extracts the message of a panic payload (`&str` or `String`).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Serializes a reply into a response envelope. Never fails: should
/// serialization itself fail, an `Other` error reply is returned instead.
pub fn encode_response(reply: Reply) -> Vec<u8> {
    let response = Response {
        schema_version: SCHEMA_VERSION,
        reply,
    };
    serde_json::to_vec(&response).unwrap_or_else(|e| {
        let fallback = Response {
            schema_version: SCHEMA_VERSION,
            reply: Reply::Error(PluginError::other(format!(
                "plugin could not serialize its reply: {e}"
            ))),
        };
        serde_json::to_vec(&fallback).unwrap_or_default()
    })
}

/// Answers one request: decodes the JSON [`Request`], checks it, calls the
/// plugin inside `catch_unwind`, enforces the parse mode and encodes the
/// [`Response`]. This is exactly what the exported C entry does, so the
/// static and dynamic paths behave the same.
pub fn handle_request(plugin: &dyn Plugin, request: &[u8], payload: &[u8]) -> Vec<u8> {
    let reply = match panic::catch_unwind(AssertUnwindSafe(|| dispatch(plugin, request, payload))) {
        Ok(Ok(reply)) => reply,
        Ok(Err(error)) => Reply::Error(error),
        Err(p) => Reply::Error(PluginError::Panicked {
            message: panic_message(p.as_ref()),
        }),
    };
    encode_response(reply)
}

fn dispatch(plugin: &dyn Plugin, request: &[u8], payload: &[u8]) -> Result<Reply, PluginError> {
    let request: Request = serde_json::from_slice(request)
        .map_err(|e| PluginError::invalid_request(format!("cannot decode request: {e}")))?;
    if request.schema_version != SCHEMA_VERSION {
        return Err(PluginError::UnsupportedSchema {
            got: request.schema_version,
            supported: SCHEMA_VERSION,
        });
    }
    match request.call {
        // The host validates names (typed `Duplicate` / malformed errors).
        Call::Manifest => Ok(Reply::Manifest(plugin.manifest())),
        Call::Parse(header) => {
            if plugin.manifest().find_format(&header.format).is_none() {
                return Err(PluginError::UnknownFormat {
                    name: header.format,
                });
            }
            let request = header.join(payload)?;
            let output = plugin.parse(&request)?;
            finish_parse(&request, output).map(Reply::Parse)
        }
        Call::Evaluate(request) => {
            if plugin
                .manifest()
                .find_evaluator(&request.evaluator)
                .is_none()
            {
                return Err(PluginError::UnknownEvaluator {
                    name: request.evaluator,
                });
            }
            request.validate().map_err(PluginError::invalid_request)?;
            let mut output = plugin.evaluate(&request)?;
            let bad: Vec<String> = output
                .metrics
                .iter()
                .filter(|(_, v)| !v.is_finite())
                .map(|(k, _)| k.clone())
                .collect();
            for name in bad {
                output.metrics.remove(&name);
                output.warnings.push(format!(
                    "metric `{name}` is undefined for this input and was left out"
                ));
            }
            Ok(Reply::Evaluate(output))
        }
        Call::Preset { name } => {
            if plugin.manifest().find_preset(&name).is_none() {
                return Err(PluginError::UnknownPreset { name });
            }
            let preset = plugin.preset(&name)?;
            preset
                .validate()
                .map_err(|e| PluginError::other(format!("preset `{name}` is invalid: {e}")))?;
            Ok(Reply::Preset(preset))
        }
        Call::Expert { name } => {
            if plugin.manifest().find_expert(&name).is_none() {
                return Err(PluginError::UnknownExpert { name });
            }
            plugin.expert(&name).map(Reply::Expert)
        }
    }
}

/// Applies strict / lenient mode and checks every record's shape.
fn finish_parse(
    request: &ParseRequest,
    mut output: ParseOutput,
) -> Result<ParseOutput, PluginError> {
    let total = output.skipped.max(output.errors.len());
    output.errors.truncate(request.options.max_errors);
    if request.options.mode == ParseMode::Strict && total > 0 {
        return Err(PluginError::InvalidRows {
            file: request.file_name.clone(),
            errors: output.errors,
            total,
        });
    }
    output.skipped = total;
    for (i, record) in output.records.iter().enumerate() {
        record.validate().map_err(|e| {
            PluginError::other(format!(
                "format `{}` produced an invalid record #{} from {}: {e}",
                request.format,
                i + 1,
                request.file_name
            ))
        })?;
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ParseHeader;
    use crate::types::{EvaluatorInfo, FormatInfo, Record, RowError};

    struct Toy;

    impl Plugin for Toy {
        fn manifest(&self) -> Manifest {
            Manifest::new("toy", "0.0.0")
                .format(FormatInfo::new("lines", ""))
                .evaluator(EvaluatorInfo::new("boom", "", &["x"]))
        }
        fn parse(&self, request: &ParseRequest) -> Result<ParseOutput, PluginError> {
            let mut out = ParseOutput::default();
            for (i, line) in request.data.split(|b| *b == b'\n').enumerate() {
                if line == b"bad" {
                    out.skipped += 1;
                    out.errors.push(RowError {
                        file: request.file_name.clone(),
                        line: Some(i as u64 + 1),
                        row: None,
                        message: "bad line".into(),
                    });
                } else {
                    let text = String::from_utf8_lossy(line);
                    out.records
                        .push(Record::completion("toy/lines", text.clone(), text));
                }
            }
            Ok(out)
        }
        fn evaluate(&self, _: &EvalRequest) -> Result<EvalOutput, PluginError> {
            panic!("kaboom {}", 42)
        }
    }

    fn call(request: &Request, payload: &[u8]) -> Reply {
        let bytes = serde_json::to_vec(request).expect("ser");
        let out = handle_request(&Toy, &bytes, payload);
        serde_json::from_slice::<Response>(&out)
            .expect("valid response")
            .reply
    }

    #[test]
    fn strict_and_lenient_modes() {
        let mut req = ParseRequest::new("lines", "f.txt", b"a\nbad\nc".to_vec());
        let (header, payload) = ParseHeader::split(&req);
        match call(&Request::new(Call::Parse(header)), &payload) {
            Reply::Error(PluginError::InvalidRows { total, errors, .. }) => {
                assert_eq!(total, 1);
                assert_eq!(errors[0].line, Some(2));
            }
            other => panic!("unexpected {other:?}"),
        }
        req.options = crate::types::ParseOptions::lenient();
        let (header, payload) = ParseHeader::split(&req);
        match call(&Request::new(Call::Parse(header)), &payload) {
            Reply::Parse(out) => {
                assert_eq!(out.records.len(), 2);
                assert_eq!(out.skipped, 1);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn panics_become_errors_with_message() {
        let req = Request::new(Call::Evaluate(EvalRequest {
            evaluator: "boom".into(),
            ..EvalRequest::default()
        }));
        match call(&req, &[]) {
            Reply::Error(PluginError::Panicked { message }) => assert_eq!(message, "kaboom 42"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unknown_names_and_bad_requests() {
        let req = Request::new(Call::Preset {
            name: "nope".into(),
        });
        assert!(matches!(
            call(&req, &[]),
            Reply::Error(PluginError::UnknownPreset { .. })
        ));
        let out = handle_request(&Toy, b"{not json", &[]);
        let reply = serde_json::from_slice::<Response>(&out)
            .expect("valid")
            .reply;
        assert!(matches!(
            reply,
            Reply::Error(PluginError::InvalidRequest { .. })
        ));
        let req = Request {
            schema_version: 99,
            call: Call::Manifest,
        };
        assert!(matches!(
            call(&req, &[]),
            Reply::Error(PluginError::UnsupportedSchema { got: 99, .. })
        ));
    }
}
