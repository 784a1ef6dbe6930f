#!/usr/bin/env bash
# Writes the `crates-io` length distribution of `hotspa simulate --dataset crates-io`: one
# document per `.rs` file of the crates.io packages in this workspace's Cargo.lock (as
# `cargo fetch` unpacks them), its length the file's bytes (hotspa's byte-level tokens),
# sorted. A long-tailed corpus that reaches a million tokens, named and reproducible.
#
#   scripts/lengths-crates-io.sh > crates/sim/data/crates-io.txt
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fetch -q
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/ | head -1)
python3 - "$src" <<'PY'
import os, re, sys
src = sys.argv[1]
lock = open("Cargo.lock").read()
pkgs = re.findall(r'\[\[package\]\]\nname = "([^"]+)"\nversion = "([^"]+)"\nsource = "registry\+', lock)
sizes = []
for name, version in sorted(set(pkgs)):
    root = os.path.join(src, f"{name}-{version}")
    if not os.path.isdir(root):
        sys.exit(f"{root}: not unpacked (run cargo fetch)")
    for d, _, files in os.walk(root):
        sizes += [os.path.getsize(os.path.join(d, f)) for f in files if f.endswith(".rs")]
sizes = sorted(s for s in sizes if s > 0)
print(f"# {len(sizes)} .rs files of the {len(set(pkgs))} crates.io packages in Cargo.lock: bytes each")
for i in range(0, len(sizes), 16):
    print(" ".join(map(str, sizes[i:i + 16])))
PY
