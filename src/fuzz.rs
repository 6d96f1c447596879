//! The parsers of untrusted files, as fuzzing entry points: each takes arbitrary bytes and must
//! return (an error is fine) without panicking, hanging or allocating more than the input
//! justifies. `fuzz/` holds `cargo fuzz` targets that call these, with a seed corpus in
//! `fuzz/corpus/<target>/`; `tests/fuzz_corpus.rs` replays that corpus and thousands of seeded
//! mutations of it on every test run (no nightly toolchain needed).

use std::collections::BTreeMap;
use std::path::Path;

use crate::adapter::{peft::PeftFile, AdapterConfig, Method};
use crate::io::gguf::Gguf;
use crate::io::tokenizer::Tokenizer;
use crate::model::weights::{read_safetensors_bytes, weights_from_gguf};

/// A safetensors file: header, dtypes, shapes, offsets, data.
pub fn safetensors_header(data: &[u8]) {
    let mut out = BTreeMap::new();
    let _ = read_safetensors_bytes(Path::new("fuzz.safetensors"), data, &mut out);
}

/// A GGUF file: header, metadata, tensor infos, every tensor's data, the model config and
/// tokenizer built from it.
pub fn gguf(data: &[u8]) {
    let Ok(g) = Gguf::from_bytes("fuzz.gguf", data.to_vec()) else { return };
    for t in &g.tensors {
        let _ = g.tensor_f32(&t.name);
    }
    let _ = weights_from_gguf(&g);
    let _ = Tokenizer::from_gguf(&g);
}

/// A PEFT adapter: `adapter_config.json`'s text, a NUL byte, then `adapter_model.safetensors`
/// (input without a NUL: all config). Parsed and turned into an adapter configuration.
pub fn adapter_config(data: &[u8]) {
    let (text, st) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(text);
    let Ok(f) = PeftFile::from_bytes(Path::new("fuzz-adapter"), &text, st) else { return };
    for m in [Method::Lora, Method::Vera, Method::LoraFa] {
        let _ = f.adapter_config(m, &AdapterConfig::new(m));
    }
}
