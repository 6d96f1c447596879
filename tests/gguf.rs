//! The GGUF reader against `tests/fixtures/tiny.gguf`, whose expected values the `gguf` Python
//! package computed (tests/fixtures/gen_gguf.py), and against corrupted copies of it.

use std::path::{Path, PathBuf};

use portalora::io::gguf::{Gguf, GgufError, Value};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[test]
fn tensors_match_the_gguf_package() {
    let g = Gguf::open(fixture("tiny.gguf")).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny_gguf.json")).unwrap()).unwrap();
    let tensors = expected["tensors"].as_array().unwrap();
    assert_eq!(g.tensors.len(), tensors.len());
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let shape: Vec<usize> = t["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let info = g.tensor(name).unwrap();
        assert_eq!(info.shape, shape, "{name}");
        assert_eq!(format!("{:?}", info.ty).to_uppercase(), t["type"].as_str().unwrap(), "{name}");
        let got = g.tensor_f32(name).unwrap();
        let want: Vec<f32> = t["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), want.len(), "{name}");
        // Dequantization is a few exact f32 operations: the results must agree bit for bit.
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: {g} vs {w}");
        }
    }
}

#[test]
fn metadata_of_every_type() {
    let g = Gguf::open(fixture("tiny.gguf")).unwrap();
    let m = &g.metadata;
    assert_eq!(g.version, 3);
    assert_eq!(m["general.architecture"].as_str(), Some("llama"));
    assert_eq!(m["general.alignment"].as_u64(), Some(64));
    assert_eq!(m["test.u32"], Value::U32(4_000_000_000));
    assert_eq!(m["test.i32"], Value::I32(-7));
    assert_eq!(m["test.f32"], Value::F32(0.125));
    assert_eq!(m["test.u64"], Value::U64((1 << 40) + 3));
    assert_eq!(m["test.i64"], Value::I64(-(1 << 40)));
    assert_eq!(m["test.f64"], Value::F64(1e-300));
    assert_eq!(m["test.bool"], Value::Bool(true));
    assert_eq!(m["test.u8"], Value::U8(200));
    assert_eq!(m["test.i8"], Value::I8(-100));
    assert_eq!(m["test.u16"], Value::U16(60000));
    assert_eq!(m["test.i16"], Value::I16(-30000));
    assert_eq!(m["test.string"].as_str(), Some("héllo, wörld ✓"));
    let s = |v: &str| Value::String(v.into());
    assert_eq!(m["test.strings"], Value::Array(vec![s("a"), s(""), s("ünï")]));
    assert_eq!(m["test.ints"].clone(), Value::Array(vec![Value::I32(1), Value::I32(-2), Value::I32(3)]));
    assert_eq!(m["test.floats"], Value::Array(vec![Value::F32(0.5), Value::F32(-1.5)]));
}

fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portalora-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn corrupt_files_get_clear_errors() {
    let good = std::fs::read(fixture("tiny.gguf")).unwrap();

    let e = Gguf::open(write_temp("magic.gguf", b"GGML\x03\0\0\0")).unwrap_err();
    assert!(matches!(e, GgufError::BadMagic { .. }) && e.to_string().contains("magic.gguf"), "{e}");

    let e = Gguf::open(write_temp("empty.gguf", b"")).unwrap_err();
    assert!(matches!(e, GgufError::BadMagic { .. }), "{e}");

    let mut v = good.clone();
    v[4] = 9;
    let e = Gguf::open(write_temp("version.gguf", &v)).unwrap_err();
    assert!(e.to_string().contains("version 9"), "{e}");

    // A header that lies about its tensor count.
    let mut v = good.clone();
    v[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = Gguf::open(write_temp("count.gguf", &v)).unwrap_err();
    assert!(matches!(e, GgufError::Corrupt { .. }), "{e}");

    // Truncated inside the header, and inside the data.
    let e = Gguf::open(write_temp("short-header.gguf", &good[..200])).unwrap_err();
    assert!(matches!(e, GgufError::Corrupt { .. }) && e.to_string().contains("ends inside"), "{e}");
    let e = Gguf::open(write_temp("short-data.gguf", &good[..2300])).unwrap_err();
    assert!(matches!(e, GgufError::PastEnd { ref name, .. } if name == "vector"), "{e}");

    // An unknown tensor type: patch the type field of the first tensor entry (after its name and dims).
    let g = Gguf::open(fixture("tiny.gguf")).unwrap();
    let first = &g.tensors[0];
    let name_pos = good.windows(first.name.len()).position(|w| w == first.name.as_bytes()).unwrap();
    let ty_pos = name_pos + first.name.len() + 4 + 8 * first.shape.len();
    let mut v = good.clone();
    v[ty_pos..ty_pos + 4].copy_from_slice(&20u32.to_le_bytes());
    let e = Gguf::open(write_temp("type.gguf", &v)).unwrap_err().to_string();
    assert!(e.contains("an IQ type") && e.contains(&first.name) && e.contains("Q4_K_M"), "{e}");

    let e = g.tensor_f32("no.such.tensor").unwrap_err();
    assert!(e.to_string().contains("no.such.tensor"), "{e}");
}
