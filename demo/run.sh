#!/usr/bin/env bash
# The demo in one command: build the `legora` binary and the three bundled plugins
# (release, CPU backend), then run experts -> router -> eval on the shipped data.
# Outputs land in out/demo/ (report.md, report.json, plots/, experts/, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p legora-cli \
  -p legora-plugin-medical -p legora-plugin-finance -p legora-plugin-game-npc
exec ./target/release/legora demo "$@"
