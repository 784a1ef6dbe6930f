"""Loads a model folder written by hotspa (`hotspa train --save DIR`, or a checkpoint step
folder) with Hugging Face transformers and prints its loss on a JSONL of `text` records the way
`hotspa eval` computes it (every predicted token of every document cut into pieces of at most
MAX_LEN tokens counts once), and whether loading missed or added any key.

    python3 scripts/check-hf.py DIR held-out.jsonl MAX_LEN
    hotspa eval --model DIR --data held-out.jsonl --max-len MAX_LEN --json   # the same loss

Needs torch and transformers (5.x).
"""

import json
import sys

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

folder, data, max_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, info = LlamaForCausalLM.from_pretrained(
    folder, dtype=torch.float32, output_loading_info=True
)
model.eval()
tok = AutoTokenizer.from_pretrained(folder)
total, count = 0.0, 0
for line in open(data):
    ids = tok(json.loads(line)["text"])["input_ids"]
    for i in range(0, len(ids), max_len):
        piece = ids[i : i + max_len]
        if len(piece) < 2:
            continue
        t = torch.tensor([piece])
        with torch.no_grad():
            total += model(input_ids=t, labels=t).loss.double().item() * (len(piece) - 1)
        count += len(piece) - 1
print(
    json.dumps(
        {
            "loss": total / count,
            "predicted_tokens": count,
            "missing_keys": sorted(info["missing_keys"]),
            "unexpected_keys": sorted(info["unexpected_keys"]),
        }
    )
)
