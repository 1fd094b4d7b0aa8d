#!/usr/bin/env bash
# Mutation-fuzz every parser of untrusted input: legora-hub's file parsers (safetensors,
# config.json, adapter_config.json, moe_config.json, tokenizer.json, chat templates,
# GGUF), legora-train's run files and checkpoint files, and the plugin host's data rows
# and plugin replies. 100,000 inputs per parser by default (release build); 0 panics
# and 0 allocations over the cap required. Prints one line per parser.
# Usage: bench/fuzz.sh [inputs-per-parser]
# FUZZ_PROFILE=dev runs the debug build instead (no release build needed; slower inputs).
set -euo pipefail
cd "$(dirname "$0")/.."
export LEGORA_FUZZ_ITERS="${1:-100000}"
profile=(--release)
[ "${FUZZ_PROFILE:-release}" = dev ] && profile=()
for crate in legora-hub legora-train legora-plugin-host; do
  cargo test "${profile[@]}" -p "$crate" --test fuzz -- --test-threads 1 --nocapture 2>&1 \
    | grep -oE "fuzz [^:]+: [0-9]+ inputs.*bytes|panicked.*|test result.*"
done
