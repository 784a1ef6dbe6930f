#!/usr/bin/env bash
# Golden data files made by the tools users make them with, for crates/data/tests/golden.rs.
#
#   MEGATRON=/path/to/Megatron-LM PYTHON=/path/to/python crates/data/tests/golden/make_golden.sh
#
# - megatron/docs_text_document.{bin,idx}: Megatron-LM's own tools/preprocess_data.py on
#   docs.jsonl with the golden HF tokenizer (crates/model/tests/golden/tokenizer), --append-eod.
#   (Megatron's current tree imports typing.override, Python 3.12; on 3.11 the script below
#   rewrites that import to typing_extensions in a scratch copy first.)
# - docs.parquet, ids.parquet: pyarrow writing the texts of docs.jsonl, and token id lists.
# - expected.json: every document's ids as Megatron's own reader (IndexedDataset) returns them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../../.." && pwd)"
py="${PYTHON:-python3}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cp -r "${MEGATRON:?set MEGATRON to a Megatron-LM checkout}" "$scratch/megatron"
grep -rl "from typing import.*override" "$scratch/megatron/megatron" | xargs -r sed -i -E \
    's/from typing import (.*), override$/from typing import \1\nfrom typing_extensions import override/'
mkdir -p "$here/megatron"
(cd "$scratch/megatron" && PYTHONPATH=. HF_HUB_OFFLINE=1 "$py" tools/preprocess_data.py \
    --input "$here/docs.jsonl" --output-prefix "$here/megatron/docs" \
    --tokenizer-type HuggingFaceTokenizer \
    --tokenizer-model "$root/crates/model/tests/golden/tokenizer" --append-eod --workers 1)
PYTHONPATH="$scratch/megatron" "$py" - "$here" <<'PY'
import json, sys
import pyarrow as pa, pyarrow.parquet as pq
from megatron.core.datasets.indexed_dataset import IndexedDataset
here = sys.argv[1]
d = IndexedDataset(f"{here}/megatron/docs_text_document")
docs = [[int(t) for t in d[i]] for i in range(len(d))]
texts = [json.loads(l)["text"] for l in open(f"{here}/docs.jsonl")]
pq.write_table(pa.table({"text": texts, "source": ["a"] * len(texts)}), f"{here}/docs.parquet")
pq.write_table(pa.table({"input_ids": pa.array(docs, type=pa.list_(pa.int32()))}), f"{here}/ids.parquet")
json.dump({"megatron": docs, "texts": texts}, open(f"{here}/expected.json", "w"), indent=1)
print(docs)
PY
