//! Bad data gets a clear error naming the file and the line.

use data::{DataError, Dataset};

fn load(content: &str) -> Result<Dataset, DataError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    std::fs::write(&path, content).unwrap();
    Dataset::load(&path, 50, 8)
}

/// `d.jsonl` holding `content` is refused with `says` in the message.
fn refused(content: &str, says: &str) {
    match load(content) {
        Ok(_) => panic!("{content:?} was accepted"),
        Err(e) => assert!(e.to_string().contains(says), "{e}"),
    }
}

/// What loading `path` (vocabulary `vocab`, sequences up to `max_len`) fails with.
fn load_error(path: &std::path::Path, vocab: usize, max_len: usize) -> String {
    match Dataset::load(path, vocab, max_len) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn faults_name_file_and_line() {
    refused(
        "{\"input_ids\": [1, 2]}\n{oops\n",
        "d.jsonl:2: malformed JSON",
    );
    refused(
        "{\"input_ids\": [1, 2.5]}\n",
        "d.jsonl:1: input_ids[1] = 2.5 is not a non-negative integer",
    );
    refused(
        "{\"input_ids\": [1, 2]}\n\n{\"input_ids\": [1, 50]}\n",
        "d.jsonl:3: input_ids[1] = 50 is outside the vocabulary of 50",
    );
    refused(
        "{\"text\": \"abc\"}\n",
        "byte-tokenized (256 ids) but the model's vocabulary is 50",
    );
    refused("{\"tokens\": [1]}\n", "neither \"input_ids\" nor \"text\"");
    refused(
        "{\"input_ids\": [1]}\n",
        "no sequence of at least 2 tokens (1 too short)",
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
    for (name, text) in [("b.txt", "xyz"), ("a.md", "hello")] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
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
    match data::TextTokenizer::from_path(&tok) {
        Ok(_) => panic!("a broken tokenizer.json was read"),
        Err(e) => assert!(
            e.to_string()
                .contains("tokenizer.json: tokenizer: not a usable tokenizer.json"),
            "{e}"
        ),
    }
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
    let e = load_error(&gz, 50, 8);
    assert!(
        e.contains("d.jsonl.gz: not a valid JSON Lines file: it is gzip-compressed"),
        "{e}"
    );
    refused(
        "{\"input_ids\": [1, 2]}\n[1, 2, 3]\n",
        "d.jsonl:2: a record must be a JSON object",
    );
    refused(
        "[{\"input_ids\": [1, 2]}, {\"input_ids\": [3, 70]}]",
        "d.jsonl:1: record 2 of the array: input_ids[1] = 70 is outside",
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
    let e = load_error(dir.path(), 256, 64);
    assert!(
        e.contains("train.jsonl: not a valid text document: a --data folder is read as text files"),
        "{e}"
    );
}
