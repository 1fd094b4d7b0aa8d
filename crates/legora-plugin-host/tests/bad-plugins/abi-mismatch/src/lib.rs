//! Reports an ABI version the host does not speak. Its `call` would answer a
//! valid manifest, so a host that skipped the version check would be caught.

use legora_plugin_api::abi::{ByteSlice, OwnedBuffer, PluginVTable, ABI_VERSION};

unsafe extern "C" fn call(_request: ByteSlice, _payload: ByteSlice) -> OwnedBuffer {
    OwnedBuffer::from_vec(
        br#"{"schema_version":1,"reply":{"type":"manifest","value":{"name":"abi-mismatch","version":"0.0.0"}}}"#
            .to_vec(),
    )
}

/// # Safety
/// `buffer` must come from this library's `call`.
unsafe extern "C" fn free_buffer(buffer: OwnedBuffer) {
    // SAFETY: made by OwnedBuffer::from_vec in this library.
    drop(unsafe { buffer.into_vec() });
}

static TABLE: PluginVTable = PluginVTable {
    abi_version: ABI_VERSION + 1000,
    call,
    free_buffer,
};

/// The entry point, with the wrong version in its table.
#[unsafe(export_name = "legora_plugin_entry_legora_test_plugin_abi_mismatch")]
pub extern "C" fn entry() -> *const PluginVTable {
    &TABLE
}
