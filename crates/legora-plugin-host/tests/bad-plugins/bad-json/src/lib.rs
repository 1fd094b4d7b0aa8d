//! Answers the manifest correctly, then returns invalid JSON to every other call.
//!
//! Hand-written, cdylib only: it exports the fallback entry symbol
//! `legora_plugin_entry` (no library name), which the host also accepts.

use legora_plugin_api::abi::{ByteSlice, OwnedBuffer, PluginVTable, ABI_VERSION};

unsafe extern "C" fn call(request: ByteSlice, _payload: ByteSlice) -> OwnedBuffer {
    // SAFETY: the host passes a valid slice for the duration of the call.
    let request = unsafe { request.as_slice() };
    let is_manifest = request.windows(10).any(|w| w == b"\"manifest\"");
    let body: &[u8] = if is_manifest {
        br#"{"schema_version":1,"reply":{"type":"manifest","value":{"name":"bad-json","version":"0.0.0","evaluators":[{"name":"broken","metrics":["x"]}]}}}"#
    } else {
        br#"{"schema_version":1,"reply":{"type":"evaluate","value":{"metrics":"#
    };
    OwnedBuffer::from_vec(body.to_vec())
}

/// # Safety
/// `buffer` must come from this library's `call`.
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
