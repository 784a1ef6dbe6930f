//! The data parsers (JSONL records, text files) on arbitrary and mutated bytes: never a panic,
//! every error naming the file. Cases: `HOTSPA_FUZZ_CASES` (default 256).

use data::Dataset;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("HOTSPA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

const GOOD: &str =
    "{\"input_ids\": [1, 2, 3, 4]}\n{\"text\": \"hello world\"}\n\n{\"input_ids\": [5]}\n";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn jsonl_bytes_are_read_or_refused(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        max_len in 0usize..40,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, &bytes).unwrap();
        match Dataset::load(&path, 256, max_len) {
            Ok(d) => prop_assert!(d.sequences().iter().all(|s| s.len() >= 2 && s.iter().all(|&t| t < 256))),
            Err(e) => prop_assert!(e.to_string().contains("d.jsonl"), "{}", e),
        }
    }

    #[test]
    fn mutated_jsonl_is_read_or_refused(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        vocab in 1usize..300,
    ) {
        let mut bytes = GOOD.as_bytes().to_vec();
        let n = bytes.len();
        for (at, b) in flips {
            bytes[at % n] = b;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, &bytes).unwrap();
        match Dataset::load(&path, vocab, 16) {
            Ok(d) => prop_assert!(d.sequences().iter().flatten().all(|&t| (t as usize) < vocab)),
            Err(e) => prop_assert!(e.to_string().contains("d.jsonl"), "{}", e),
        }
    }

    #[test]
    fn text_files_of_any_bytes_are_documents(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), &bytes).unwrap();
        match Dataset::load(dir.path(), 256, 64) {
            Ok(d) => {
                let tokens: usize = d.sequences().iter().map(Vec::len).sum();
                prop_assert!(tokens <= bytes.len() && d.sequences().iter().all(|s| s.len() >= 2));
            }
            Err(e) => prop_assert!(e.to_string().contains("no sequence"), "{}", e),
        }
    }
}
