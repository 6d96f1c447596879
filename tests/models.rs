//! Model loading and the f64 CPU reference forward against transformers' outputs
//! (tests/fixtures/gen_models.py), for tiny random LLaMA and GPT-2 folders and for the real
//! SmolLM2 GGUF when scripts/fetch-assets has fetched it.

mod common;

use common::smollm2_path;
use common::{fixture, ids_of, json};

use portalora::model::{load_model, ModelError};
use portalora::reference::model::{forward, loss};

fn rel_err(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(1e-12)
}

fn check_tiny(name: &str) {
    let dir = fixture(name);
    let w = load_model(&dir).unwrap();
    let e = json(&dir.join("expected.json"));
    let ids = ids_of(&e["input_ids"]);
    let (l, n) = loss(&w, &ids).unwrap();
    assert_eq!(n, ids.len() * (ids[0].len() - 1));
    let want = e["loss"].as_f64().unwrap();
    assert!(rel_err(l, want) <= 1e-4, "{name}: loss {l} vs transformers {want}");
    let logits = forward(&w, &ids).unwrap();
    for row in e["logits_rows"].as_array().unwrap() {
        let (b, t) = (row["batch"].as_u64().unwrap() as usize, row["pos"].as_u64().unwrap() as usize);
        let want: Vec<f64> = row["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let err = logits[b][t].iter().zip(&want).fold(0.0f64, |m, (g, w)| m.max((g - w).abs() / scale));
        assert!(err <= 1e-4, "{name}: logits[{b}][{t}] relative error {err:e}");
    }
}

#[test]
fn tiny_llama_matches_transformers() {
    check_tiny("tiny_llama");
}

#[test]
fn tiny_gpt2_matches_transformers() {
    check_tiny("tiny_gpt2");
}

#[test]
fn config_and_weights_that_disagree_are_refused() {
    let tmp = std::env::temp_dir().join(format!("portalora-models-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let src = fixture("tiny_llama");
    std::fs::copy(src.join("model.safetensors"), tmp.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 37", "\"intermediate_size\": 40");
    std::fs::write(tmp.join("config.json"), cfg).unwrap();
    let e = load_model(&tmp).unwrap_err();
    assert!(matches!(e, ModelError::Shape { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("gate_proj") && msg.contains("[37, 30]") && msg.contains("[40, 30]"), "{msg}");
    let e = load_model(tmp.join("nope.gguf")).unwrap_err();
    assert!(e.to_string().contains("nope.gguf"), "{e}");
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let Some(path) = smollm2_path() else { return };
    let w = load_model(&path).unwrap();
    let e = json(&fixture("smollm2_expected.json"));
    let prompt: Vec<u32> = e["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let logits = forward(&w, std::slice::from_ref(&prompt)).unwrap();
    let last = &logits[0][prompt.len() - 1];
    let head: Vec<f64> = e["last_logits_head"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let scale = head.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = last.iter().zip(&head).fold(0.0f64, |m, (g, w)| m.max((g - w).abs() / scale));
    assert!(err <= 1e-4, "last-position logits relative error {err:e}");
    for t in e["last_logits_top"].as_array().unwrap() {
        let (id, want) = (t["id"].as_u64().unwrap() as usize, t["logit"].as_f64().unwrap());
        assert!((last[id] - want).abs() <= 1e-4 * want.abs().max(1.0), "logit {id}: {} vs {want}", last[id]);
    }
    // Greedy: the top logit is the first token of transformers' continuation (" Paris").
    let argmax = last.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
    assert_eq!(argmax as u64, e["greedy_continuation_ids"][0].as_u64().unwrap());
    let (l, _) = loss(&w, std::slice::from_ref(&prompt)).unwrap();
    let want = e["loss"].as_f64().unwrap();
    assert!(rel_err(l, want) <= 1e-4, "loss {l} vs transformers {want}");
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    use portalora::io::{gguf::Gguf, tokenizer::Tokenizer};
    let Some(path) = smollm2_path() else { return };
    let tok = Tokenizer::from_gguf(&Gguf::open(&path).unwrap()).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!((tok.bos_id, tok.eos_id), (Some(1), Some(2)));
    let e = json(&fixture("smollm2_expected.json"));
    for case in e["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "ids of {text:?}");
        assert_eq!(tok.decode(&got).unwrap(), text, "round trip of {text:?}");
    }
    let cont: Vec<u32> =
        e["greedy_continuation_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(tok.decode(&cont).unwrap(), e["greedy_continuation"].as_str().unwrap());
    // Special tokens are matched whole.
    let ids = tok.encode("<|im_start|>user").unwrap();
    assert_eq!(tok.decode(&ids[..1]).unwrap(), "<|im_start|>");
    // What a reader sees (generate without --special, samples) leaves them out.
    assert_eq!(tok.decode_text(&ids).unwrap(), "user");
    assert!(tok.decode(&[49152]).unwrap_err().to_string().contains("49152"));
}

#[test]
fn gpt2_tokenizer_matches_the_reference_encoder() {
    use portalora::io::tokenizer::Tokenizer;
    let Some(dir) = common::gpt2_tokenizer_dir() else { return };
    let tok = Tokenizer::for_model(&dir).unwrap();
    assert_eq!(tok.vocab_size(), 50257);
    assert_eq!(tok.eos_id, Some(50256));
    let cases: serde_json::Value = json(&fixture("gpt2_tokenizer_expected.json"));
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text).unwrap();
        if text.starts_with("<|endoftext|>") {
            // The reference encoder splits the separator into characters; transformers (and we)
            // keep it whole as the special token 50256.
            assert_eq!(got[0], 50256, "{text:?}");
            assert_eq!(got[1..], want[want.len() - (got.len() - 1)..], "{text:?}");
        } else {
            assert_eq!(got, want, "ids of {text:?}");
        }
        assert_eq!(tok.decode(&got).unwrap(), text);
    }
}

#[test]
fn sharded_safetensors_folders_load() {
    use safetensors::tensor::{serialize, TensorView};
    use safetensors::Dtype;
    let src = fixture("tiny_llama");
    let w = load_model(&src).unwrap();
    let dir = std::env::temp_dir().join(format!("portalora-sharded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    // Two shards with half the tensors each, and the index that maps names to shards.
    let names: Vec<&String> = w.tensors.keys().collect();
    let mut map = serde_json::Map::new();
    let bytes: Vec<Vec<u8>> =
        names.iter().map(|n| w.tensors[*n].data.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    for (shard, range) in [(0, 0..names.len() / 2), (1, names.len() / 2..names.len())] {
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        let views: Vec<(String, TensorView)> = range
            .map(|i| {
                map.insert(names[i].clone(), serde_json::Value::String(file.clone()));
                (names[i].clone(), TensorView::new(Dtype::F32, w.tensors[names[i]].shape.clone(), &bytes[i]).unwrap())
            })
            .collect();
        std::fs::write(dir.join(&file), serialize(views, None).unwrap()).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = load_model(&dir).unwrap();
    assert_eq!(sharded.tensors, w.tensors);
    // A missing shard is named in the error.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_model(&dir).unwrap_err();
    assert!(e.to_string().contains("model-00002-of-00002.safetensors"), "{e}");
}

/// Browsers hand files over as bytes: the byte loaders give exactly what the path loaders give.
#[test]
fn models_load_from_bytes_as_from_files() {
    use portalora::model::weights::{load_gguf_bytes, load_safetensors_bytes};
    for name in ["tiny_gpt2", "tiny_llama"] {
        let dir = fixture(name);
        let from_dir = load_model(&dir).unwrap();
        let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let st = std::fs::read(dir.join("model.safetensors")).unwrap();
        let from_bytes = load_safetensors_bytes(name, &config, &[&st]).unwrap();
        assert_eq!(from_bytes.config, from_dir.config);
        assert_eq!(from_bytes.tensors, from_dir.tensors, "{name}");
    }
    if let Some(path) = common::smollm2_path() {
        let from_file = load_model(&path).unwrap();
        let from_bytes = load_gguf_bytes("smollm2.gguf", std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(from_bytes.config, from_file.config);
        assert_eq!(from_bytes.tensors, from_file.tensors);
    }
    let err = load_gguf_bytes("upload.gguf", b"GGUF\x09\0\0\0".to_vec()).unwrap_err().to_string();
    assert!(err.contains("upload.gguf"), "{err}");
}
