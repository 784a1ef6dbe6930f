//! The data formats users already have, against the tools that make them (files and scripts in
//! `tests/golden/` and `crates/model/tests/golden/`): a `tokenizer.json` trained by
//! `tokenizers` gives exactly the ids HF's `tokenizer(text)` gives (special tokens included);
//! Megatron-LM's `preprocess_data.py` output reads as Megatron's own reader reads it; Parquet
//! files written by pyarrow read by column.

use std::path::{Path, PathBuf};

use data::{Dataset, TextTokenizer};

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn model_golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/golden")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_tokenizers_tokenizer_gives_hfs_ids_with_special_tokens() {
    let g = json(&model_golden().join("golden.json"));
    let t = TextTokenizer::from_path(&model_golden().join("tokenizer")).unwrap();
    assert_eq!(
        t.vocab_size() as u64,
        g["tokenizer"]["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(t.eos_id(), Some(2));
    for (text, ids) in g["tokenizer"]["texts"].as_object().unwrap() {
        let want: Vec<u32> = serde_json::from_value(ids.clone()).unwrap();
        assert_eq!(t.encode(text).unwrap(), want, "{text}");
        assert_eq!(want[0], 1, "<s> first, as LLaMA's post-processor adds it");
    }
    // With an end-of-sequence id after every document.
    let e = TextTokenizer::from_path(&model_golden().join("tiny"))
        .unwrap()
        .with_eos(2);
    assert_eq!(e.encode("a").unwrap(), vec![1, 47, 2]);
    assert_eq!(t.decode(&t.encode("a").unwrap()), "a");
    // A missing or unreadable tokenizer is an error naming it.
    let err = TextTokenizer::from_path(Path::new("/nonexistent/tok")).unwrap_err();
    assert!(
        err.to_string()
            .contains("/nonexistent/tok: tokenizer: no such file"),
        "{err}"
    );
}

/// The golden text file `name` through the golden tokenizer, EOS (id 2) appended to each
/// document (what Megatron's `--append-eod` does), loads as the sequences `want`.
fn text_reads_as(name: &str, want: &[Vec<u32>]) {
    let t = TextTokenizer::from_path(&model_golden().join("tokenizer"))
        .unwrap()
        .with_eos(2);
    let ds = Dataset::load_with(&here().join(name), 96, 1000, &t).unwrap();
    assert_eq!(ds.sequences(), want, "{name}");
}

/// Each of the golden files `names` loads (vocabulary 96) as the sequences `want`.
fn each_reads_as(names: &[&str], want: &[Vec<u32>]) {
    for name in names {
        let ds = Dataset::load(&here().join(name), 96, 1000).unwrap();
        assert_eq!(ds.sequences(), want, "{name}");
    }
}

#[test]
fn megatron_indexed_datasets_read_as_megatron_reads_them() {
    let want: Vec<Vec<u32>> =
        serde_json::from_value(json(&here().join("expected.json"))["megatron"].clone()).unwrap();
    let prefix = "megatron/docs_text_document";
    each_reads_as(
        &[prefix, &format!("{prefix}.idx"), &format!("{prefix}.bin")],
        &want,
    );
    // The same documents as JSONL text through the same tokenizer, EOS appended (what
    // --append-eod did there).
    text_reads_as("docs.jsonl", &want);
    // A vocabulary too small, and a truncated index, are refused naming the file.
    let e = Dataset::load(&here().join("megatron/docs_text_document"), 50, 1000).unwrap_err();
    assert!(
        e.to_string()
            .contains("outside the model's vocabulary of 50"),
        "{e}"
    );
    let d = tempfile::tempdir().unwrap();
    let idx = std::fs::read(here().join("megatron/docs_text_document.idx")).unwrap();
    std::fs::write(d.path().join("x.idx"), &idx[..40]).unwrap();
    std::fs::copy(
        here().join("megatron/docs_text_document.bin"),
        d.path().join("x.bin"),
    )
    .unwrap();
    let e = Dataset::load(&d.path().join("x"), 96, 1000)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("x.idx: not a valid Megatron indexed dataset: truncated"),
        "{e}"
    );
}

#[test]
fn parquet_files_read_by_column() {
    let g = json(&here().join("expected.json"));
    let want: Vec<Vec<u32>> = serde_json::from_value(g["megatron"].clone()).unwrap();
    let ds = Dataset::load(&here().join("ids.parquet"), 96, 1000).unwrap();
    assert_eq!(ds.sequences(), want.as_slice());
    text_reads_as("docs.parquet", &want);
    let e = Dataset::load(&here().join("docs.jsonl"), 96, 1000).unwrap_err();
    assert!(e.to_string().contains("text is byte-tokenized"), "{e}");
}

/// Tokenized datasets as HF `datasets` writes them (`make_hf_fields.py`): the columns beside
/// `input_ids` that would change what trains are accepted where they say what hotspa trains
/// anyway and refused by name where they do not (padding, a masked prompt), never ignored.
#[test]
fn hf_tokenized_datasets_train_as_they_are_and_padding_or_masked_labels_are_refused() {
    let t = TextTokenizer::from_path(&model_golden().join("tokenizer")).unwrap();
    let texts: Vec<String> =
        serde_json::from_value(json(&here().join("expected.json"))["texts"].clone()).unwrap();
    let want: Vec<Vec<u32>> = texts.iter().map(|s| t.encode(s).unwrap()).collect();
    // text, input_ids, attention_mask of ones, labels copied by the LM collator.
    let tokenized = ["jsonl", "parquet"].map(|ext| format!("hf_tokenized.{ext}"));
    each_reads_as(
        &[&tokenized[0], &tokenized[1], "hf_tokenized_array.json"],
        &want,
    );
    for name in ["hf_padded.jsonl", "hf_padded.parquet"] {
        let e = Dataset::load(&here().join(name), 96, 1000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(name) && e.contains("`attention_mask[2]` = 0 (padding)"),
            "{e}"
        );
    }
    let e = Dataset::load(&here().join("hf_sft.jsonl"), 96, 1000)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hf_sft.jsonl:1: `labels[0]` = -100 differs") && e.contains("masked prompt"),
        "{e}"
    );
}

/// A tokenizer.json saved with truncation (8) and padding (12) on gives what transformers'
/// `tokenizer(text)` gives with it — whole, unpadded documents (`make_tokenizer_settings.py`);
/// the tokenizers library as saved would cut and pad every one.
#[test]
fn a_tokenizer_saved_with_truncation_and_padding_encodes_as_transformers_does() {
    let dir = here().join("tokenizer_settings");
    let g = json(&dir.join("expected.json"));
    let want: Vec<Vec<u32>> = serde_json::from_value(g["transformers"].clone()).unwrap();
    let as_saved: Vec<Vec<u32>> = serde_json::from_value(g["tokenizers_as_saved"].clone()).unwrap();
    assert!(
        as_saved.iter().all(|ids| ids.len() == 12),
        "the file does pad"
    );
    let t = TextTokenizer::from_path(&dir).unwrap();
    let texts: Vec<String> =
        serde_json::from_value(json(&here().join("expected.json"))["texts"].clone()).unwrap();
    let got: Vec<Vec<u32>> = texts.iter().map(|s| t.encode(s).unwrap()).collect();
    assert_eq!(got, want);
    assert_ne!(got, as_saved);
}

/// A tokenizer_config.json naming `LlamaTokenizer` (or its `Fast` alias) makes transformers 5
/// tokenize with the class's own pipeline over tokenizer.json's vocabulary and merges
/// (`make_llama_class.py`): the same ids here for every `legacy` / `add_prefix_space` setting,
/// including text that starts with a space or follows a special token, where the file's own
/// pipeline differs; another class transformers rebuilds is refused by name.
#[test]
fn a_llama_tokenizer_class_tokenizes_as_transformers_builds_it() {
    let dir = here().join("llama_class");
    let g = json(&dir.join("expected.json"));
    let texts: Vec<String> = serde_json::from_value(g["texts"].clone()).unwrap();
    let raw: Vec<Vec<u32>> = serde_json::from_value(g["tokenizers_as_saved"].clone()).unwrap();
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("tokenizer.json"), d.path().join("tokenizer.json")).unwrap();
    let mut differs = 0;
    for (case, want) in g["cases"].as_object().unwrap() {
        std::fs::copy(
            dir.join(format!("{case}.tokenizer_config.json")),
            d.path().join("tokenizer_config.json"),
        )
        .unwrap();
        let t = TextTokenizer::from_path(d.path()).unwrap();
        let want: Vec<Vec<u32>> = serde_json::from_value(want["ids"].clone()).unwrap();
        for ((text, want), raw) in texts.iter().zip(&want).zip(&raw) {
            assert_eq!(&t.encode(text).unwrap(), want, "{case}: {text:?}");
            differs += usize::from(want != raw);
        }
    }
    assert!(differs > 0, "the cases do tell the class from the file");
    std::fs::write(
        d.path().join("tokenizer_config.json"),
        r#"{"tokenizer_class": "GPT2Tokenizer"}"#,
    )
    .unwrap();
    let e = TextTokenizer::from_path(d.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer_class `GPT2Tokenizer`"), "{e}");
}
