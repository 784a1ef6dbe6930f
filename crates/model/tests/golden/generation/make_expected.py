"""What transformers' generate() takes from each generation_config.json here: the file read by
GenerationConfig.from_pretrained, unset fields filled with transformers' own defaults
(GenerationConfig._get_default_generation_params) as generate() fills them.

    /opt/hfenv/bin/python crates/model/tests/golden/generation/make_expected.py   # transformers
"""
import json, os, shutil, tempfile
import transformers
from transformers import GenerationConfig

here = os.path.dirname(os.path.abspath(__file__))
defaults = GenerationConfig._get_default_generation_params()
out = {"transformers": transformers.__version__}
for name in sorted(f for f in os.listdir(here) if f.endswith(".json") and f != "expected.json"):
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(os.path.join(here, name), os.path.join(d, "generation_config.json"))
        g = GenerationConfig.from_pretrained(d)
    get = lambda k: getattr(g, k) if getattr(g, k) is not None else defaults.get(k)
    eos = g.eos_token_id
    out[name] = {
        "do_sample": get("do_sample"),
        "temperature": get("temperature"),
        "top_k": get("top_k"),
        "top_p": get("top_p"),
        "eos": None if eos is None else (eos if isinstance(eos, list) else [eos]),
        "max_new_tokens": g.max_new_tokens,
        "max_length": g.max_length,
    }
json.dump(out, open(os.path.join(here, "expected.json"), "w"), indent=1)
print(json.dumps(out, indent=1))
