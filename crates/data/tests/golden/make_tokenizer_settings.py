"""A tokenizer.json saved with truncation and padding turned on (as `tokenizers` keeps them when
a tokenizer is saved after enable_truncation / enable_padding), and the ids transformers'
`tokenizer(text)` gives with it: transformers turns both off unless the call asks, so the text
is neither cut nor padded. For crates/data/tests/golden.rs.

    /opt/hfenv/bin/python crates/data/tests/golden/make_tokenizer_settings.py   # tokenizers, transformers
"""
import json, os, shutil
from tokenizers import Tokenizer
from transformers import AutoTokenizer

here = os.path.dirname(os.path.abspath(__file__))
src = os.path.join(here, "../../../model/tests/golden/tokenizer")
out = os.path.join(here, "tokenizer_settings")
os.makedirs(out, exist_ok=True)
t = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
t.enable_truncation(max_length=8)
t.enable_padding(length=12, pad_id=0, pad_token="<unk>")
t.save(os.path.join(out, "tokenizer.json"))
shutil.copy(os.path.join(src, "tokenizer_config.json"), out)
texts = [json.loads(l)["text"] for l in open(os.path.join(here, "docs.jsonl"))]
hf = AutoTokenizer.from_pretrained(out)
expected = {
    "transformers": [hf(x).input_ids for x in texts],
    "tokenizers_as_saved": [e.ids for e in [t.encode(x) for x in texts]],
}
json.dump(expected, open(os.path.join(out, "expected.json"), "w"))
print(expected)
