//! Shared by legora-models' test files.

/// Held by every test of this binary: the backend's random generator is one per process,
/// and a test that seeds it gets its draws (random models, adapters) only when no other
/// test draws in between.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
