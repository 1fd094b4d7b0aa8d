#!/usr/bin/env bash
# Make the experts the medical and finance plugins ship for the demo base: train them
# with `legora train` (run.toml, next to this script), then copy the two PEFT folders
# into the plugins, which embed them (include_bytes!) as `medical/demo-specialty` and
# `finance/demo-sentiment`. Rebuild the plugins afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=${PROFILE:-release}
cargo build --profile "$profile" -p legora-cli \
  -p legora-plugin-medical -p legora-plugin-finance -p legora-plugin-game-npc
dir=target/$([ "$profile" = dev ] && echo debug || echo "$profile")
rm -rf out/demo-experts
"$dir"/legora train --config plugins/demo-experts/run.toml --skip-eval
for pair in medical:demo-specialty finance:demo-sentiment; do
  task=${pair%%:*}
  name=${pair#*:}
  dest=plugins/$task/experts/$name
  mkdir -p "$dest"
  cp out/demo-experts/experts/$task/adapter_model.safetensors "$dest/"
  # name the base as the repository does, not by the path this run saw
  sed 's#"base_model_name_or_path": "[^"]*"#"base_model_name_or_path": "demo/base"#' \
    out/demo-experts/experts/$task/adapter_config.json > "$dest/adapter_config.json"
  echo "wrote $dest"
done
