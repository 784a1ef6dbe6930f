# Shared by the PyTorch scripts of `hotspa bench … --vs-torch` (written beside them).
import torch

def timed(fn, iters, warm):
    """The median of `iters` CUDA-event timings of `fn` (ms), after `warm` untimed calls."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]
