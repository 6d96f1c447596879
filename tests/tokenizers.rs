//! Tokenizer ids against their references (tests/fixtures/gen_tokenizers.py): for each
//! pre-tokenizer a GGUF can name, the ids of the GGUF's tokenizer equal transformers' on the
//! model's own tokenizer.json and llama.cpp's on the same file (`default` has only llama.cpp);
//! for a Llama-2-style SentencePiece GGUF, transformers' reading of that GGUF and llama.cpp's.

mod common;

use common::{fixture, json};
use portalora::io::gguf::Gguf;
use portalora::io::tokenizer::Tokenizer;

const KINDS: [&str; 6] = ["gpt-2", "smollm", "llama-bpe", "qwen2", "default", "spm"];

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect())
        .collect()
}

fn flat(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()
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
                    // llama.cpp does not normalise Qwen's text to NFC as transformers does, and
                    // gives a SentencePiece text its space prefix also before leading spaces and
                    // after special tokens, which transformers does not.
                    let nfc = kind == "qwen2" && t.contains('\u{301}');
                    let spm_prefix = kind == "spm" && (t.starts_with(' ') || t.contains("<|"));
                    if !(nfc || spm_prefix) {
                        assert_eq!(got[i], llama_cpp[i], "{kind}: llama.cpp's ids for {t:?}");
                    }
                }
                // The same tokenizer from its tokenizer.json (a Hugging Face folder's).
                let json_file = fixture(&format!("tokenizers/{kind}.json"));
                if kind != "spm" {
                    let hf = Tokenizer::from_json_file(&json_file).unwrap();
                    let from_json: Vec<Vec<u32>> = texts.iter().map(|t| hf.encode(t).unwrap()).collect();
                    assert_eq!(from_json, want, "{kind}: tokenizer.json");
                }
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

/// Gemma-3-270M's SentencePiece vocabulary (from scripts/fetch-assets): ids with BOS as
/// transformers and llama.cpp give them for the same GGUF (tests/fixtures/gen_gemma3_270m.py).
#[test]
fn gemma3_270m_sentencepiece_tokenizer_matches_transformers_and_llama_cpp() {
    let Some(path) = common::gemma3_path() else { return };
    let t0 = std::time::Instant::now();
    let tok = Tokenizer::for_model(&path).unwrap();
    eprintln!("built Gemma's tokenizer in {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!((tok.vocab_size(), tok.bos_id, tok.eos_id, tok.add_bos), (262_144, Some(2), Some(1), true));
    let e = json(&fixture("gemma3_270m_expected.json"));
    for (i, case) in e["tokenizer"].as_array().unwrap().iter().enumerate() {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode_text(text).unwrap();
        assert_eq!(got, flat(&case["ids"]), "transformers' ids of {text:?}");
        assert_eq!(got, flat(&e["llama_cpp_ids"][i]), "llama.cpp's ids of {text:?}");
        // Decoding gives the text back; BOS and the turn markers are special (left out for readers).
        assert_eq!(tok.decode(&got[1..]).unwrap(), text, "round trip of {text:?}");
    }
    let turn = tok.encode("<start_of_turn>user").unwrap();
    assert_eq!((turn.len(), tok.decode_text(&turn).unwrap().as_str()), (2, "user"));
}

/// A Hugging Face folder's end of sequence is the one its tokenizer_config.json names (a string
/// or an AddedToken object), as transformers reads it; without one, the guessed `<|endoftext|>`.
#[test]
fn a_folders_eos_token_is_the_one_its_tokenizer_config_names() {
    let dir = common::tmp("eos-token");
    std::fs::copy(fixture("tiny_gpt2/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let guessed = Tokenizer::for_model(&dir).unwrap();
    assert_eq!(guessed.eos_id, Some(66), "<|endoftext|>");
    for config in [r#"{"eos_token": "b"}"#, r#"{"eos_token": {"content": "b", "special": true}}"#] {
        std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
        let named = Tokenizer::for_model(&dir).unwrap();
        assert_eq!(named.eos_id, Some(4), "{config}");
        assert_eq!(named.special_texts.1.as_deref(), Some("b"));
    }
    // A name the vocabulary lacks leaves the guess.
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<|eot_id|>"}"#).unwrap();
    assert_eq!(Tokenizer::for_model(&dir).unwrap().eos_id, Some(66));
    std::fs::remove_dir_all(&dir).unwrap();
}
