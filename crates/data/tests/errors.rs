//! Bad data gets a clear error naming the file and the line.

use data::{DataError, Dataset};

fn load(content: &str) -> Result<Dataset, DataError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    std::fs::write(&path, content).unwrap();
    Dataset::load(&path, 50, 8)
}

#[test]
fn faults_name_file_and_line() {
    let e = load("{\"input_ids\": [1, 2]}\n{oops\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("d.jsonl:2: malformed JSON"), "{e}");
    let e = load("{\"input_ids\": [1, 2.5]}\n").unwrap_err().to_string();
    assert!(
        e.contains("d.jsonl:1: input_ids[1] = 2.5 is not a non-negative integer"),
        "{e}"
    );
    let e = load("{\"input_ids\": [1, 2]}\n\n{\"input_ids\": [1, 50]}\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("d.jsonl:3: input_ids[1] = 50 is outside the vocabulary of 50"),
        "{e}"
    );
    let e = load("{\"text\": \"abc\"}\n").unwrap_err().to_string();
    assert!(
        e.contains("byte-tokenized (256 ids) but the model's vocabulary is 50"),
        "{e}"
    );
    let e = load("{\"tokens\": [1]}\n").unwrap_err().to_string();
    assert!(e.contains("neither \"input_ids\" nor \"text\""), "{e}");
    let e = load("{\"input_ids\": [1]}\n").unwrap_err().to_string();
    assert!(
        e.contains("no sequence of at least 2 tokens (1 too short)"),
        "{e}"
    );
}

#[test]
fn long_documents_are_cut_and_shuffling_is_reproducible() {
    let ds = load("{\"input_ids\": [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17]}\n").unwrap();
    assert_eq!(
        ds.sequences().iter().map(|s| s.len()).collect::<Vec<_>>(),
        vec![8, 8]
    );
    assert_eq!(ds.skipped(), 1);
    let many: String = (0..20)
        .map(|i| format!("{{\"input_ids\": [{i}, {i}]}}\n"))
        .collect();
    let ds = load(&many).unwrap();
    let a = ds.batch(3, 5, Some(7));
    assert_eq!(a, ds.batch(3, 5, Some(7)));
    assert_ne!(a, ds.batch(3, 5, Some(8)));
    assert_ne!(a, ds.batch(3, 5, None));
    // One pass of a shuffled order visits every record once.
    let mut seen: Vec<u32> = (0..4)
        .flat_map(|s| ds.batch(s, 5, Some(7)))
        .map(|s| s[0])
        .collect();
    seen.sort();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
}

#[test]
fn a_directory_of_text_files_is_one_document_each() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b.txt"), "xyz").unwrap();
    std::fs::write(dir.path().join("a.md"), "hello").unwrap();
    let ds = Dataset::load(dir.path(), 256, 100).unwrap();
    assert_eq!(
        ds.sequences(),
        &[data::byte_tokens("hello"), data::byte_tokens("xyz")]
    );
}

#[test]
fn an_hf_tokenizer_json_tokenizes_text_records() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tokenizer.json");
    std::fs::write(
        &tok,
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2, "again": 3},
                      "unk_token": "[UNK]"}}"#,
    )
    .unwrap();
    let t = data::TextTokenizer::from_path(&tok).unwrap();
    assert_eq!(t.vocab_size(), 4);
    let path = dir.path().join("d.jsonl");
    std::fs::write(&path, "{\"text\": \"hello world again foo\"}\n").unwrap();
    let ds = Dataset::load_with(&path, 4, 100, &t).unwrap();
    assert_eq!(ds.sequences(), &[vec![1, 2, 3, 0]]);
    let e = Dataset::load_with(&path, 3, 100, &t)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("d.jsonl:1: token id 3 of the tokenizer is outside the model's vocabulary of 3"),
        "{e}"
    );
    std::fs::write(&tok, "{not a tokenizer").unwrap();
    let e = data::TextTokenizer::from_path(&tok)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("not a usable tokenizer.json"),
        "{e}"
    );
}

/// A JSONL file as a Windows editor saves it (a byte-order mark, CRLF line ends) reads as the
/// same records.
#[test]
fn a_byte_order_mark_and_crlf_line_ends_read_as_the_same_records() {
    let plain = load("{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [4, 5]}\n").unwrap();
    let windows =
        load("\u{feff}{\"input_ids\": [1, 2, 3]}\r\n{\"input_ids\": [4, 5]}\r\n").unwrap();
    assert_eq!(windows.sequences(), plain.sequences());
}

/// A compressed file is named as such, and a record that is not an object is refused as one,
/// where the reader would otherwise say "not UTF-8" or "neither input_ids nor text".
#[test]
fn compressed_files_and_records_that_are_not_objects_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let gz = dir.path().join("d.jsonl.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0]).unwrap();
    let e = Dataset::load(&gz, 50, 8).unwrap_err().to_string();
    assert!(
        e.contains("d.jsonl.gz: not a valid JSON Lines file: it is gzip-compressed"),
        "{e}"
    );
    let e = load("{\"input_ids\": [1, 2]}\n[1, 2, 3]\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("d.jsonl:2: a record must be a JSON object"),
        "{e}"
    );
    let e = load("[{\"input_ids\": [1, 2]}, {\"input_ids\": [3, 70]}]")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("d.jsonl:1: record 2 of the array: input_ids[1] = 70 is outside"),
        "{e}"
    );
}

/// A `--data` folder is text files, one document each: a JSONL (or Parquet, …) file in it is
/// refused rather than trained as text, and hidden files are not documents.
#[test]
fn a_folder_refuses_record_files_and_skips_hidden_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), "hello there").unwrap();
    std::fs::write(dir.path().join(".DS_Store"), [0u8, 1, 2, 3]).unwrap();
    let d = Dataset::load(dir.path(), 256, 64).unwrap();
    assert_eq!(d.sequences(), &[data::byte_tokens("hello there")]);
    std::fs::write(dir.path().join("train.jsonl"), "{\"input_ids\": [1, 2]}\n").unwrap();
    let e = Dataset::load(dir.path(), 256, 64).unwrap_err().to_string();
    assert!(
        e.contains("train.jsonl: not a valid text document: a --data folder is read as text files"),
        "{e}"
    );
}
