//! Hand-written against the C ABI: a plugin whose replies are garbage in the
//! ways a buggy plugin's can be. Its manifest is valid (unless
//! `LEGORA_TEST_FAULT_AT` is `manifest` or `load`: then the manifest reply is
//! binary garbage too); then, by evaluator / preset name:
//!
//! - evaluator `binary`: bytes that are not JSON;
//! - evaluator `overlong`: a buffer that claims 2^40 bytes in a 16-byte
//!   allocation (a host that trusted the length would read far past it);
//! - evaluator `big`: a valid reply padded with 8 KiB of spaces (over a small
//!   frame limit);
//! - preset `chatty`: prints to stdout (in a worker that is the protocol pipe
//!   unless the worker moved it) and then answers correctly.
//!
//! Cdylib only: it exports the fallback entry symbol `legora_plugin_entry`.

use std::io::Write;

use legora_plugin_api::abi::{ByteSlice, OwnedBuffer, PluginVTable, ABI_VERSION};

const MANIFEST: &[u8] = br#"{"schema_version":1,"reply":{"type":"manifest","value":{"name":"garbage","version":"0.0.0","evaluators":[{"name":"binary","metrics":["x"]},{"name":"overlong","metrics":["x"]},{"name":"big","metrics":["x"]}],"presets":[{"name":"chatty"}]}}}"#;
const EVALUATE: &[u8] =
    br#"{"schema_version":1,"reply":{"type":"evaluate","value":{"metrics":{"x":1.0},"count":1}}}"#;
const PRESET: &[u8] = br#"{"schema_version":1,"reply":{"type":"preset","value":{"name":"chatty","lora":{"r":2,"lora_alpha":4,"target_modules":["q_proj"]}}}}"#;
const BINARY: &[u8] = b"\xff\xfe\x00 not json \x01\x02";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

unsafe extern "C" fn call(request: ByteSlice, _payload: ByteSlice) -> OwnedBuffer {
    // SAFETY: the host passes a valid slice for the duration of the call.
    let request = unsafe { request.as_slice() };
    let body: Vec<u8> = if contains(request, br#""method":"manifest""#) {
        let broken =
            std::env::var("LEGORA_TEST_FAULT_AT").is_ok_and(|v| v == "manifest" || v == "load");
        if broken {
            BINARY.to_vec()
        } else {
            MANIFEST.to_vec()
        }
    } else if contains(request, br#""evaluator":"overlong""#) {
        let small = std::mem::ManuallyDrop::new(vec![b'{'; 16]);
        return OwnedBuffer {
            ptr: small.as_ptr().cast_mut(),
            len: 1 << 40,
            cap: 16,
        };
    } else if contains(request, br#""evaluator":"big""#) {
        let mut v = EVALUATE.to_vec();
        v.resize(v.len() + 8192, b' ');
        v
    } else if contains(request, br#""method":"preset""#) {
        println!("chatty: a line on stdout");
        let mut out = std::io::stdout();
        let _ = out.write_all(&[0xff; 16]);
        let _ = out.flush();
        PRESET.to_vec()
    } else {
        BINARY.to_vec()
    };
    OwnedBuffer::from_vec(body)
}

/// # Safety
/// `buffer` must come from this library's `call` with `len <= cap`.
unsafe extern "C" fn free_buffer(buffer: OwnedBuffer) {
    // SAFETY: made by OwnedBuffer::from_vec in this library.
    drop(unsafe { buffer.into_vec() });
}

static TABLE: PluginVTable = PluginVTable {
    abi_version: ABI_VERSION,
    call,
    free_buffer,
};

/// The entry point, under the fallback name.
#[unsafe(no_mangle)]
pub extern "C" fn legora_plugin_entry() -> *const PluginVTable {
    &TABLE
}
