//! The mutation-fuzzing engine shared by the fuzz tests of legora-hub (file parsers),
//! legora-train (run files, checkpoints) and legora-plugin-host (data rows, plugin
//! replies); the other crates include this file by path.
//!
//! [`fuzz`] feeds seeded random mutations of real inputs to a parser: byte flips,
//! inserted / deleted / duplicated ranges, "interesting" values (huge and negative
//! integers, NaN spellings, deep nesting) written into JSON fields and binary length
//! fields. Every input must come back as `Ok` or a typed `Err`: a panic fails the test,
//! and so does any single allocation above [`CAP`] (the counting allocator below
//! refuses it and counts it). `LEGORA_FUZZ_ITERS` sets the inputs per parser (default
//! 1500: seconds in CI); `bench/fuzz.sh` runs 100,000 per parser in release.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Largest single allocation a parser may make on a fuzzed input (256 MiB; the
/// fixtures are a few KiB).
pub const CAP: usize = 256 << 20;

static OVER_CAP: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: forwards to the system allocator; only refuses (null) sizes above CAP, which
// callers must handle as an allocation failure anyway.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            OVER_CAP.fetch_add(1, Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > CAP {
            OVER_CAP.fetch_add(1, Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

pub fn iters() -> usize {
    std::env::var("LEGORA_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

pub use legora_testing::fixtures;

pub const INTERESTING: [&str; 14] = [
    "0",
    "-1",
    "1e309",
    "NaN",
    "18446744073709551615",
    "4294967296",
    "1099511627776",
    "null",
    "\"\"",
    "[]",
    "{}",
    "true",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "\"\\u0000\"",
];

/// One random mutation of `input`.
pub fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    let rounds = rng.random_range(1..=4);
    for _ in 0..rounds {
        let len = b.len().max(1);
        match rng.random_range(0..7) {
            0 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
            1 => {
                let i = rng.random_range(0..=b.len());
                b.insert(i, rng.random());
            }
            2 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                let n = rng.random_range(1..=(b.len() - i).min(64));
                b.drain(i..i + n);
            }
            3 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                let n = rng.random_range(1..=(b.len() - i).min(64));
                let chunk = b[i..i + n].to_vec();
                let at = rng.random_range(0..=b.len());
                b.splice(at..at, chunk);
            }
            4 => {
                // an interesting token over a number or a value
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())].as_bytes();
                let i = rng.random_range(0..len.min(b.len() + 1));
                let n = rng.random_range(0..=8).min(b.len() - i.min(b.len()));
                b.splice(i..i + n, v.iter().copied());
            }
            5 if b.len() >= 8 => {
                // a binary length field: 8 little-endian bytes of a huge value
                let i = rng.random_range(0..=b.len() - 8);
                let v: u64 = match rng.random_range(0..3) {
                    0 => u64::MAX,
                    1 => 1 << rng.random_range(20..63),
                    _ => rng.random(),
                };
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                let n = rng.random_range(0..=len.min(16));
                b.truncate(b.len().saturating_sub(n));
            }
        }
    }
    b
}

/// A JSON-aware mutation: a random field of the document set to an interesting value.
pub fn mutate_json(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(input) else {
        return mutate(rng, input);
    };
    if let Some(obj) = v.as_object_mut() {
        let keys: Vec<String> = obj.keys().cloned().collect();
        if !keys.is_empty() {
            let k = &keys[rng.random_range(0..keys.len())];
            let new = INTERESTING[rng.random_range(0..INTERESTING.len())];
            obj.insert(
                k.clone(),
                serde_json::from_str(new).unwrap_or(serde_json::Value::Null),
            );
        }
    }
    let out = serde_json::to_vec(&v).unwrap();
    if rng.random_bool(0.3) {
        mutate(rng, &out)
    } else {
        out
    }
}

/// A TOML-aware mutation: the value of a random `key = value` line replaced by an
/// interesting one (TOML spells some differently: `nan`, `inf`).
pub fn mutate_toml(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(input);
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let keyed: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains(" = "))
        .collect();
    if keyed.is_empty() {
        return mutate(rng, input);
    }
    const TOML: [&str; 6] = ["nan", "inf", "-inf", "1e9", "\"\"", "{ }"];
    let i = keyed[rng.random_range(0..keyed.len())];
    let key = lines[i].split(" = ").next().unwrap_or("").to_string();
    let value = match rng.random_bool(0.7) {
        true => INTERESTING[rng.random_range(0..INTERESTING.len())],
        false => TOML[rng.random_range(0..TOML.len())],
    };
    lines[i] = format!("{key} = {value}");
    let out = lines.join("\n").into_bytes();
    if rng.random_bool(0.3) {
        mutate(rng, &out)
    } else {
        out
    }
}

/// How [`fuzz`] mutates its seeds: bytes only, or half of the time through the
/// document's structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// Byte-level mutations ([`mutate`]).
    Bytes,
    /// JSON fields set to interesting values ([`mutate_json`]) or bytes.
    Json,
    /// TOML values set to interesting values ([`mutate_toml`]) or bytes.
    Toml,
}

/// Feed `iters()` mutations of `seeds` to `parse`; returns the inputs run.
pub fn fuzz(name: &str, seeds: &[Vec<u8>], mutation: Mutation, parse: impl Fn(&[u8])) -> usize {
    let mut rng = StdRng::seed_from_u64(0x1e60_7a00 ^ name.len() as u64);
    let n = iters();
    let over_before = OVER_CAP.load(Ordering::Relaxed);
    let mut panics = 0;
    for i in 0..n {
        let seed = &seeds[i % seeds.len()];
        let input = match (mutation, rng.random_bool(0.5)) {
            (Mutation::Json, true) => mutate_json(&mut rng, seed),
            (Mutation::Toml, true) => mutate_toml(&mut rng, seed),
            _ => mutate(&mut rng, seed),
        };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(&input))).is_err() {
            panics += 1;
            let dump = std::env::temp_dir().join(format!("legora-fuzz-{name}-{i}.bin"));
            let _ = std::fs::write(&dump, &input);
            eprintln!("{name}: input {i} panicked (saved to {})", dump.display());
        }
    }
    let over = OVER_CAP.load(Ordering::Relaxed) - over_before;
    eprintln!("fuzz {name}: {n} inputs, {panics} panics, {over} allocations over {CAP} bytes");
    assert_eq!(panics, 0, "{name}: {panics} panics");
    assert_eq!(over, 0, "{name}: {over} allocations over the cap");
    n
}

pub fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(fixtures().join(p)).unwrap()
}

/// A scratch file for parsers that take a path.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("legora-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}
