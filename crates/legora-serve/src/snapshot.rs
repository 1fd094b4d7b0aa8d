//! A private copy of a run-time adapter folder, read through checked file handles.
//!
//! [`crate::http::adapter_path`] resolves the folder a request names and checks that it
//! lies under an `--adapter-dir`. Between that check and the loader opening the files, a
//! symlink in the path could be swapped to point elsewhere. So the engine loads from a
//! snapshot instead: each file of the adapter is opened once, the path of what was
//! actually opened is checked again (on Linux through `/proc/self/fd`, which names the
//! opened file, whatever the path's symlinks say now), its size is bounded, and its bytes
//! are copied from that same handle into a fresh private folder that only this process
//! writes. The loader then reads the snapshot, which nothing outside can redirect.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Result, ServeError};

/// The files of a PEFT adapter folder that the loader reads.
const FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// A snapshot folder, removed on drop.
#[derive(Debug)]
pub struct Snapshot {
    dir: PathBuf,
}

impl Snapshot {
    /// Copy the adapter files of `src` (already resolved under one of `dirs`) into a new
    /// private folder; every file must still be under `dirs` when opened and hold at most
    /// `max_bytes`. A missing file is left missing (the loader names it).
    pub fn take(dirs: &[PathBuf], src: &Path, max_bytes: u64) -> Result<Self> {
        let snap = Self::create()?;
        for name in FILES {
            let path = src.join(name);
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&path, "opening", e)),
            };
            check_opened(dirs, &path, &file)?;
            let len = file.metadata().map_err(|e| io(&path, "reading", e))?.len();
            if len > max_bytes {
                return Err(ServeError::Busy(format!(
                    "{}: {len} bytes, over the adapter memory cap of {max_bytes} bytes",
                    path.display()
                )));
            }
            let mut bytes = Vec::with_capacity(len as usize);
            // One byte past the size seen: a file that grew since is refused too.
            (&mut file)
                .take(max_bytes + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| io(&path, "reading", e))?;
            if bytes.len() as u64 > max_bytes {
                return Err(ServeError::Busy(format!(
                    "{}: over the adapter memory cap of {max_bytes} bytes",
                    path.display()
                )));
            }
            let dst = snap.dir.join(name);
            std::fs::write(&dst, &bytes).map_err(|e| io(&dst, "writing", e))?;
        }
        Ok(snap)
    }

    /// The snapshot folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A loading error of the snapshot, naming the folder `src` it was taken from.
    pub fn named_as(&self, e: ServeError, src: &Path) -> ServeError {
        match e {
            ServeError::Hub(h) => ServeError::Invalid(
                h.to_string()
                    .replace(&self.dir.display().to_string(), &src.display().to_string()),
            ),
            other => other,
        }
    }

    /// A new folder under the temp dir that only this user can enter.
    fn create() -> Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "legora-serve-adapter-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut b = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        // `create` fails on an existing path: nobody else's folder or link is reused.
        b.create(&dir).map_err(|e| io(&dir, "creating", e))?;
        Ok(Self { dir })
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The file `file` (opened from `path`) must lie under one of `dirs`.
#[cfg(target_os = "linux")]
fn check_opened(dirs: &[PathBuf], path: &Path, file: &File) -> Result<()> {
    use std::os::fd::AsRawFd;
    let fd = format!("/proc/self/fd/{}", file.as_raw_fd());
    let opened = std::fs::read_link(&fd).map_err(|e| io(path, "checking", e))?;
    if dirs.iter().any(|d| opened.starts_with(d)) {
        Ok(())
    } else {
        Err(ServeError::Forbidden {
            path: path.to_path_buf(),
            reason: format!(
                "the file opened is {}, outside every --adapter-dir (a link changed after \
                 the check)",
                opened.display()
            ),
        })
    }
}

/// Elsewhere: the opened file's path cannot be asked for; the path is resolved again.
#[cfg(not(target_os = "linux"))]
fn check_opened(dirs: &[PathBuf], path: &Path, _file: &File) -> Result<()> {
    let canon = path.canonicalize().map_err(|e| io(path, "checking", e))?;
    if dirs.iter().any(|d| canon.starts_with(d)) {
        Ok(())
    } else {
        Err(ServeError::Forbidden {
            path: path.to_path_buf(),
            reason: "the file (symlinks resolved) is outside every --adapter-dir".into(),
        })
    }
}

fn io(path: &Path, what: &str, source: std::io::Error) -> ServeError {
    ServeError::Io {
        what: format!("{what} {}", path.display()),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("legora-snap-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.canonicalize().unwrap()
    }

    #[test]
    fn copies_the_files_and_removes_the_copy() {
        let root = scratch("copy");
        let src = root.join("a");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join(FILES[0]), b"{}").unwrap();
        let snap = Snapshot::take(std::slice::from_ref(&root), &src, 1 << 20).unwrap();
        assert_eq!(std::fs::read(snap.dir().join(FILES[0])).unwrap(), b"{}");
        assert!(
            !snap.dir().join(FILES[1]).exists(),
            "a missing file stays missing"
        );
        let dir = snap.dir().to_path_buf();
        drop(snap);
        assert!(!dir.exists());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn refuses_a_file_over_the_cap() {
        let root = scratch("cap");
        std::fs::write(root.join(FILES[1]), vec![0u8; 100]).unwrap();
        let e = Snapshot::take(std::slice::from_ref(&root), &root, 99).unwrap_err();
        assert!(e.to_string().contains("100 bytes"), "{e}");
        std::fs::remove_dir_all(root).unwrap();
    }

    /// The race itself: the folder passed the check, then a file in it became a link to
    /// a file outside. What is opened is checked, so the outside file is refused.
    #[cfg(unix)]
    #[test]
    fn refuses_a_file_that_became_a_link_outside() {
        let root = scratch("race");
        let allowed = root.join("allowed");
        let src = allowed.join("a");
        std::fs::create_dir_all(&src).unwrap();
        let secret = root.join("secret.json");
        std::fs::write(&secret, b"{\"secret\": 1}").unwrap();
        std::os::unix::fs::symlink(&secret, src.join(FILES[0])).unwrap();
        let e = Snapshot::take(&[allowed], &src, 1 << 20).unwrap_err();
        assert!(matches!(e, ServeError::Forbidden { .. }), "{e}");
        assert!(e.to_string().contains("secret.json"), "{e}");
        std::fs::remove_dir_all(root).unwrap();
    }
}
