//! The wire format between the host and a plugin worker process: length-prefixed
//! frames on the worker's stdin and stdout, and the worker's first message.
//!
//! ```text
//! frame    = len: u64 little-endian, then `len` bytes         (len <= the frame limit)
//! hello    = one frame, JSON `Hello`            worker -> host, once, right after start
//! request  = two frames: Request JSON, payload  host -> worker (the bytes of the C ABI call)
//! reply    = one frame: a status byte, then     worker -> host
//!            REPLY_OK:     the plugin's Response JSON, byte for byte
//!            REPLY_FAILED: UTF-8 text, why the worker could not get a valid buffer
//! ```
//!
//! The JSON inside is exactly what crosses the C ABI in process
//! ([`legora_plugin_api::protocol`]), so both paths decode the same bytes.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Version of this framing and of [`Hello`]; the host refuses a worker that
/// speaks another.
pub(crate) const WORKER_PROTOCOL: u32 = 1;

/// Default cap on one frame, either direction (256 MiB).
pub const DEFAULT_MAX_FRAME_LEN: u64 = 256 << 20;

/// First byte of a reply frame: the plugin's response follows.
pub(crate) const REPLY_OK: u8 = 0;
/// First byte of a reply frame: the worker explains why there is no response.
pub(crate) const REPLY_FAILED: u8 = 1;

/// Largest hello frame the host reads (it is a few hundred bytes).
pub(crate) const MAX_HELLO_LEN: u64 = 64 << 10;

/// Bytes allocated up front for a frame body; the rest grows as bytes arrive,
/// so a length prefix alone never decides an allocation.
const READ_CHUNK: u64 = 1 << 20;

/// The worker's first message: its versions and how loading the library went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Hello {
    /// [`WORKER_PROTOCOL`] of the worker.
    pub worker_protocol: u32,
    /// The worker's [`legora_plugin_api::ABI_VERSION`].
    pub abi_version: u32,
    /// Result of opening the library and checking its entry table.
    pub load: LoadStatus,
}

/// How opening a plugin library went (in the worker or in process).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum LoadStatus {
    /// The library is open and its table has this ABI version.
    Ready,
    /// The dynamic loader refused the file (or it is truncated).
    NotLoadable {
        /// The loader's message.
        message: String,
    },
    /// None of the entry symbols is exported.
    MissingSymbol {
        /// The symbols looked up.
        symbols: Vec<String>,
    },
    /// The table reports another ABI version.
    AbiMismatch {
        /// The version found.
        found: u32,
    },
    /// The entry function returned a null table.
    NullTable,
}

/// Why a frame could not be read.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The stream ended cleanly, before the first byte of a frame.
    Closed,
    /// The stream ended inside a frame.
    Truncated {
        /// Bytes the frame (or its length prefix) needed.
        expected: u64,
        /// Bytes that arrived.
        got: u64,
    },
    /// The length prefix is over the limit.
    TooLarge {
        /// The announced length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// Reading failed.
    Io(io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Closed => f.write_str("the stream was closed"),
            FrameError::Truncated { expected, got } => {
                write!(
                    f,
                    "the stream ended {got} bytes into a {expected}-byte frame"
                )
            }
            FrameError::TooLarge { len, limit } => {
                write!(f, "a frame of {len} bytes is over the limit of {limit}")
            }
            FrameError::Io(e) => write!(f, "read failed: {e}"),
        }
    }
}

/// Reads up to `buf.len()` bytes; returns how many arrived before the end.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(got)
}

/// Reads one frame, refusing a length over `limit` before allocating for it.
pub(crate) fn read_frame(r: &mut impl Read, limit: u64) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 8];
    match read_full(r, &mut header)? {
        0 => return Err(FrameError::Closed),
        8 => {}
        got => {
            return Err(FrameError::Truncated {
                expected: 8,
                got: got as u64,
            })
        }
    }
    let len = u64::from_le_bytes(header);
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    let mut body = Vec::with_capacity(len.min(READ_CHUNK) as usize);
    r.take(len).read_to_end(&mut body).map_err(FrameError::Io)?;
    if body.len() as u64 != len {
        return Err(FrameError::Truncated {
            expected: len,
            got: body.len() as u64,
        });
    }
    Ok(body)
}

/// Writes one frame made of `parts` back to back (no copy into one buffer).
pub(crate) fn write_frame(w: &mut impl Write, parts: &[&[u8]]) -> io::Result<()> {
    let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
    w.write_all(&len.to_le_bytes())?;
    for part in parts {
        w.write_all(part)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &[b"ab", b"", b"c"]).expect("write");
        write_frame(&mut buf, &[]).expect("write");
        assert_eq!(&buf[..8], &3u64.to_le_bytes());
        let mut r = buf.as_slice();
        assert_eq!(read_frame(&mut r, 3).expect("frame"), b"abc");
        assert_eq!(read_frame(&mut r, 3).expect("empty frame"), b"");
        assert!(matches!(read_frame(&mut r, 3), Err(FrameError::Closed)));

        // over the limit: refused from the prefix alone
        let mut r = buf.as_slice();
        assert!(matches!(
            read_frame(&mut r, 2),
            Err(FrameError::TooLarge { len: 3, limit: 2 })
        ));
        // a huge prefix with no body: refused, nothing allocated for it
        let huge = u64::MAX.to_le_bytes();
        assert!(matches!(
            read_frame(&mut huge.as_slice(), DEFAULT_MAX_FRAME_LEN),
            Err(FrameError::TooLarge { .. })
        ));
        // a prefix within the limit but a short body, and a short prefix
        let mut short = 100u64.to_le_bytes().to_vec();
        short.extend_from_slice(b"xyz");
        match read_frame(&mut short.as_slice(), 1000) {
            Err(FrameError::Truncated { expected, got }) => assert_eq!((expected, got), (100, 3)),
            other => panic!("expected Truncated, got {other:?}"),
        }
        match read_frame(&mut &b"\x01\x02"[..], 1000) {
            Err(e @ FrameError::Truncated { .. }) => {
                assert_eq!(
                    e.to_string(),
                    "the stream ended 2 bytes into a 8-byte frame"
                )
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
    }

    #[test]
    fn hello_json_is_stable() {
        let hello = Hello {
            worker_protocol: WORKER_PROTOCOL,
            abi_version: 1,
            load: LoadStatus::AbiMismatch { found: 7 },
        };
        let json = serde_json::to_string(&hello).expect("ser");
        assert_eq!(
            json,
            r#"{"worker_protocol":1,"abi_version":1,"load":{"status":"abi_mismatch","found":7}}"#
        );
        assert_eq!(serde_json::from_str::<Hello>(&json).expect("de"), hello);
    }
}
