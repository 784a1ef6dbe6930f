"""Tokenized datasets as Hugging Face `datasets` writes them, for crates/data/tests/golden.rs:
which extra columns hotspa accepts (they say what it trains anyway) and which it refuses.

    /opt/hfenv/bin/python crates/data/tests/golden/make_hf_fields.py   # datasets, transformers

- hf_tokenized.{jsonl,parquet} (and _array.json: one JSON array, to_json(lines=False)): docs.jsonl mapped through the golden tokenizer
  (text, input_ids, attention_mask of ones), then `labels` copied from input_ids as
  DataCollatorForLanguageModeling(mlm=False) makes them: accepted.
- hf_padded.{jsonl,parquet}: the same texts padded to 24 tokens (attention_mask 0 on the pad):
  refused.
- hf_sft.jsonl: labels -100 on each record's first two tokens (a masked prompt): refused.
"""
import os
from datasets import Dataset
from transformers import AutoTokenizer, DataCollatorForLanguageModeling

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.abspath(os.path.join(here, "../../../.."))
tok = AutoTokenizer.from_pretrained(os.path.join(root, "crates/model/tests/golden/tokenizer"))
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
texts = Dataset.from_json(os.path.join(here, "docs.jsonl"))

plain = texts.map(lambda b: tok(b["text"]), batched=True)
collate = DataCollatorForLanguageModeling(tok, mlm=False, return_tensors="np")
plain = plain.map(
    lambda r: {"labels": collate([{"input_ids": r["input_ids"]}])["labels"][0].tolist()}
)
plain.to_json(os.path.join(here, "hf_tokenized.jsonl"))
plain.to_json(os.path.join(here, "hf_tokenized_array.json"), lines=False)
plain.to_parquet(os.path.join(here, "hf_tokenized.parquet"))

padded = texts.map(
    lambda b: tok(b["text"], padding="max_length", max_length=24, truncation=True), batched=True
)
padded.to_json(os.path.join(here, "hf_padded.jsonl"))
padded.to_parquet(os.path.join(here, "hf_padded.parquet"))

sft = texts.map(lambda b: tok(b["text"]), batched=True).map(
    lambda r: {"labels": [-100, -100] + r["input_ids"][2:]}
)
sft.to_json(os.path.join(here, "hf_sft.jsonl"))
print(plain[0], padded[0], sft[0], sep="\n")
