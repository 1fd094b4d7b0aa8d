//! `legora-plugin-worker [plugin-worker] <library>`: serves one plugin library
//! to a process-isolating legora plugin host over stdin / stdout. Started by
//! the host, not by hand.

fn main() -> std::process::ExitCode {
    legora_plugin_host::worker::main()
}
