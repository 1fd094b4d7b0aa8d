//! Containing a dependency's panic as a typed error, without the panic message that
//! Rust's default hook would print to stderr.
//!
//! Some parsers legora calls (the `tokenizers` crate on malformed tokenizer.json)
//! panic on bad input instead of returning an error. [`contain_panic`] runs such a call, turns a panic into the
//! panic's message, and keeps the default hook quiet for that call only: a user sees
//! legora's one `error:` line, not a "thread 'main' panicked at ..." report from
//! inside a dependency. Panics anywhere else still print as before.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// How many [`contain_panic`] calls are running on this thread.
    static CONTAINING: Cell<usize> = const { Cell::new(0) };
}

static HOOK: Once = Once::new();

/// Install (once per process) a hook that is silent while this thread is inside
/// [`contain_panic`] and defers to the hook found at install time otherwise.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CONTAINING.with(Cell::get) == 0 {
                previous(info);
            }
        }));
    });
}

/// Run `f`; a panic inside it comes back as `Err(message)` (the panic's payload when
/// it is a string) instead of unwinding further, and prints nothing.
pub fn contain_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    CONTAINING.with(|c| c.set(c.get() + 1));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CONTAINING.with(|c| c.set(c.get() - 1));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

#[cfg(test)]
mod tests {
    use super::contain_panic;

    #[test]
    fn a_panic_becomes_its_message_and_the_counter_is_restored() {
        assert_eq!(contain_panic(|| 7), Ok(7));
        let e = contain_panic(|| -> u8 { panic!("bad {}", 3) }).unwrap_err();
        assert_eq!(e, "bad 3");
        let e = contain_panic(|| -> u8 { std::panic::panic_any(5u32) }).unwrap_err();
        assert_eq!(e, "a panic without a message");
        // nested: the inner panic is contained, the outer call goes on
        let outer = contain_panic(|| contain_panic(|| -> u8 { panic!("inner") }));
        assert_eq!(outer, Ok(Err("inner".into())));
        super::CONTAINING.with(|c| assert_eq!(c.get(), 0));
    }
}
