//! The C ABI: one exported entry function returning a table whose first field
//! is the ABI version.
//!
//! ```text
//! host                                   plugin (cdylib)
//! dlopen(lib)
//! entry = dlsym("legora_plugin_entry_<lib name>")
//! table = entry()            ───────────▶ &'static PluginVTable
//! read table.abi_version (a u32 at offset 0) and compare with ABI_VERSION
//!   mismatch: stop here, touch nothing else
//! out = table.call(request_json, payload)  ─▶ catch_unwind(dispatch(...))
//! copy out's bytes, then table.free_buffer(out)   (the plugin's allocator frees it)
//! ```
//!
//! Rules:
//! - The entry symbol is [`entry_symbol`]`(library name)`, e.g.
//!   `legora_plugin_entry_legora_plugin_medical` for
//!   `liblegora_plugin_medical.so`. It carries the library name so that many
//!   plugins can also be linked statically (as rlibs) into one binary without
//!   clashing symbols. A plugin built only as a `cdylib` (for example written
//!   in C) may instead export [`ENTRY_SYMBOL_FALLBACK`].
//! - The entry function takes nothing and returns a pointer to a table that
//!   lives as long as the library (a `static`). Its signature and the position
//!   and type of `abi_version` never change; everything after `abi_version`
//!   may change when [`ABI_VERSION`] changes.
//! - Inputs ([`ByteSlice`]) are owned by the host and valid only during the
//!   call. The output ([`OwnedBuffer`]) is owned by the plugin until the host
//!   hands it back through `free_buffer`; the host copies it first.
//! - `call` never unwinds: every call runs inside `catch_unwind`, and a panic
//!   becomes a [`crate::PluginError::Panicked`] reply carrying its message.
//!   (A plugin compiled with `panic = "abort"` aborts the process instead:
//!   by default a worker process of the host's, which reports it as a crash.)
//! - `call` may be invoked from several threads at once.
//! - The host never unloads a plugin library.

use std::mem::ManuallyDrop;
use std::panic::{self, AssertUnwindSafe};

use crate::plugin::{encode_response, handle_request, panic_message, Plugin};
use crate::protocol::Reply;
use crate::PluginError;

/// Version of the binary interface ([`PluginVTable`] layout, calling
/// convention, buffer ownership). The host refuses a library whose table
/// reports another number, before calling anything in it.
pub const ABI_VERSION: u32 = 1;

/// Prefix of the exported entry symbol; the library name follows.
pub const ENTRY_SYMBOL_PREFIX: &str = "legora_plugin_entry_";

/// Entry symbol accepted as a fallback, for plugins that are only ever built
/// as a dynamic library.
pub const ENTRY_SYMBOL_FALLBACK: &str = "legora_plugin_entry";

/// The entry symbol for a library name (a crate's lib name, `-` read as `_`):
/// `entry_symbol("legora_plugin_medical") == "legora_plugin_entry_legora_plugin_medical"`.
pub fn entry_symbol(library_name: &str) -> String {
    format!("{ENTRY_SYMBOL_PREFIX}{}", library_name.replace('-', "_"))
}

/// A borrowed byte range passed from host to plugin.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ByteSlice {
    /// First byte (may be dangling or null when `len == 0`).
    pub ptr: *const u8,
    /// Number of bytes.
    pub len: usize,
}

impl ByteSlice {
    /// Borrows a slice (the slice must outlive every use of the result).
    pub fn new(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// Views the bytes.
    ///
    /// # Safety
    /// Unless `len == 0`, `ptr` must point to `len` initialized bytes that stay
    /// valid and unmodified for `'a`.
    pub unsafe fn as_slice<'a>(&self) -> &'a [u8] {
        if self.len == 0 || self.ptr.is_null() {
            &[]
        } else {
            // SAFETY: guaranteed by the caller (see above).
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// A byte buffer allocated by the plugin and returned to the host, which must
/// give it back through [`PluginVTable::free_buffer`] (never free it itself:
/// host and plugin may use different allocators).
#[repr(C)]
#[derive(Debug)]
pub struct OwnedBuffer {
    /// First byte.
    pub ptr: *mut u8,
    /// Number of initialized bytes.
    pub len: usize,
    /// Allocated capacity (needed to free it).
    pub cap: usize,
}

impl OwnedBuffer {
    /// Hands a vector's allocation over to the buffer.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let mut bytes = ManuallyDrop::new(bytes);
        Self {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len(),
            cap: bytes.capacity(),
        }
    }

    /// Takes the vector back.
    ///
    /// # Safety
    /// The buffer must have been made by [`OwnedBuffer::from_vec`] in the same
    /// library (same allocator) and not been freed or taken back before.
    pub unsafe fn into_vec(self) -> Vec<u8> {
        // SAFETY: ptr/len/cap came from a live Vec<u8> of this allocator.
        unsafe { Vec::from_raw_parts(self.ptr, self.len, self.cap) }
    }

    /// Views the bytes without taking ownership.
    ///
    /// # Safety
    /// `ptr` must point to `len` initialized bytes (or `len == 0`) that stay
    /// valid while the returned slice is used, i.e. until `free_buffer`.
    pub unsafe fn as_slice(&self) -> &[u8] {
        if self.len == 0 || self.ptr.is_null() {
            &[]
        } else {
            // SAFETY: guaranteed by the caller.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// Answers one call: `request` is a JSON [`crate::protocol::Request`],
/// `payload` the raw bytes that go with it (parse calls only; empty
/// otherwise). Returns a JSON [`crate::protocol::Response`]; never unwinds.
pub type CallFn = unsafe extern "C" fn(request: ByteSlice, payload: ByteSlice) -> OwnedBuffer;

/// Frees a buffer returned by [`CallFn`].
pub type FreeFn = unsafe extern "C" fn(buffer: OwnedBuffer);

/// Signature of the exported entry symbol.
pub type EntryFn = unsafe extern "C" fn() -> *const PluginVTable;

/// The table the entry function returns.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PluginVTable {
    /// Must equal the host's [`ABI_VERSION`]; always the first field.
    pub abi_version: u32,
    /// Answers calls.
    pub call: CallFn,
    /// Frees what `call` returned.
    pub free_buffer: FreeFn,
}

/// Body of the `call` function generated by [`crate::export_plugin!`].
///
/// # Safety
/// `request` and `payload` must satisfy [`ByteSlice::as_slice`]'s contract for
/// the duration of the call.
#[doc(hidden)]
pub unsafe fn __exported_call<P: Plugin>(
    instance: fn() -> &'static P,
    request: ByteSlice,
    payload: ByteSlice,
) -> OwnedBuffer {
    // SAFETY: forwarded from this function's contract.
    let (request, payload) = unsafe { (request.as_slice(), payload.as_slice()) };
    let bytes = panic::catch_unwind(AssertUnwindSafe(|| {
        handle_request(instance(), request, payload)
    }))
    .unwrap_or_else(|p| {
        encode_response(Reply::Error(PluginError::Panicked {
            message: panic_message(p.as_ref()),
        }))
    });
    OwnedBuffer::from_vec(bytes)
}

/// The `free_buffer` function used by [`crate::export_plugin!`].
///
/// # Safety
/// `buffer` must have been returned by this library's `call` and not freed yet.
#[doc(hidden)]
pub unsafe extern "C" fn __free_buffer(buffer: OwnedBuffer) {
    // A panic must not unwind out of an extern "C" function; dropping a Vec
    // does not panic, but stay defensive.
    let _ = panic::catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: forwarded from this function's contract.
        drop(unsafe { buffer.into_vec() });
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_round_trip() {
        let b = OwnedBuffer::from_vec(b"abc".to_vec());
        // SAFETY: made just above by from_vec.
        assert_eq!(unsafe { b.as_slice() }, b"abc");
        // SAFETY: made by from_vec in this library, freed once.
        unsafe { __free_buffer(b) };
        let s = ByteSlice::new(&[]);
        // SAFETY: empty slice.
        assert!(unsafe { s.as_slice() }.is_empty());
        assert_eq!(
            entry_symbol("legora-plugin-x"),
            "legora_plugin_entry_legora_plugin_x"
        );
    }
}
