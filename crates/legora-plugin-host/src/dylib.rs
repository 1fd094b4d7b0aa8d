//! Opening a plugin library and calling through its C table. Runs in the host
//! (in-process isolation) or in a worker process (the default), with the same
//! checks either way.

use std::io::Read;
use std::path::Path;

use legora_plugin_api::abi::{ByteSlice, EntryFn, PluginVTable};
use legora_plugin_api::ABI_VERSION;

use crate::entry_symbols;
use crate::error::HostError;
use crate::frame::LoadStatus;

/// Opens a library (leaked: never unloaded), finds its entry and checks the
/// ABI version before trusting the rest of its table. The error is a
/// [`LoadStatus`] (never `Ready`) so that a worker can send it to the host.
pub(crate) fn open_library(path: &Path) -> Result<&'static PluginVTable, LoadStatus> {
    check_elf_segments(path).map_err(|message| LoadStatus::NotLoadable { message })?;
    // SAFETY: loading a library runs its initializers; loading a plugin means
    // trusting its code, which is the point of a plugin system (and under
    // process isolation this runs in a worker that may die in its place).
    let library =
        unsafe { libloading::Library::new(path) }.map_err(|e| LoadStatus::NotLoadable {
            message: e.to_string(),
        })?;
    // Never unloaded: nothing it hands out may outlive it otherwise.
    let library: &'static libloading::Library = Box::leak(Box::new(library));
    let symbols = entry_symbols(path);
    let mut entry: Option<EntryFn> = None;
    for symbol in &symbols {
        // SAFETY: the symbol is declared with the EntryFn signature by the ABI
        // contract; the library is never unloaded, so the pointer stays valid.
        if let Ok(found) = unsafe { library.get::<EntryFn>(symbol.as_bytes()) } {
            entry = Some(*found);
            break;
        }
    }
    let entry = entry.ok_or_else(|| LoadStatus::MissingSymbol {
        symbols: symbols.clone(),
    })?;
    // SAFETY: the entry function takes nothing and returns a pointer to a
    // static table; its signature is frozen across ABI versions.
    let table = unsafe { entry() };
    if table.is_null() {
        return Err(LoadStatus::NullTable);
    }
    // SAFETY: every ABI version starts the table with a u32 version; read only
    // that before knowing the layout of the rest.
    let found = unsafe { std::ptr::read(table.cast::<u32>()) };
    if found != ABI_VERSION {
        return Err(LoadStatus::AbiMismatch { found });
    }
    // SAFETY: same version, hence same layout; the table is a static of a
    // library that is never unloaded.
    Ok(unsafe { &*table })
}

/// The host error for a failed [`open_library`] of `path` (`plugin` names it in
/// errors that are about a call rather than the file).
pub(crate) fn load_error(path: &Path, status: LoadStatus) -> HostError {
    match status {
        LoadStatus::NotLoadable { message } => HostError::NotLoadable {
            path: path.to_path_buf(),
            message,
        },
        LoadStatus::MissingSymbol { symbols } => HostError::MissingSymbol {
            path: path.to_path_buf(),
            symbols,
        },
        LoadStatus::AbiMismatch { found } => HostError::AbiMismatch {
            path: path.to_path_buf(),
            expected: ABI_VERSION,
            found,
        },
        LoadStatus::NullTable | LoadStatus::Ready => HostError::MalformedResponse {
            plugin: path.display().to_string(),
            method: "entry".into(),
            reason: "the entry function returned a null table".into(),
        },
    }
}

/// Calls the plugin once and copies its reply out. The buffer the plugin
/// reports is checked before a byte of it is read: non-null, its length
/// within its capacity and within `limit`. A buffer whose length exceeds its
/// capacity is not handed back to the plugin (its bookkeeping is broken, so
/// freeing it could corrupt the plugin's heap): it is leaked.
pub(crate) fn call_table(
    table: &PluginVTable,
    request: &[u8],
    payload: &[u8],
    limit: u64,
) -> Result<Vec<u8>, String> {
    // SAFETY: `table` comes from a library that reported our ABI_VERSION, so
    // `call` has the CallFn signature; both slices outlive the call.
    let out = unsafe { (table.call)(ByteSlice::new(request), ByteSlice::new(payload)) };
    if out.ptr.is_null() {
        return Err("the plugin returned a null buffer".into());
    }
    if out.len > out.cap {
        return Err(format!(
            "the plugin reported a {}-byte reply in a buffer of {} bytes",
            out.len, out.cap
        ));
    }
    if out.len as u64 > limit {
        let len = out.len;
        // SAFETY: `out` was returned by this table's `call` and is freed once.
        unsafe { (table.free_buffer)(out) };
        return Err(format!(
            "the plugin's reply is {len} bytes, over the limit of {limit} bytes"
        ));
    }
    // SAFETY: the plugin owns `out` until free_buffer and promises `len`
    // initialized bytes at `ptr` (len <= cap checked above); we copy them
    // before handing it back.
    let bytes = unsafe { out.as_slice() }.to_vec();
    // SAFETY: `out` was returned by this table's `call` and is freed once.
    unsafe { (table.free_buffer)(out) };
    Ok(bytes)
}

/// Refuses an ELF file whose program headers or loadable segments reach past
/// its end (a truncated copy): the loader would map those pages and the first
/// touch of one raises SIGBUS. Files that are not ELF are left to the loader.
fn check_elf_segments(path: &Path) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut ident = [0u8; 64];
    let n = read_up_to(&mut file, &mut ident)?;
    if n < 16 || &ident[..4] != b"\x7fELF" {
        return Ok(());
    }
    let wide = match ident[4] {
        1 => false,
        2 => true,
        c => return Err(format!("unknown ELF class {c}")),
    };
    let little = match ident[5] {
        1 => true,
        2 => false,
        d => return Err(format!("unknown ELF data encoding {d}")),
    };
    let header_len = if wide { 64 } else { 52 };
    if n < header_len {
        return Err(format!(
            "truncated: {file_len} bytes, shorter than an ELF header"
        ));
    }
    let u16_at = |b: &[u8], at: usize| {
        let v = [b[at], b[at + 1]];
        u64::from(if little {
            u16::from_le_bytes(v)
        } else {
            u16::from_be_bytes(v)
        })
    };
    let u32_at = |b: &[u8], at: usize| {
        let v = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        u64::from(if little {
            u32::from_le_bytes(v)
        } else {
            u32::from_be_bytes(v)
        })
    };
    let u64_at = |b: &[u8], at: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[at..at + 8]);
        if little {
            u64::from_le_bytes(v)
        } else {
            u64::from_be_bytes(v)
        }
    };
    let (phoff, phentsize, phnum) = if wide {
        (
            u64_at(&ident, 0x20),
            u16_at(&ident, 0x36),
            u16_at(&ident, 0x38),
        )
    } else {
        (
            u32_at(&ident, 0x1C),
            u16_at(&ident, 0x2A),
            u16_at(&ident, 0x2C),
        )
    };
    let entry_len = if wide { 56 } else { 32 };
    if phnum == 0 {
        return Ok(());
    }
    if phentsize < entry_len {
        return Err(format!("ELF program header entries of {phentsize} bytes"));
    }
    // phentsize and phnum are u16: the table is at most 4 GiB, and it must fit in the file.
    let table_len = phentsize * phnum;
    if phoff
        .checked_add(table_len)
        .is_none_or(|end| end > file_len)
    {
        return Err(format!(
            "truncated: the ELF program headers end at byte {}, the file has {file_len}",
            phoff.saturating_add(table_len)
        ));
    }
    let mut table = vec![0u8; table_len as usize];
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(phoff)).map_err(|e| e.to_string())?;
    if read_up_to(&mut file, &mut table)? != table.len() {
        return Err("truncated while reading the ELF program headers".into());
    }
    for (i, ph) in table.chunks_exact(phentsize as usize).enumerate() {
        const PT_LOAD: u64 = 1;
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let (offset, filesz) = if wide {
            (u64_at(ph, 8), u64_at(ph, 0x20))
        } else {
            (u32_at(ph, 4), u32_at(ph, 0x10))
        };
        if offset.checked_add(filesz).is_none_or(|end| end > file_len) {
            return Err(format!(
                "truncated: loadable segment #{i} ends at byte {}, the file has {file_len}",
                offset.saturating_add(filesz)
            ));
        }
    }
    Ok(())
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, String> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit little-endian ELF header (64 bytes) with `phnum` program
    /// headers at offset 64, then one PT_LOAD entry (56 bytes) mapping file
    /// bytes `0..filesz`: 120 bytes in all.
    fn elf(filesz: u64, phnum: u16) -> Vec<u8> {
        let mut b = vec![0u8; 120];
        b[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[0x38..0x3A].copy_from_slice(&phnum.to_le_bytes()); // e_phnum
        b[64..68].copy_from_slice(&1u32.to_le_bytes()); // p_type = PT_LOAD
        b[64 + 0x20..64 + 0x28].copy_from_slice(&filesz.to_le_bytes()); // p_filesz
        b
    }

    #[test]
    fn truncated_elf_files_are_refused_before_the_loader_sees_them() {
        let dir = std::env::temp_dir().join(format!("legora-elf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let check = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).expect("write");
            check_elf_segments(&path)
        };
        assert_eq!(check("whole", &elf(120, 1)), Ok(()));
        assert_eq!(
            check("cut", &elf(10_000, 1)),
            Err("truncated: loadable segment #0 ends at byte 10000, the file has 120".into())
        );
        // two entries need 64 + 2 * 56 = 176 bytes
        assert_eq!(
            check("few-headers", &elf(120, 2)),
            Err("truncated: the ELF program headers end at byte 176, the file has 120".into())
        );
        let err = check("head", &elf(120, 1)[..40]).expect_err("cut header");
        assert!(err.contains("shorter than an ELF header"), "{err}");
        // not ELF: left to the loader
        assert_eq!(check("text", b"not a library"), Ok(()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
