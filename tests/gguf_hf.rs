//! `portalora export --as merged` from a Hugging Face folder: the GGUF it writes against the one
//! `tests/fixtures/gen_families.py` wrote with the `gguf` package as llama.cpp's converter lays
//! the same model out (every `{arch}.*` key, every tensor's name, shape and values, merged
//! weights included), the loss of PEFT's merged model, the tokenizer's keys against the
//! tokenizer fixtures' GGUFs (tokens, types, merges, pre-tokenizer), and the refusals: a model
//! llama.cpp would run differently, a folder without a byte-level BPE tokenizer.

mod common;

use std::path::{Path, PathBuf};

use common::{bin, fixture, json, tmp};
use portalora::io::gguf::{Gguf, Value};
use serde_json::json;

fn export(args: &[&str]) -> (bool, String) {
    let out = bin().arg("export").args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A byte-level BPE `tokenizer.json` (Qwen2's pre-tokenizer) of `vocab` ids: normal tokens, a
/// special one, one not special, and the last id left out (the converter pads it).
fn fake_tokenizer(dir: &Path, vocab: usize) {
    let normal = vocab - 3;
    let tokens: serde_json::Map<String, serde_json::Value> = (0..normal).map(|i| (format!("t{i}"), json!(i))).collect();
    let added = json!([
        {"id": normal, "content": "<|endoftext|>", "special": true, "normalized": false},
        {"id": normal + 1, "content": "<think>", "special": false, "normalized": false},
    ]);
    let pre = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]});
    let tok = json!({"version": "1.0", "added_tokens": added, "normalizer": {"type": "NFC"}, "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": tokens, "merges": [["t1", "t2"], "t3 t4"]}});
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let config = json!({"eos_token": "<|endoftext|>", "chat_template": "{% for m in messages %}{{ m.content }}<|endoftext|>{% endfor %}"});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

/// A copy of the fixture folder `tiny_<family>` with a tokenizer.
fn folder(family: &str, under: &Path) -> PathBuf {
    let dir = under.join(family);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(&format!("tiny_{family}/{f}")), dir.join(f)).unwrap();
    }
    let vocab = json(&dir.join("config.json"))["vocab_size"].as_u64().unwrap() as usize;
    fake_tokenizer(&dir, vocab);
    dir
}

fn strings(g: &Gguf, key: &str) -> Vec<String> {
    match g.metadata.get(key) {
        Some(Value::Array(a)) => a.iter().map(|v| v.as_str().unwrap().to_string()).collect(),
        other => panic!("{}: {key} is {other:?}", g.path.display()),
    }
}

fn ints(g: &Gguf, key: &str) -> Vec<u64> {
    match g.metadata.get(key) {
        Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().unwrap()).collect(),
        other => panic!("{}: {key} is {other:?}", g.path.display()),
    }
}

#[test]
fn a_folder_exports_merged_as_llama_cpps_converter_lays_it_out() {
    let dir = tmp("gguf-hf");
    for family in ["llama3", "qwen2", "qwen3"] {
        let model = folder(family, &dir);
        let adapter = fixture(&format!("gguf_export/{family}/adapter"));
        let base = fixture(&format!("tiny_{family}.gguf"));
        let (ours, theirs) = (dir.join(format!("{family}-hf.gguf")), dir.join(format!("{family}-gguf.gguf")));
        for (m, out) in [(&model, &ours), (&base, &theirs)] {
            let (ok, text) = export(&["--model", s(m), "--adapter", s(&adapter), "--out", s(out), "--as", "merged"]);
            assert!(ok, "{family}: {text}");
        }
        let (a, b) = (Gguf::open(&ours).unwrap(), Gguf::open(&theirs).unwrap());
        let arch = b.metadata["general.architecture"].as_str().unwrap().to_string();
        assert_eq!(a.metadata["general.architecture"], b.metadata["general.architecture"]);
        let keys = |g: &Gguf| -> Vec<(String, Value)> {
            g.metadata
                .iter()
                .filter(|(k, _)| k.starts_with(&format!("{arch}.")))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        assert_eq!(keys(&a), keys(&b), "{family}: the {arch}.* keys");
        let names = |g: &Gguf| -> Vec<String> {
            let mut n: Vec<String> = g.tensors.iter().map(|t| t.name.clone()).collect();
            n.sort();
            n
        };
        assert_eq!(names(&a), names(&b), "{family}: tensor names");
        for t in &b.tensors {
            let mine = a.tensor(&t.name).unwrap();
            assert_eq!(mine.shape, t.shape, "{family}: {}", t.name);
            assert_eq!(a.tensor_f32(&t.name).unwrap(), b.tensor_f32(&t.name).unwrap(), "{family}: {} values", t.name);
        }
        // The tokenizer, as the converter reads tokenizer.json and tokenizer_config.json.
        let vocab = json(&model.join("config.json"))["vocab_size"].as_u64().unwrap() as usize;
        let n = vocab - 3;
        let mut want: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
        want.extend(["<|endoftext|>".into(), "<think>".into(), format!("[PAD{}]", vocab - 1)]);
        assert_eq!(strings(&a, "tokenizer.ggml.tokens"), want);
        let mut types = vec![1; n];
        types.extend([3, 4, 5]);
        assert_eq!(ints(&a, "tokenizer.ggml.token_type"), types);
        assert_eq!(strings(&a, "tokenizer.ggml.merges"), ["t1 t2", "t3 t4"]);
        assert_eq!(a.metadata["tokenizer.ggml.pre"].as_str(), Some("qwen2"));
        assert_eq!(a.metadata["tokenizer.ggml.eos_token_id"].as_u64(), Some(n as u64));
        assert!(a.metadata["tokenizer.chat_template"].as_str().unwrap().contains("m.content"));
    }
}

#[test]
fn a_folder_merged_gives_the_loss_of_pefts_merged_model() {
    let Some(ctx) = common::context() else { return };
    let dir = tmp("gguf-hf-loss");
    for family in ["llama3", "qwen2", "qwen3"] {
        let model = folder(family, &dir);
        let adapter = fixture(&format!("gguf_export/{family}/adapter"));
        let e = json(&fixture(&format!("gguf_export/{family}/expected.json")));
        let ids = common::ids_of(&e["input_ids"]);
        let want = e["merged_loss"].as_f64().unwrap();
        for (ty, tol) in [("f32", 1e-4), ("f16", 1e-3)] {
            let out = dir.join(format!("{family}-{ty}.gguf"));
            let args =
                ["--model", s(&model), "--adapter", s(&adapter), "--out", s(&out), "--as", "merged", "--type", ty];
            let (ok, text) = export(&args);
            assert!(ok, "{family}: {text}");
            let w = portalora::model::load_model(&out).unwrap();
            let m = portalora::model::gpu::GpuModel::new(&ctx, &w, ids.len(), ids[0].len()).unwrap();
            let (sum, count) = m.loss_sum(&ctx, &ids).unwrap();
            let got = sum / count as f64;
            assert!((got - want).abs() / want < tol, "{family} {ty}: merged loss {got} vs PEFT's {want}");
        }
    }
}

#[test]
fn tokenizer_keys_equal_the_tokenizer_fixtures_ggufs() {
    let dir = tmp("gguf-vocab");
    for kind in ["gpt-2", "smollm", "llama-bpe", "qwen2"] {
        let want = Gguf::open(fixture(&format!("tokenizers/{kind}.gguf"))).unwrap();
        let d = dir.join(kind);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(fixture(&format!("tokenizers/{kind}.json")), d.join("tokenizer.json")).unwrap();
        // gen_tokenizers.py's GGUF: BOS and EOS <|endoftext|>, BOS not added.
        let config = json!({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": false});
        std::fs::write(d.join("tokenizer_config.json"), config.to_string()).unwrap();
        let n = strings(&want, "tokenizer.ggml.tokens").len();
        let got = portalora::io::gguf_vocab::vocab_metadata(&d, n, "llama").unwrap();
        let got: std::collections::BTreeMap<String, Value> = got.into_iter().collect();
        for key in [
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token",
        ] {
            let (g, w) = (&got[key], &want.metadata[key]);
            // gguf-py writes token types as i32 arrays; compare values, not integer widths.
            let same = match (g, w) {
                (Value::Array(x), Value::Array(y)) if key.ends_with("token_type") => {
                    x.iter().map(|v| v.as_u64()).eq(y.iter().map(|v| v.as_u64()))
                }
                _ => g == w,
            };
            assert!(same, "{kind}: {key}");
        }
    }
}

#[test]
fn a_folder_llama_cpp_would_run_otherwise_or_cannot_tokenize_is_refused() {
    let dir = tmp("gguf-hf-refused");
    let merged = |model: &Path, adapter: &str, out: &str| {
        let adapter = fixture(&format!("gguf_export/{adapter}/adapter"));
        export(&["--model", s(model), "--adapter", s(&adapter), "--out", s(&dir.join(out)), "--as", "merged"])
    };
    // Gemma 3 at a query_pre_attn_scalar other than head_dim: llama.cpp fixes the scale.
    let gemma = folder("gemma3", &dir);
    let (ok, text) = merged(&gemma, "gemma3", "gemma3.gguf");
    assert!(!ok && text.contains("attention scale") && text.contains("no GGUF is written"), "{text}");
    assert!(!dir.join("gemma3.gguf").exists());
    // No tokenizer.json.
    let qwen = folder("qwen2", &dir);
    std::fs::remove_file(qwen.join("tokenizer.json")).unwrap();
    let (ok, text) = merged(&qwen, "qwen2", "q.gguf");
    assert!(!ok && text.contains("no tokenizer.json"), "{text}");
    // A pre-tokenizer llama.cpp has no name for.
    let qwen = folder("qwen2", &dir.join("other"));
    let path = qwen.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("\\\\p{N}|", "\\\\p{N}{1,2}|");
    std::fs::write(&path, text).unwrap();
    let (ok, text) = merged(&qwen, "qwen2", "q.gguf");
    assert!(!ok && text.contains("pre-tokenizer") && text.contains("convert_hf_to_gguf"), "{text}");
}

/// A Gemma 3 folder with a SentencePiece tokenizer.model, merged with a LoRA adapter, against
/// llama.cpp's own converter run on PEFT's merged model (tests/fixtures/gen_gguf_spm.py): every
/// metadata key the converter writes (but the name and size label it guesses from the folder) and
/// every tensor.
#[test]
fn a_sentencepiece_gemma3_folder_exports_what_llama_cpps_converter_writes() {
    let dir = tmp("gguf-hf-spm");
    let out = dir.join("merged.gguf");
    let (base, adapter) = (fixture("gguf_spm/base"), fixture("gguf_spm/adapter"));
    let args = ["--model", s(&base), "--adapter", s(&adapter), "--out", s(&out), "--as", "merged", "--type", "f32"];
    let (ok, text) = export(&args);
    assert!(ok, "{text}");
    let (ours, theirs) = (Gguf::open(&out).unwrap(), Gguf::open(fixture("gguf_spm/expected_merged.gguf")).unwrap());
    for (k, want) in &theirs.metadata {
        if matches!(k.as_str(), "general.name" | "general.size_label") {
            continue;
        }
        let got = ours.metadata.get(k).unwrap_or_else(|| panic!("{k} is missing"));
        assert_eq!(got, want, "{k}");
    }
    let extra: Vec<&String> = ours.metadata.keys().filter(|k| !theirs.metadata.contains_key(*k)).collect();
    assert!(extra.is_empty(), "keys the converter does not write: {extra:?}");
    assert_eq!(ours.tensors.len(), theirs.tensors.len());
    for t in &theirs.tensors {
        let mine = ours.tensor(&t.name).unwrap_or_else(|_| panic!("{} is missing", t.name));
        assert_eq!(mine.shape, t.shape, "{}", t.name);
        let (a, b) = (ours.tensor_f32(&t.name).unwrap(), theirs.tensor_f32(&t.name).unwrap());
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.abs().max(1e-3)).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{}: relative difference {worst:e}", t.name);
    }
}

/// Named chat templates reach the GGUF as gguf-py writes them: a `tokenizer_config.json` list,
/// or `chat_template.jinja` with `additional_chat_templates/*.jinja` beside it.
#[test]
fn named_chat_templates_are_written_as_the_converter_writes_them() {
    let dir = tmp("gguf-vocab-templates");
    let want = |got: &[(String, Value)], key: &str| -> Option<Value> {
        got.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    };
    let text = |t: &str| Some(Value::String(t.into()));
    let list = json!([{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"},
        {"name": "rag-v1", "template": "R"}]);
    let from_config = dir.join("config");
    let from_files = dir.join("files");
    for d in [&from_config, &from_files] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::copy(fixture("tokenizers/qwen2.json"), d.join("tokenizer.json")).unwrap();
    }
    std::fs::write(from_config.join("tokenizer_config.json"), json!({"chat_template": list}).to_string()).unwrap();
    std::fs::write(from_files.join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(from_files.join("chat_template.jinja"), "D").unwrap();
    std::fs::create_dir_all(from_files.join("additional_chat_templates")).unwrap();
    std::fs::write(from_files.join("additional_chat_templates/tool_use.jinja"), "T").unwrap();
    std::fs::write(from_files.join("additional_chat_templates/rag-v1.jinja"), "R").unwrap();
    let n = strings(&Gguf::open(fixture("tokenizers/qwen2.gguf")).unwrap(), "tokenizer.ggml.tokens").len();
    for d in [&from_config, &from_files] {
        let got = portalora::io::gguf_vocab::vocab_metadata(d, n, "qwen2").unwrap();
        assert_eq!(want(&got, "tokenizer.chat_template"), text("D"), "{}", d.display());
        assert_eq!(want(&got, "tokenizer.chat_template.tool_use"), text("T"));
        assert_eq!(want(&got, "tokenizer.chat_template.rag_v1"), text("R"));
        let names = Value::Array(vec![Value::String("rag_v1".into()), Value::String("tool_use".into())]);
        assert_eq!(want(&got, "tokenizer.chat_templates"), Some(names));
    }
    // A chat_template of another kind is refused, naming the file.
    std::fs::write(from_config.join("tokenizer_config.json"), json!({"chat_template": 3}).to_string()).unwrap();
    let e = portalora::io::gguf_vocab::vocab_metadata(&from_config, n, "qwen2").unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json") && e.contains("chat_template is 3"), "{e}");
}
