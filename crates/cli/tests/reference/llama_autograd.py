"""An independent implementation of hotspa's training contract (DESIGN §3) for cross-checking:
a LLaMA forward in Hugging Face's conventions written with numpy, gradients by the `autograd`
package, PyTorch's AdamW and global-norm clipping written from their documentation, all in
float64. Reads an HF config.json, initial safetensors weights and a JSONL of input_ids; trains
on global batches taken in file order (wrapping); writes the final weights as f32 safetensors.

usage: llama_autograd.py CONFIG INIT DATA OUT GLOBAL_BATCH STEPS LR BETA1 BETA2 EPS WD CLIP
"""
import json
import sys

import autograd.numpy as np
from autograd import grad
from safetensors.numpy import load_file, save_file


def logsumexp(x, axis, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    out = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


def main():
    cfg_path, init, data, out = sys.argv[1:5]
    batch, steps = int(sys.argv[5]), int(sys.argv[6])
    lr, b1, b2, eps, wd, clip = map(float, sys.argv[7:13])
    cfg = json.load(open(cfg_path))
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads", H)
    hidden = cfg["hidden_size"]
    hd = cfg.get("head_dim") or hidden // H
    L = cfg["num_hidden_layers"]
    rms_eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", 10000.0)
    tied = cfg.get("tie_word_embeddings", False)
    params = {k: v.astype(np.float64) for k, v in load_file(init).items()}
    records = [json.loads(l)["input_ids"] for l in open(data) if l.strip()]

    def rms(x, w):
        return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + rms_eps))

    def rope(x, heads):
        T = x.shape[0]
        inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
        ang = np.arange(T)[:, None] * inv[None, :]
        emb = np.concatenate([ang, ang], axis=-1)[:, None, :]
        x = np.reshape(x, (T, heads, hd))
        rot = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], axis=-1)
        return np.reshape(x * np.cos(emb) + rot * np.sin(emb), (T, heads * hd))

    def seq_loss(p, s):
        ids, tgt = np.array(s[:-1]), np.array(s[1:])
        T = len(ids)
        x = p["model.embed_tokens.weight"][ids]
        causal = np.triu(np.ones((T, T)), 1) > 0
        for l in range(L):
            pre = f"model.layers.{l}."
            n = rms(x, p[pre + "input_layernorm.weight"])
            q = rope(n @ p[pre + "self_attn.q_proj.weight"].T, H)
            k = rope(n @ p[pre + "self_attn.k_proj.weight"].T, KV)
            v = n @ p[pre + "self_attn.v_proj.weight"].T
            q = np.reshape(q, (T, H, hd))
            k = np.repeat(np.reshape(k, (T, KV, hd)), H // KV, axis=1)
            v = np.repeat(np.reshape(v, (T, KV, hd)), H // KV, axis=1)
            scores = np.einsum("thd,uhd->htu", q, k) / np.sqrt(hd)
            scores = np.where(causal[None, :, :], -1e30, scores)
            probs = np.exp(scores - logsumexp(scores, axis=-1, keepdims=True))
            a = np.reshape(np.einsum("htu,uhd->thd", probs, v), (T, H * hd))
            x = x + a @ p[pre + "self_attn.o_proj.weight"].T
            n = rms(x, p[pre + "post_attention_layernorm.weight"])
            g = n @ p[pre + "mlp.gate_proj.weight"].T
            u = n @ p[pre + "mlp.up_proj.weight"].T
            x = x + ((g / (1.0 + np.exp(-g))) * u) @ p[pre + "mlp.down_proj.weight"].T
        x = rms(x, p["model.norm.weight"])
        head = p["model.embed_tokens.weight"] if tied else p["lm_head.weight"]
        logits = x @ head.T
        return np.sum(logsumexp(logits, axis=1) - logits[np.arange(T), tgt])

    def loss(p, seqs):
        predicted = sum(len(s) - 1 for s in seqs)
        return sum(seq_loss(p, s) for s in seqs) / predicted

    dloss = grad(loss)
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    for step in range(steps):
        seqs = [records[(step * batch + i) % len(records)] for i in range(batch)]
        g = dloss(params, seqs)
        norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
        coef = min(1.0, clip / (norm + 1e-6))
        t = step + 1
        for k in params:
            gk = g[k] * coef
            p = params[k]
            if p.ndim >= 2:
                p = p * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v2[k] = b2 * v2[k] + (1 - b2) * gk * gk
            mhat = m[k] / (1 - b1 ** t)
            vhat = v2[k] / (1 - b2 ** t)
            params[k] = p - lr * mhat / (np.sqrt(vhat) + eps)
        print(f"step {t}: grad_norm {norm:.6f}", file=sys.stderr)
    save_file({k: np.asarray(v, dtype=np.float32) for k, v in params.items()}, out, metadata={"format": "pt"})


if __name__ == "__main__":
    main()
