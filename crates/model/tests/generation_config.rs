//! `generation_config.json` files as transformers' `generate()` reads them
//! (`tests/golden/generation/make_expected.py` wrote what transformers takes from each, its own
//! defaults filled in): a Llama 2 chat and a Llama 3 instruct model's files, and the one
//! `save_pretrained` derives from a model config.

use std::path::Path;

use model::generation_config::GenerationConfig;

#[test]
fn generation_configs_read_as_transformers_reads_them() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/generation");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(here.join("expected.json")).unwrap())
            .unwrap();
    let mut seen = 0;
    for (name, w) in want.as_object().unwrap() {
        if name == "transformers" {
            continue;
        }
        let path = here.join(name);
        let g =
            GenerationConfig::from_json(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
        assert_eq!(g.do_sample, w["do_sample"].as_bool().unwrap(), "{name}");
        assert_eq!(g.temperature, w["temperature"].as_f64().unwrap(), "{name}");
        assert_eq!(g.top_k as u64, w["top_k"].as_u64().unwrap(), "{name}");
        assert_eq!(g.top_p, w["top_p"].as_f64().unwrap(), "{name}");
        let eos: Option<Vec<u32>> = serde_json::from_value(w["eos"].clone()).unwrap();
        assert_eq!(g.eos, eos, "{name}");
        let n = |k: &str| w[k].as_u64().map(|v| v as usize);
        assert_eq!(g.max_new_tokens, n("max_new_tokens"), "{name}");
        assert_eq!(g.max_length, n("max_length"), "{name}");
        seen += 1;
    }
    assert_eq!(seen, 3);
}
