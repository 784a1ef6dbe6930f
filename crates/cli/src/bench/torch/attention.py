# PyTorch's side of `hotspa bench attention --backend cuda --vs-torch`: argv[1] is a JSON object
# {tokens: [...], heads, kv_heads, head_dim}; scaled_dot_product_attention, causal, one sequence,
# forward and forward+backward, in bf16 (flash kernels) and f32.
import json, sys, torch
import torch.nn.functional as F

from timing import timed as timed_median


def timed(fn):
    return timed_median(fn, iters=10, warm=3)

cfg = json.loads(sys.argv[1])
h, kv, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
rows = []
for t in cfg["tokens"]:
    row = {"tokens": t}
    for name, dt in (("bf16", torch.bfloat16), ("f32", torch.float32)):
        q = torch.randn(1, h, t, d, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(1, kv, t, d, device="cuda", dtype=dt, requires_grad=True)
        v = torch.randn(1, kv, t, d, device="cuda", dtype=dt, requires_grad=True)
        do = torch.randn(1, h, t, d, device="cuda", dtype=dt)
        gqa = kv != h
        fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        def both():
            o = fwd()
            o.backward(do)
        try:
            row[f"fwd_ms_{name}"] = timed(lambda: fwd().detach())
            row[f"fwd_bwd_ms_{name}"] = timed(both)
        except torch.OutOfMemoryError:
            row[f"fwd_ms_{name}"] = row[f"fwd_bwd_ms_{name}"] = None
        del q, k, v, do
        torch.cuda.empty_cache()
    rows.append(row)
print(json.dumps({"torch": torch.__version__, "rows": rows}))
