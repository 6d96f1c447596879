//! Tokenizer ids against their references (tests/fixtures/gen_tokenizers.py): for each
//! pre-tokenizer a GGUF can name, the ids of the GGUF's tokenizer equal transformers' on the
//! model's own tokenizer.json and llama.cpp's on the same file (`default` has only llama.cpp).

mod common;

use common::{fixture, json};
use portalora::io::gguf::Gguf;
use portalora::io::tokenizer::Tokenizer;

const KINDS: [&str; 5] = ["gpt-2", "smollm", "llama-bpe", "qwen2", "default"];

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect())
        .collect()
}

#[test]
fn gguf_tokenizers_split_text_as_their_pre_tokenizer_names() {
    let e = json(&fixture("tokenizers/expected.json"));
    let texts: Vec<&str> = e["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    for kind in KINDS {
        let tok = Tokenizer::for_model(&fixture(&format!("tokenizers/{kind}.gguf"))).unwrap();
        let got: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
        let llama_cpp = ids(&e["llama.cpp"][kind]);
        match e["transformers"].get(kind) {
            Some(want) => {
                let want = ids(want);
                for (i, t) in texts.iter().enumerate() {
                    assert_eq!(got[i], want[i], "{kind}: transformers' ids for {t:?}");
                    // llama.cpp does not normalise Qwen's text to NFC as transformers does.
                    if !(kind == "qwen2" && t.contains('\u{301}')) {
                        assert_eq!(got[i], llama_cpp[i], "{kind}: llama.cpp's ids for {t:?}");
                    }
                }
                // The same tokenizer from its tokenizer.json (a Hugging Face folder's).
                let hf = Tokenizer::from_json_file(&fixture(&format!("tokenizers/{kind}.json"))).unwrap();
                let from_json: Vec<Vec<u32>> = texts.iter().map(|t| hf.encode(t).unwrap()).collect();
                assert_eq!(from_json, want, "{kind}: tokenizer.json");
            }
            None => assert_eq!(got, llama_cpp, "{kind}: llama.cpp's ids"),
        }
        // Decoding gives the text back (NFC for Qwen).
        let round = tok.decode(&got[0]).unwrap();
        assert_eq!(round, texts[0], "{kind}: decode");
    }
}

#[test]
fn an_unknown_pre_tokenizer_is_refused_by_name() {
    let mut g = Gguf::open(fixture("tokenizers/gpt-2.gguf")).unwrap();
    g.metadata.insert("tokenizer.ggml.pre".into(), portalora::io::gguf::Value::String("deepseek-llm".into()));
    let err = Tokenizer::from_gguf(&g).unwrap_err().to_string();
    assert!(err.contains("\"deepseek-llm\"") && err.contains("gpt-2.gguf"), "{err}");
}
