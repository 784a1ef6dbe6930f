"""A Llama-2-style tokenizer.json (BPE with byte fallback, `Prepend("▁")` + `Replace(" ", "▁")`
normalizer, `<s>` post-processor), trained here with `tokenizers`, and the ids transformers'
`tokenizer(text)` gives with it when tokenizer_config.json names `LlamaTokenizer`: transformers
5 then builds the pipeline from its class definition (no normalizer, a Metaspace pre-tokenizer
whose prepend scheme follows `legacy` and `add_prefix_space`, BPE without an unknown token), not
from tokenizer.json's, which differs from the file for text that starts with a space or follows
a special token. For crates/data/tests/golden.rs.

    /opt/hfenv/bin/python crates/data/tests/golden/make_llama_class.py   # tokenizers, transformers
"""
import json, os, tempfile
from tokenizers import Tokenizer, models, decoders, normalizers, processors, trainers
from transformers import AutoTokenizer
import transformers

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "llama_class")
os.makedirs(out, exist_ok=True)
tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
tok.decoder = decoders.Sequence(
    [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
)
special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
corpus = [json.loads(l)["text"] for l in open(os.path.join(here, "docs.jsonl"))]
tok.train_from_iterator(corpus * 50, trainers.BpeTrainer(vocab_size=400, special_tokens=special))
tok.post_processor = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
)
tok.save(os.path.join(out, "tokenizer.json"))
texts = ["hot switching moves", " leading space", "two  spaces", "trailing ", "a\nb",
         "Ünïcode ü 😀", "x <s> y", "x </s>  y", "</s>", ""]
cases = {}
for name, extra in {
    "legacy_false": {"legacy": False},
    "legacy_true": {"legacy": True},
    "legacy_absent": {},
    "no_prefix_space": {"add_prefix_space": False},
    "fast_alias": {"legacy": False, "_class": "LlamaTokenizerFast"},
}.items():
    cls = extra.pop("_class", "LlamaTokenizer")
    cfg = {"tokenizer_class": cls, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "add_bos_token": True, "add_eos_token": False, **extra}
    json.dump(cfg, open(os.path.join(out, f"{name}.tokenizer_config.json"), "w"), indent=1)
    with tempfile.TemporaryDirectory() as d:
        json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"))
        tok.save(os.path.join(d, "tokenizer.json"))
        h = AutoTokenizer.from_pretrained(d)
        cases[name] = {"class": type(h).__name__, "ids": [h(t).input_ids for t in texts]}
raw = [tok.encode(t).ids for t in texts]
json.dump({"transformers": transformers.__version__, "texts": texts, "tokenizers_as_saved": raw,
           "cases": cases}, open(os.path.join(out, "expected.json"), "w"), indent=1)
for k, v in cases.items():
    print(k, v["class"], [a == b for a, b in zip(v["ids"], raw)])
