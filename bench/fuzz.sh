#!/usr/bin/env bash
# Mutation-fuzz every file parser of legora-hub: 100,000 inputs per parser (release build),
# 0 panics and 0 allocations over the cap required. Prints one line per parser.
# Usage: bench/fuzz.sh [inputs-per-parser]
set -euo pipefail
cd "$(dirname "$0")/.."
export LEGORA_FUZZ_ITERS="${1:-100000}"
cargo test --release -j 1 -p legora-hub --test fuzz -- --test-threads 1 --nocapture 2>&1 \
  | grep -oE "fuzz [^:]+: [0-9]+ inputs.*bytes|panicked|test result.*"
