//! A dynamic library that exports a function, but no plugin entry symbol.

/// Not a plugin entry.
#[unsafe(no_mangle)]
pub extern "C" fn legora_not_a_plugin() -> u32 {
    7
}
