# PyTorch's side of `hotspa bench step --vs-torch`: the same LLaMA config and batch shape, trained
# eagerly with Hugging Face transformers' LlamaForCausalLM (SDPA attention), fp32 master weights
# under bf16 autocast, AdamW, gradient clipping, micro-batches accumulated as hotspa does.
# argv[1]: JSON {config: {...}, sequences, seq_len, micro_batch, steps}. Prints JSON.
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM

a = json.loads(sys.argv[1])
cfg = LlamaConfig(**a["config"])
torch.manual_seed(0)
try:
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").cuda()
except Exception:
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
S, T, mb = a["sequences"], a["seq_len"], a["micro_batch"]
ids = torch.randint(0, cfg.vocab_size, (S, T), device="cuda")
times = []
for step in range(a["steps"]):
    torch.cuda.synchronize()
    t0 = time.time()
    for i in range(0, S, mb):
        x = ids[i:i + mb]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss * (x.shape[0] / S)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    times.append(time.time() - t0)
steady = sorted(times[2:]) or times
sec = steady[len(steady) // 2]
print(json.dumps({"torch": torch.__version__, "params": sum(p.numel() for p in model.parameters()),
                  "seconds": sec, "tokens_per_s": S * T / sec,
                  "peak_bytes": torch.cuda.max_memory_allocated()}))
