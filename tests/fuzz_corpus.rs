//! The fuzz targets' seed corpus (fuzz/corpus/<target>/), replayed, plus seeded mutations of each
//! seed (bit flips, stomped length and count fields, truncations, splices): every parser must
//! return without panicking. Runs on the stable toolchain in `make test`; `cargo fuzz` (nightly)
//! explores further from the same corpus.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use portalora::rng::Rng;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no seeds in {}", dir.display());
    v
}

/// One mutation of `seed`, chosen and placed by `rng`.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut x = seed.to_vec();
    // Positions within the current length; mostly the first kilobyte for `head`: headers,
    // lengths and counts live there.
    let pos = |rng: &mut Rng, len: usize| (rng.next_u64() as usize) % len.max(1);
    let head = |rng: &mut Rng, len: usize| (rng.next_u64() as usize) % len.clamp(1, 1024);
    for _ in 0..1 + rng.next_u64() % 4 {
        match rng.next_u64() % 7 {
            0 if !x.is_empty() => {
                let i = head(rng, x.len());
                x[i] ^= 1 << (rng.next_u64() % 8);
            }
            1 if !x.is_empty() => {
                let i = pos(rng, x.len());
                x[i] = rng.next_u64() as u8;
            }
            2 if x.len() >= 8 => {
                // An 8-byte field stomped with an extreme value.
                let i = head(rng, x.len()).min(x.len() - 8);
                let v = [u64::MAX, 1 << 40, 1 << 31, 0, u32::MAX as u64 + 1][rng.next_u64() as usize % 5];
                x[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            3 if x.len() >= 4 => {
                let i = head(rng, x.len()).min(x.len() - 4);
                let v = [u32::MAX, 1 << 30, 0, 14, 255][rng.next_u64() as usize % 5];
                x[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            4 => x.truncate(pos(rng, x.len())),
            5 if !x.is_empty() => {
                // Duplicate a slice somewhere else.
                let (a, b) = (pos(rng, x.len()), pos(rng, x.len()));
                let (a, b) = (a.min(b), a.max(b).min(a.min(b) + 64));
                let chunk = x[a..b].to_vec();
                let at = pos(rng, x.len());
                x.splice(at..at, chunk);
            }
            _ => x.extend((0..rng.next_u64() % 16).map(|_| rng.next_u64() as u8)),
        }
    }
    x
}

fn fuzz(target: &str, f: fn(&[u8]), mutations_per_seed: usize) {
    let mut rng = Rng::new(0xF022);
    for (name, seed) in seeds(target) {
        let r = catch_unwind(AssertUnwindSafe(|| f(&seed)));
        assert!(r.is_ok(), "{target}: seed {name} panicked");
        for i in 0..mutations_per_seed {
            let input = mutate(&seed, &mut rng);
            if let Some(trace) = std::env::var_os("PORTALORA_FUZZ_TRACE") {
                // The input about to run, for finding one that aborts the process.
                std::fs::write(trace, &input).unwrap();
            }
            if catch_unwind(AssertUnwindSafe(|| f(&input))).is_err() {
                let out = std::env::temp_dir().join(format!("portalora-crash-{target}-{name}-{i}"));
                std::fs::write(&out, &input).unwrap();
                panic!("{target}: mutation {i} of seed {name} panicked; input saved to {}", out.display());
            }
        }
    }
}

#[test]
fn safetensors_corpus_and_mutations() {
    fuzz("safetensors_header", portalora::fuzz::safetensors_header, 20000);
}

#[test]
fn gguf_corpus_and_mutations() {
    fuzz("gguf", portalora::fuzz::gguf, 20000);
}

#[test]
fn adapter_config_corpus_and_mutations() {
    fuzz("adapter_config", portalora::fuzz::adapter_config, 20000);
}
