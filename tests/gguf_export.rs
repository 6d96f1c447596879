//! GGUF out (`portalora export`): the writer against the reader over every metadata and tensor
//! type; LoRA adapter files against the ones `tests/fixtures/gen_gguf_export.py` wrote with the
//! `gguf` package as llama.cpp's converter lays them out (names from gguf's own TensorNameMap, the
//! Q/K permutation of B for `llama`, a module scale folded into B); merged models loaded back
//! against PEFT's merged model's loss in transformers; and GGUF LoRA files read back wherever an
//! adapter folder is, giving the folder's loss (VeRA written as the rank-r LoRA it equals).

mod common;

use std::path::{Path, PathBuf};

use common::{bin, fixture, json, tmp};
use portalora::io::gguf::{GgmlType, Gguf, Value};
use portalora::io::gguf_write::{GgufOut, OutTensor};
use portalora::ops::quant::quantize;
use portalora::rng::Rng;

const FAMILIES: [&str; 5] = ["llama3", "qwen2", "qwen3", "gemma3", "gpt2"];

fn export(args: &[&str]) -> String {
    let out = bin().arg("export").args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "portalora export {args:?}: {text}");
    text
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_writer_round_trips_every_value_and_tensor_type() {
    let mut rng = Rng::new(5);
    let mut g = GgufOut::default();
    let values = [
        ("general.architecture", Value::String("llama".into())),
        ("general.alignment", Value::U32(64)),
        ("u8", Value::U8(200)),
        ("i8", Value::I8(-100)),
        ("u16", Value::U16(60000)),
        ("i16", Value::I16(-30000)),
        ("i32", Value::I32(-7)),
        ("f32", Value::F32(0.1)),
        ("bool", Value::Bool(true)),
        ("u64", Value::U64(1 << 40)),
        ("i64", Value::I64(-(1 << 40))),
        ("f64", Value::F64(-2.5e-300)),
        ("text", Value::String("ünïcode\n\"quoted\"".into())),
        ("strings", Value::Array(vec![Value::String("a".into()), Value::String(String::new())])),
        ("nested", Value::Array(vec![Value::Array(vec![Value::I32(1), Value::I32(-2)]), Value::Array(vec![])])),
    ];
    for (k, v) in &values {
        g.set(k, v.clone());
    }
    let types = [
        (GgmlType::F32, vec![3, 5]),
        (GgmlType::F16, vec![2, 4]),
        (GgmlType::BF16, vec![7]),
        (GgmlType::Q8_0, vec![2, 64]),
        (GgmlType::Q4_1, vec![3, 32]),
        (GgmlType::Q5_0, vec![1, 32]),
        (GgmlType::Q4_K, vec![1, 256]),
        (GgmlType::Q6_K, vec![2, 256]),
    ];
    for (i, (ty, shape)) in types.iter().enumerate() {
        let x = rng.vec(shape.iter().product());
        g.tensors.push(OutTensor {
            name: format!("t{i}.weight"),
            shape: shape.clone(),
            ty: *ty,
            bytes: quantize(*ty, &x),
        });
    }
    let bytes = g.to_bytes();
    let back = Gguf::from_bytes("round-trip.gguf", bytes).unwrap();
    assert_eq!(back.version, 3);
    for (k, v) in &values {
        // The reader keeps an empty array's elements untyped too.
        assert_eq!(back.metadata.get(*k), Some(v), "{k}");
    }
    assert_eq!(back.metadata.len(), values.len());
    for (t, info) in g.tensors.iter().zip(&back.tensors) {
        assert_eq!((&info.name, &info.shape, info.ty), (&t.name, &t.shape, t.ty));
        assert_eq!(info.offset % 64, 0, "{}: data aligned to general.alignment", t.name);
        assert_eq!(back.raw(info).unwrap(), t.bytes, "{}", t.name);
    }
}

/// Every tensor of `ours` equals `want`'s (names, shapes, types and values within `tol`), and
/// the adapter keys agree.
fn same_lora(ours: &Gguf, want: &Gguf, tol: f32, what: &str) {
    for k in ["general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"] {
        assert_eq!(ours.metadata.get(k), want.metadata.get(k), "{what}: {k}");
    }
    let mut a: Vec<&str> = ours.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut b: Vec<&str> = want.tensors.iter().map(|t| t.name.as_str()).collect();
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b, "{what}: tensor names");
    for t in &want.tensors {
        let o = ours.tensor(&t.name).unwrap();
        assert_eq!(o.shape, t.shape, "{what}: {}", t.name);
        let (x, y) = (ours.tensor_f32(&t.name).unwrap(), want.tensor_f32(&t.name).unwrap());
        let worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs() / q.abs().max(1e-3)).fold(0f32, f32::max);
        assert!(worst <= tol, "{what}: {} differs by {worst} (relative)", t.name);
    }
}

#[test]
fn lora_files_equal_what_the_gguf_package_writes_for_llama_cpps_converter() {
    let dir = tmp("gguf-lora");
    for family in FAMILIES {
        let base = fixture(&format!("tiny_{family}"));
        let adapter = fixture(&format!("gguf_export/{family}/adapter"));
        let want = Gguf::open(fixture(&format!("gguf_export/{family}/expected_lora.gguf"))).unwrap();
        let out = dir.join(format!("{family}.gguf"));
        export(&["--model", s(&base), "--adapter", s(&adapter), "--out", s(&out)]);
        let ours = Gguf::open(&out).unwrap();
        assert!(ours.tensors.iter().all(|t| t.ty == GgmlType::F32));
        same_lora(&ours, &want, 0.0, family);
        // f16: the same values rounded to half precision.
        let half = dir.join(format!("{family}-f16.gguf"));
        export(&["--model", s(&base), "--adapter", s(&adapter), "--out", s(&half), "--type", "f16"]);
        let ours = Gguf::open(&half).unwrap();
        assert!(ours.tensors.iter().all(|t| t.ty == GgmlType::F16));
        same_lora(&ours, &want, 1e-3, &format!("{family} f16"));
    }
}

/// The mean loss of `model` (a file portalora loads) on `ids`, on the GPU.
fn loss(ctx: &portalora::gpu::Context, model: &Path, ids: &[Vec<u32>]) -> f64 {
    let w = portalora::model::load_model(model).unwrap();
    let m = portalora::model::gpu::GpuModel::new(ctx, &w, ids.len(), ids[0].len()).unwrap();
    let (sum, n) = m.loss_sum(ctx, ids).unwrap();
    sum / n as f64
}

#[test]
fn merged_files_give_the_loss_of_pefts_merged_model() {
    let Some(ctx) = common::context() else { return };
    let dir = tmp("gguf-merged");
    for case in ["llama3", "qwen2", "qwen3", "qwen2_vera"] {
        let family = case.trim_end_matches("_vera");
        let base = fixture(&format!("tiny_{family}.gguf"));
        let adapter = fixture(&format!("gguf_export/{case}/adapter"));
        let e = json(&fixture(&format!("gguf_export/{case}/expected.json")));
        let ids = common::ids_of(&e["input_ids"]);
        let want = e["merged_loss"].as_f64().unwrap();
        for (ty, tol) in [(None, 1e-4), (Some("f32"), 1e-4), (Some("f16"), 1e-3)] {
            let out = dir.join(format!("{case}-{}.gguf", ty.unwrap_or("as-stored")));
            let mut args = vec!["--model", s(&base), "--adapter", s(&adapter), "--out", s(&out), "--as", "merged"];
            args.extend(ty.iter().flat_map(|t| ["--type", t]));
            export(&args);
            let got = loss(&ctx, &out, &ids);
            let rel = (got - want).abs() / want;
            assert!(rel < tol, "{case} {ty:?}: merged loss {got} vs PEFT's {want} ({rel:.1e})");
            // The base's metadata (tokenizer, hyperparameters) and untouched tensors as they were.
            let (m, b) = (Gguf::open(&out).unwrap(), Gguf::open(&base).unwrap());
            for (k, v) in &b.metadata {
                assert_eq!(m.metadata.get(k), Some(v), "{case}: metadata {k}");
            }
            let norm = b.tensors.iter().find(|t| t.name.ends_with("attn_norm.weight")).unwrap();
            assert_eq!(m.raw(m.tensor(&norm.name).unwrap()).unwrap(), b.raw(norm).unwrap());
        }
    }
}

/// `portalora eval --json`'s loss of `model` with `adapter` on the rows of `ids`.
fn eval(model: &Path, adapter: &Path, ids: &Path) -> f64 {
    let out =
        bin().args(["eval", "--model", s(model), "--adapter", s(adapter), "--ids", s(ids), "--json"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "eval: {text}{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn gguf_lora_files_read_back_where_adapter_folders_are_read() {
    if common::context().is_none() {
        return;
    }
    let dir = tmp("gguf-read-back");
    for case in ["llama3", "gpt2", "qwen2_vera"] {
        let family = case.trim_end_matches("_vera");
        let base = fixture(&format!("tiny_{family}"));
        let adapter = fixture(&format!("gguf_export/{case}/adapter"));
        let e = json(&fixture(&format!("gguf_export/{case}/expected.json")));
        let ids: PathBuf = dir.join(format!("{case}-ids.json"));
        std::fs::write(&ids, serde_json::json!({"input_ids": e["input_ids"]}).to_string()).unwrap();
        let file = dir.join(format!("{case}.gguf"));
        export(&["--model", s(&base), "--adapter", s(&adapter), "--out", s(&file)]);
        let (folder, gguf) = (eval(&base, &adapter, &ids), eval(&base, &file, &ids));
        let rel = (folder - gguf).abs() / folder;
        assert!(rel < 1e-5, "{case}: eval with the folder {folder}, with the GGUF file {gguf}");
        // The same file with a whole tensor beside its pairs (a trained embedding, say) is refused.
        let g = Gguf::open(&file).unwrap();
        let mut with_extra = GgufOut {
            metadata: portalora::io::gguf_write::metadata_in_order(&g.metadata),
            tensors: g
                .tensors
                .iter()
                .map(|t| OutTensor { name: t.name.clone(), shape: t.shape.clone(), ty: t.ty, bytes: g.raw(t).unwrap() })
                .collect(),
        };
        with_extra.tensors.push(OutTensor {
            name: "token_embd.weight".into(),
            shape: vec![4, 2],
            ty: GgmlType::F32,
            bytes: vec![0u8; 32],
        });
        let extra = dir.join(format!("{case}-extra.gguf"));
        std::fs::write(&extra, with_extra.to_bytes()).unwrap();
        let out = bin().args(["eval", "--model", s(&base), "--adapter", s(&extra), "--ids", s(&ids)]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("token_embd.weight is not a .lora_a / .lora_b tensor"), "{err}");
    }
}

/// A Delta-LoRA run moved W0: its merged export takes the adapted weights from the run's merged
/// folder (W0 as moved, with s·B·A) and everything else from the GGUF base, and gives that
/// folder's loss; a LoRA file of it is refused (tests/bad_inputs.rs).
#[test]
fn a_delta_lora_run_exports_merged_with_the_weights_it_moved() {
    let Some(ctx) = common::context() else { return };
    let dir = tmp("gguf-delta");
    let e = json(&fixture("gguf_export/qwen2/expected.json"));
    let ids_file = dir.join("ids.json");
    std::fs::write(&ids_file, serde_json::json!({"input_ids": e["input_ids"]}).to_string()).unwrap();
    let base = fixture("tiny_qwen2.gguf");
    let run = dir.join("run");
    let st = bin()
        .args(["train", "--model", s(&base), "--ids", s(&ids_file), "--method", "delta-lora", "--delta-warmup", "0"])
        .args(["--targets", "q_proj,v_proj,down_proj", "--steps", "3", "--lr", "0.02", "--out", s(&run)])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let out = dir.join("merged.gguf");
    export(&["--model", s(&base), "--adapter", s(&run.join("adapter")), "--out", s(&out)]);
    let ids = common::ids_of(&e["input_ids"]);
    let (got, want, before) = (loss(&ctx, &out, &ids), loss(&ctx, &run, &ids), loss(&ctx, &base, &ids));
    assert!((got - want).abs() / want < 1e-5, "merged GGUF {got} vs the run's merged folder {want}");
    assert!((before - want).abs() > 1e-3, "the run moved the loss ({before} → {want})");
    // The run's --out itself, as EXPORT.md's flow gives it, exports the same file.
    let from_run = dir.join("from_run.gguf");
    export(&["--model", s(&base), "--adapter", s(&run), "--out", s(&from_run)]);
    assert!(std::fs::read(&from_run).unwrap() == std::fs::read(&out).unwrap(), "--adapter RUN and RUN/adapter differ");
}

/// A merged export to a quantized type says how much of the adapter's change the quantized
/// weights keep, and advises f16 or a LoRA file when the change rounds away (an adapter whose
/// alpha is made tiny here).
#[test]
fn quantizing_a_merge_says_how_much_of_the_change_it_keeps() {
    let dir = tmp("gguf-kept");
    let base = fixture("tiny_qwen2.gguf");
    let adapter = fixture("gguf_export/qwen2/adapter");
    let out = dir.join("q8.gguf");
    let text =
        export(&["--model", s(&base), "--adapter", s(&adapter), "--out", s(&out), "--as", "merged", "--type", "q8_0"]);
    assert!(text.contains("keep 100% of the adapter's change") && !text.contains("rounds away"), "{text}");
    assert!(text.contains("the fine-tune survives the quantization"), "{text}");
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    std::fs::copy(adapter.join("adapter_model.safetensors"), small.join("adapter_model.safetensors")).unwrap();
    let mut cfg = json(&adapter.join("adapter_config.json"));
    cfg["lora_alpha"] = serde_json::json!(6e-5);
    cfg["alpha_pattern"] = serde_json::json!({});
    std::fs::write(small.join("adapter_config.json"), cfg.to_string()).unwrap();
    let out = dir.join("q4.gguf");
    let text =
        export(&["--model", s(&base), "--adapter", s(&small), "--out", s(&out), "--as", "merged", "--type", "q4_0"]);
    assert!(text.contains("mostly rounds away") && text.contains("--type f16"), "{text}");
    let out = dir.join("f16.gguf");
    let text =
        export(&["--model", s(&base), "--adapter", s(&small), "--out", s(&out), "--as", "merged", "--type", "f16"]);
    assert!(!text.contains("note:"), "f16 keeps the change: {text}");
}

/// llama.cpp scales each pair of a GGUF LoRA file by alpha / (that pair's rank), or by 1 when the
/// file's alpha is 0: read back, each module's scale is the same, for pairs of different ranks.
#[test]
fn gguf_lora_scales_read_back_as_llama_cpp_applies_them() {
    use portalora::adapter::peft::PeftFile;
    use portalora::adapter::{AdapterConfig, Method};
    let mut rng = Rng::new(9);
    for (alpha, want) in [(0.0f32, [1.0, 1.0]), (6.0, [3.0, 2.0])] {
        let mut g = GgufOut::default();
        g.set("general.architecture", Value::String("qwen2".into()));
        g.set("general.type", Value::String("adapter".into()));
        g.set("adapter.type", Value::String("lora".into()));
        g.set("adapter.lora.alpha", Value::F32(alpha));
        for (name, r) in [("blk.0.attn_q.weight", 2), ("blk.0.attn_v.weight", 3)] {
            for (suffix, shape) in [("lora_a", vec![r, 16]), ("lora_b", vec![8, r])] {
                let x = rng.vec(shape.iter().product());
                g.tensors.push(OutTensor {
                    name: format!("{name}.{suffix}"),
                    shape,
                    ty: GgmlType::F32,
                    bytes: quantize(GgmlType::F32, &x),
                });
            }
        }
        let f = PeftFile::from_gguf(&Gguf::from_bytes("scales.gguf", g.to_bytes()).unwrap()).unwrap();
        let cfg = f.adapter_config(Method::Lora, &AdapterConfig::new(Method::Lora)).unwrap();
        let got: Vec<f64> = ["q_proj", "v_proj"]
            .iter()
            .map(|m| cfg.scale_for(&format!("model.layers.0.self_attn.{m}")).unwrap())
            .collect();
        assert_eq!(got, want, "alpha {alpha}");
    }
}
