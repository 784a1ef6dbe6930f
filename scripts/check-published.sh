#!/usr/bin/env bash
# The cost model against published end-to-end training throughputs (docs/cost-model.md §3):
# each row runs `hotspa simulate --strategy` on the configuration the source reports, with the
# cluster files under docs/validation (each says where its figures come from), and prints the
# published figure, ours and the error. Nothing here is fitted to these figures.
#
#   scripts/check-published.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-./target/release/hotspa}
[ -x "$BIN" ] || cargo build --release -q -p hotspa
V=docs/validation

# source | devices | model, context | published | unit | cluster | gpus | model | lengths | batch | micro-batch tokens | strategy
rows=(
  "KempnerForge benchmarks|1 H200|7B, 4K|10471|tok|h200x4|1|llama2-7b|len4096|16|4096|dp1+full"
  "KempnerForge|4 H200 (1 node)|7B, 4K|9746|tok|h200x4|4|llama2-7b|len4096|64|4096|dp4zero3+full"
  "KempnerForge|8 H200 (2 nodes)|13B, 4K|4426|tok|h200x4|8|llama2-13b|len4096|128|4096|dp8zero3+full"
  "KempnerForge|16 H200|13B, 4K|3363|tok|h200x4|16|llama2-13b|len4096|256|4096|dp4tp4zero3+full"
  "KempnerForge|32 H200|13B, 4K|3260|tok|h200x4|32|llama2-13b|len4096|512|4096|dp8tp4zero3+full"
  "PyTorch FSDP blog (IBM, Meta)|128 A100|Llama-2 7B, 4K|3700|tok|a100-vela|128|llama2-7b|len4096|256|8192|dp128zero3"
  "Llama 3 (Table 4)|8,192 H100|405B, 8K|430|tflops|h100-meta|8192|$V/llama3-405b.json|len8192|2048|8192|dp64tp8pp16spzero1+full"
  "Llama 3 (Table 4)|16,384 H100|405B, 8K|400|tflops|h100-meta|16384|$V/llama3-405b.json|len8192|2048|8192|dp128tp8pp16spzero1+full"
)

printf '| source | devices | model, context | configuration | published | predicted | error |\n|---|---|---|---|---|---|---|\n'
for row in "${rows[@]}"; do
  IFS='|' read -r src devices what published unit cluster gpus model lens batch mbt strategy <<<"$row"
  json=$("$BIN" simulate --json --cluster "$V/$cluster.toml" --gpus "$gpus" --model "$model" \
    --dataset "$V/$lens.txt" --max-len "${lens#len}" --global-batch "$batch" \
    --strategy "$strategy" --micro-batch-tokens "$mbt")
  key=tokens_per_s_per_gpu
  [ "$unit" = tflops ] && key=model_tflops_per_gpu
  python3 - "$json" "$key" "$published" "$src" "$devices" "$what" "$strategy" "$unit" <<'PY'
import json, sys
v = json.loads(sys.argv[1]); key, published = sys.argv[2], float(sys.argv[3])
got = v[key]
unit = "tok/s/GPU" if sys.argv[8] == "tok" else "TFLOP/s/GPU"
print(f"| {sys.argv[4]} | {sys.argv[5]} | {sys.argv[6]} | `{sys.argv[7]}` | {published:,.0f} {unit} "
      f"| {got:,.0f} (MFU {100 * v['mfu']:.0f} %) | {100 * (got / published - 1):+.0f} % |")
PY
done
