"""Golden files made by Hugging Face transformers and tokenizers themselves, for hotspa's tests.

Run from the repository root with transformers 5, tokenizers and torch installed:

    python3 crates/model/tests/golden/make_golden.py

It writes, under crates/model/tests/golden/:
  tokenizer/           a BPE tokenizer trained by `tokenizers` (LLaMA-style: <s> prepended by
                       the post-processor), saved by transformers' PreTrainedTokenizerFast
  tiny/                a random LlamaForCausalLM saved by save_pretrained (rope_parameters,
                       theta 10000), with the tokenizer's files
  theta500k/           the same shape with rope_parameters.rope_theta 500000
  llama3/              rope_type llama3 (factor 4, low 1, high 2, original 16, theta 10):
                       every branch of the scaling is hit (kept, smoothed, divided)
  linear/              rope_type linear (factor 2), in the older top-level rope_scaling form
  sharded/             `tiny` saved with max_shard_size so it is split over several files
  golden.json          for every model: transformers' inv_freq, and the loss of a fixed batch
                       (the sum of next-token cross-entropy over every predicted token of every
                       sequence, divided by their count: hotspa's definition); the tokenizer's
                       ids for fixed texts (tokenizer(text), special tokens added); versions
"""

import json
import os
import shutil

import torch
import tokenizers
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))

TEXTS = [
    "hot switching moves the weights between strategies inside one step",
    "Short sequences train under DP, long ones under TP.",
    "a",
    "ünïcödé and 123 numbers",
]
# The corpus the tokenizer learns from: this project's design vocabulary.
CORPUS = [
    "parallelism hot switching: inside one training step, short sequences train under one",
    "parallel strategy (say DP8), long ones under another (TP8, TP4xPP2), and weights and",
    "gradients move between the strategies fast enough that the step still ends with exactly",
    "the update a single device would make. Sequences are packed; positions restart at 0.",
    "The loss is the sum over every sequence and position of next-token cross-entropy.",
] * 4

# The fixed batch of the loss goldens (token ids below the vocabulary of 96).
BATCH = [
    [(i * 7 + j * j + 3) % 96 for j in range(n)] for i, n in enumerate([5, 17, 2, 40, 9])
]


def make_tokenizer(out):
    # SentencePiece-like, as LLaMA's: "▁" for spaces, unknown characters to <unk>.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=96,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(out)
    ids = {t: fast(t)["input_ids"] for t in TEXTS}
    for t in TEXTS:
        assert tok.encode(t).ids == ids[t], t
    return tok.get_vocab_size(), bos, tok.token_to_id("</s>"), ids


def config(**extra):
    base = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(extra)
    return LlamaConfig(**base)


def loss(model):
    """hotspa's loss: every predicted token of every sequence counts once."""
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in BATCH:
            ids = torch.tensor([seq])
            out = model(input_ids=ids, labels=ids)
            total += out.loss.double().item() * (len(seq) - 1)
            count += len(seq) - 1
    return total / count


def inv_freq(model):
    return model.model.rotary_emb.inv_freq.double().tolist()


def main():
    torch.manual_seed(0)
    gold = {
        "versions": {
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "torch": torch.__version__,
        },
        "batch": BATCH,
        "models": {},
    }
    tok_dir = os.path.join(HERE, "tokenizer")
    shutil.rmtree(tok_dir, ignore_errors=True)
    vocab, bos, eos, ids = make_tokenizer(tok_dir)
    gold["tokenizer"] = {"vocab_size": vocab, "bos": bos, "eos": eos, "texts": ids}
    variants = {
        "tiny": config(),
        "theta500k": config(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        "llama3": config(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 2.0,
                "original_max_position_embeddings": 16,
            }
        ),
    }
    for name, cfg in variants.items():
        torch.manual_seed(len(name))
        model = LlamaForCausalLM(cfg).float().eval()
        out = os.path.join(HERE, name)
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out)
        if name == "tiny":
            prompt = torch.tensor([[1, 42, 76]])
            with torch.no_grad():
                gen = model.generate(prompt, max_new_tokens=12, do_sample=False)
                seq = torch.tensor([BATCH[3][:20]])
                logits = model(seq).logits[0].double().tolist()
            gold["generate"] = {
                "prompt": prompt[0].tolist(),
                "greedy": gen[0, 3:].tolist(),
                "sequence": seq[0].tolist(),
                "logits": logits,
            }
            for f in os.listdir(tok_dir):
                shutil.copy(os.path.join(tok_dir, f), out)
            sharded = os.path.join(HERE, "sharded")
            shutil.rmtree(sharded, ignore_errors=True)
            model.save_pretrained(sharded, max_shard_size="20KB")
            gold["models"]["sharded"] = {"loss": loss(model), "inv_freq": inv_freq(model)}
        gold["models"][name] = {"loss": loss(model), "inv_freq": inv_freq(model)}
    # The older form: a top-level rope_theta and rope_scaling, as transformers 4 wrote them.
    torch.manual_seed(7)
    model = LlamaForCausalLM(
        config(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    ).float().eval()
    out = os.path.join(HERE, "linear")
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    path = os.path.join(out, "config.json")
    c = json.load(open(path))
    del c["rope_parameters"]
    c["rope_theta"] = 10000.0
    c["rope_scaling"] = {"type": "linear", "factor": 2.0}
    json.dump(c, open(path, "w"), indent=2)
    reread = LlamaForCausalLM.from_pretrained(out).float().eval()
    gold["models"]["linear"] = {"loss": loss(reread), "inv_freq": inv_freq(reread)}
    assert abs(gold["models"]["linear"]["loss"] - loss(model)) < 1e-7
    with open(os.path.join(HERE, "golden.json"), "w") as f:
        json.dump(gold, f, indent=1)
    print(json.dumps({k: v["loss"] for k, v in gold["models"].items()}))


if __name__ == "__main__":
    main()
