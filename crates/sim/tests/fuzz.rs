//! Cluster files (TOML) on mutated text: never a panic; a file that is accepted has only
//! finite, in-range numbers (so no plan or simulation prints a negative or NaN time).
//! Cases: `HOTSPA_FUZZ_CASES` (default 256).

use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("HOTSPA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn good() -> String {
    toml::to_string(&sim::presets::cluster("a800x32").unwrap()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn mutated_cluster_files_are_read_or_refused(
        edits in proptest::collection::vec((any::<usize>(), prop_oneof![
            Just("-".to_string()), Just("nan".to_string()), Just("inf".to_string()),
            Just("0".to_string()), Just("1e308".to_string()), "[ -~]{0,3}"
        ]), 0..4),
    ) {
        let mut text = good();
        for (at, s) in edits {
            let at = at % (text.len() + 1);
            let at = (0..=at).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            text.insert_str(at, &s);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        match sim::presets::cluster_or_file(path.to_str().unwrap()) {
            Ok(c) => prop_assert!(c.validate().is_ok()),
            Err(e) => prop_assert!(e.to_string().contains("c.toml"), "{}", e),
        }
    }
}
