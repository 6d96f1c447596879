//! DoRA (`--method dora`, PEFT's `use_dora`) end to end: PEFT's DoRA files evaluate and merge as
//! in PEFT (tests/fixtures/gen_adapters.py; the training runs themselves are in tests/adapters.rs),
//! the GPU's merge equals an f64 merge on the host, a run exports a merged GGUF that evaluates as
//! the run did (a DoRA LoRA file is refused: llama.cpp has none), and a packed base trains as the
//! f32 base holding the same values.

mod common;

use std::path::Path;

use common::{bin, context, fixture, json, tmp};
use portalora::adapter::peft::PeftFile;
use portalora::adapter::{AdapterConfig, Method};
use portalora::model::gguf_export::{dora_merged, factors};
use portalora::model::load_model;

/// Runs the CLI; panics with its output when it fails.
fn run(args: &[&str]) -> String {
    let o = bin().args(args).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "portalora {}:\n{text}", args.join(" "));
    text
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `eval --json`'s loss of `model` (with `adapter`) on the rows in `ids`.
fn eval(model: &Path, ids: &Path, adapter: Option<&Path>) -> f64 {
    let mut args = vec!["eval", "--model", s(model), "--ids", s(ids), "--json"];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    let out = run(&args);
    let last = out.lines().rev().find(|l| l.starts_with('{')).unwrap();
    serde_json::from_str::<serde_json::Value>(last).unwrap()["loss"].as_f64().unwrap()
}

/// `generate --json`'s greedy token ids for the prompt "To be".
fn generate(model: &Path, adapter: Option<&Path>) -> serde_json::Value {
    let mut args = vec!["generate", "--model", s(model), "--prompt", "To be", "--max-tokens", "12", "--json"];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    let out = run(&args);
    let ids = serde_json::from_str::<serde_json::Value>(out.lines().rev().find(|l| l.starts_with('{')).unwrap())
        .unwrap()["ids"]
        .clone();
    assert!(ids.as_array().is_some_and(|a| a.len() == 12), "{out}");
    ids
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

#[test]
fn peft_dora_files_evaluate_and_merge_as_in_peft() {
    if context().is_none() {
        return;
    }
    for arch in ["gpt2", "llama", "qwen3"] {
        let dir = fixture(&format!("adapters/{arch}_dora"));
        let e = json(&dir.join("expected.json"));
        let (model, adapter) = (fixture(&format!("tiny_{arch}")), dir.join("init"));
        let work = tmp(&format!("dora_{arch}"));
        let ids = work.join("ids.json");
        std::fs::write(&ids, serde_json::json!({ "input_ids": e["input_ids"] }).to_string()).unwrap();
        // PEFT's first loss is its forward pass with the initial adapter (no dropout here).
        let want = e["losses"][0].as_f64().unwrap();
        let got = eval(&model, &ids, Some(&adapter));
        assert!(rel(got, want) < 1e-4, "{arch}: eval with PEFT's DoRA adapter {got} vs PEFT {want}");
        // The merged model (the GPU's merge) evaluates the same, and its weights are the f64 merge.
        let merged = work.join("merged");
        run(&["merge", "--model", s(&model), "--adapter", s(&adapter), "--out", s(&merged)]);
        let got = eval(&merged, &ids, None);
        assert!(rel(got, want) < 1e-4, "{arch}: the merged model {got} vs PEFT {want}");
        if arch == "gpt2" {
            // Generation runs the branch beside the stored weights (bound to them, not merged):
            // the merged model's greedy tokens (GPT-2: the fixture with a tokenizer).
            let (with, from_merged) = (generate(&model, Some(&adapter)), generate(&merged, None));
            assert_eq!(with, from_merged, "greedy tokens with the adapter and from the merged model");
        }
        let (base, merged_w) = (load_model(&model).unwrap(), load_model(&merged).unwrap());
        let peft = PeftFile::read(&adapter).unwrap();
        let cfg = peft.adapter_config(Method::Dora, &AdapterConfig::new(Method::Dora)).unwrap();
        let tensors = peft.tensors_for(&base.config);
        let host = dora_merged(&base, &factors(&cfg, &tensors, &base.config).unwrap(), &tensors).unwrap();
        assert!(!host.tensors.is_empty());
        for (name, want) in &host.tensors {
            let got = &merged_w.tensors[name];
            let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let err = got.data.iter().zip(&want.data).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
            assert!(err <= 1e-5 * scale, "{arch} {name}: merged on the GPU vs the host: {err:e} of {scale}");
        }
        std::fs::remove_dir_all(&work).unwrap();
    }
}

#[test]
fn a_dora_run_exports_a_merged_gguf_that_evaluates_as_the_run() {
    if context().is_none() {
        return;
    }
    let work = tmp("dora_export");
    let model = fixture("tiny_llama3.gguf");
    let e = json(&fixture("adapters/llama3_lora/expected.json"));
    let ids = work.join("ids.json");
    std::fs::write(&ids, serde_json::json!({ "input_ids": e["input_ids"] }).to_string()).unwrap();
    let out = work.join("run");
    let targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";
    let args = ["--ids", s(&ids), "--method", "dora", "--rank", "4", "--targets", targets, "--lr", "0.02"];
    let plus = ["--lr-ratio", "4"]; // LoRA+'s groups (tests/adapters.rs checks them against PEFT)
    run(&[&["train", "--model", s(&model), "--steps", "4", "--out", s(&out)][..], &args[..], &plus[..]].concat());
    let cfg = json(&out.join("run.json"));
    assert_eq!((cfg["train"]["lora_plus"].as_bool(), cfg["train"]["lr_ratio"].as_f64()), (Some(true), Some(4.0)));
    let with_adapter = eval(&model, &ids, Some(&out));
    let file = work.join("merged.gguf");
    let text = run(&["export", "--model", s(&model), "--adapter", s(&out), "--out", s(&file)]);
    assert!(text.contains("merged model"), "a DoRA adapter exports merged by default: {text}");
    let merged = eval(&file, &ids, None);
    assert!(rel(merged, with_adapter) < 1e-4, "merged GGUF {merged} vs base + adapter {with_adapter}");
    let base = eval(&model, &ids, None);
    assert!(rel(merged, base) > 1e-3, "the run changed nothing: {merged} vs the base {base}");
    // llama.cpp has no DoRA adapters: a LoRA file is refused, saying what to do.
    let o = bin()
        .args(["export", "--model", s(&model), "--adapter", s(&out), "--out", s(&work.join("lora.gguf"))])
        .args(["--as", "lora"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("DoRA") && err.contains("--as merged"), "{err}");
    assert!(!work.join("lora.gguf").exists());
    std::fs::remove_dir_all(&work).unwrap();
}

/// A packed base (here re-quantized to Q8_0 on upload) trains as an f32 base holding the values
/// it dequantizes to: the norms' ‖W0‖² come from the packed rows (gathered) and the products read
/// them packed.
#[test]
fn dora_on_a_packed_base_trains_as_on_its_dequantized_values() {
    use portalora::gpu::DType;
    use portalora::io::gguf::{dequantize, GgmlType};
    use portalora::model::BaseDType;
    use portalora::ops::quant::{fits, quantize};
    use portalora::train::{TrainConfig, Trainer};
    let Some(ctx) = context() else { return };
    let w = load_model(fixture("tiny_llama3.gguf")).unwrap();
    let ids = common::ids_of(&json(&fixture("adapters/llama3_lora/expected.json"))["input_ids"]);
    let mut same = load_model(fixture("tiny_llama3.gguf")).unwrap();
    // What --base-dtype q8_0 packs: whole blocks per row, rows in fours.
    let packs = |t: &portalora::model::weights::HostTensor| {
        t.shape.len() == 2 && fits(DType::Q8_0, &t.shape) && t.shape[0].is_multiple_of(4)
    };
    for t in same.tensors.values_mut().filter(|t| packs(t)) {
        t.data = dequantize(GgmlType::Q8_0, &quantize(GgmlType::Q8_0, &t.data));
    }
    let mut cfg = AdapterConfig::new(Method::Dora);
    (cfg.rank, cfg.targets) = (4, portalora::adapter::all_targets(w.config.arch));
    let losses = |w: &portalora::model::Weights, base_dtype: BaseDType| {
        let tc = TrainConfig { base_dtype, lr: 2e-2, ..TrainConfig::default() };
        let mut tr = Trainer::new(&ctx, w, ids.len(), ids[0].len(), &cfg, &tc, None).unwrap();
        let packed = tr.model.params.layers[0].wq.dtype() == DType::Q8_0;
        ((0..3).map(|_| tr.train_step(&ctx, &ids).unwrap().loss).collect::<Vec<_>>(), packed)
    };
    let (packed, is_packed) = losses(&w, BaseDType::Q8_0);
    let (f32s, not_packed) = losses(&same, BaseDType::F32);
    assert!(is_packed && !not_packed, "the first run's base is packed, the second's f32");
    for (a, b) in packed.iter().zip(&f32s) {
        assert!(rel(*a, *b) < 1e-5, "packed {packed:?} vs f32 {f32s:?}");
    }
}
