# PyTorch's side of `hotspa bench gemm --backend cuda --vs-torch`: argv[1] is a JSON list of
# [m, n, k, trans_b]; prints one JSON list of {ms_bf16, ms_cast_bf16, ms_tf32_off_f32}.
import json, sys, torch

from timing import timed as timed_median


def timed(fn):
    return timed_median(fn, iters=20, warm=5)

torch.backends.cuda.matmul.allow_tf32 = False
out = []
for m, n, k, tb in json.loads(sys.argv[1]):
    a = torch.randn(m, k, device="cuda")
    b = torch.randn(n, k, device="cuda") if tb else torch.randn(k, n, device="cuda")
    a16, b16 = a.bfloat16(), b.bfloat16()
    op = (lambda x, y: x @ y.t()) if tb else (lambda x, y: x @ y)
    out.append({
        "ms_bf16": timed(lambda: op(a16, b16)),
        "ms_cast_bf16": timed(lambda: op(a.bfloat16(), b.bfloat16()).float()),
        "ms_f32": timed(lambda: op(a, b)),
    })
print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": out}))
