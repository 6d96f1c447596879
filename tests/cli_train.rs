//! `portalora train`, `merge` and `eval --adapter` as a user runs them, against the PEFT
//! fixtures (tests/fixtures/gen_adapters.py): the `--log-json` losses, the written files, and
//! the messages of bad flags.

mod common;

use std::path::{Path, PathBuf};

use common::{bin, fixture, json};

/// Runs the binary; skips (None) when there is no GPU and PORTALORA_REQUIRE_GPU is unset.
fn run(args: &[&str]) -> Option<(bool, String, String)> {
    common::context()?;
    let out = bin().args(args).output().unwrap();
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    ))
}

/// A fresh folder per call (tests run in parallel threads of one process).
fn tmp(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("portalora-cli-{name}-{}-{k}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// Writes the fixture's `input_ids` / `eval_ids` as an ids file.
fn ids_file(e: &serde_json::Value, key: &str, path: &Path) {
    std::fs::write(path, serde_json::json!({ "input_ids": e[key] }).to_string()).unwrap();
}

/// A fixture run's files: the ids and eval ids written from expected.json, the log and --out.
struct Run {
    e: serde_json::Value,
    dir: PathBuf,
    ids: PathBuf,
    eval_ids: PathBuf,
    log: PathBuf,
    out: PathBuf,
    init: PathBuf,
}

impl Run {
    fn new(name: &str) -> Run {
        let e = json(&fixture(&format!("adapters/{name}/expected.json")));
        let dir = tmp(name);
        std::fs::create_dir_all(&dir).unwrap();
        let run = Run {
            ids: dir.join("ids.json"),
            eval_ids: dir.join("eval.json"),
            log: dir.join("log.jsonl"),
            out: dir.join("out"),
            init: fixture(&format!("adapters/{name}/init")),
            e,
            dir,
        };
        ids_file(&run.e, "input_ids", &run.ids);
        ids_file(&run.e, "eval_ids", &run.eval_ids);
        run
    }

    /// `portalora train` on the fixture's batch from its initial adapter, with the fixture's
    /// optimizer settings and no clipping, plus `extra` flags.
    fn train(&self, model: &str, method: &str, extra: &[&str]) -> Option<(bool, String, String)> {
        let model = fixture(model);
        let mut args = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            self.ids.to_str().unwrap(),
            "--method",
            method,
            "--init-adapter",
            self.init.to_str().unwrap(),
            "--out",
            self.out.to_str().unwrap(),
            "--log-json",
            self.log.to_str().unwrap(),
            "--max-grad-norm",
            "0",
            "--steps",
            "4",
            "--weight-decay",
            "0.01",
        ];
        args.extend_from_slice(extra);
        run(&args)
    }

    /// `portalora eval --json` of `model` on the fixture's eval batch (with `extra` flags).
    fn eval(&self, model: &Path, extra: &[&str]) -> f64 {
        let mut args =
            vec!["eval", "--model", model.to_str().unwrap(), "--ids", self.eval_ids.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = run(&args).unwrap();
        assert!(ok, "{stderr}");
        eval_json(&stdout)
    }

    fn want_eval(&self) -> f64 {
        self.e["eval_loss"].as_f64().unwrap()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn losses_of(log: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

fn eval_json(stdout: &str) -> f64 {
    let last = stdout.lines().last().unwrap();
    serde_json::from_str::<serde_json::Value>(last).unwrap()["loss"].as_f64().unwrap()
}

fn check_losses(name: &str, log: &Path, e: &serde_json::Value) {
    let got = losses_of(log);
    let want = e["losses"].as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{name}: one log line per step");
    for (i, ((step, loss), w)) in got.iter().zip(want).enumerate() {
        let w = w.as_f64().unwrap();
        assert_eq!(*step, i as u64 + 1);
        assert!((loss - w).abs() / w < 1e-4, "{name} step {step}: {loss} vs PEFT {w}");
    }
}

#[test]
fn train_lora_with_ids_matches_peft_and_the_adapter_evaluates() {
    let r = Run::new("gpt2_lora");
    // Numbers in any usual form.
    let flags = [
        "--rank",
        "4.0",
        "--alpha",
        "8",
        "--targets",
        "c_attn,c_proj,c_fc",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-02",
        "--betas",
        "0.9,0.999",
        "--eps",
        "1e-08",
    ];
    let Some((ok, stdout, stderr)) = r.train("tiny_gpt2", "lora", &flags) else { return };
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("kept for backward"), "{stdout}");
    check_losses("gpt2 lora", &r.log, &r.e);
    let config = json(&r.out.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["fan_in_fan_out"], true);
    let got = r.eval(&fixture("tiny_gpt2"), &["--adapter", r.out.to_str().unwrap()]);
    assert!(
        (got - r.want_eval()).abs() / r.want_eval() < 1e-4,
        "eval with our adapter {got} vs PEFT {}",
        r.want_eval()
    );
}

#[test]
fn train_vera_writes_the_shared_pair() {
    let r = Run::new("llama_vera");
    // With the MLP recomputed in backward (activation checkpointing): PEFT's losses all the same.
    let flags = ["--lr", "0.01", "--recompute-mlp"];
    let Some((ok, stdout, stderr)) = r.train("tiny_llama", "vera", &flags) else { return };
    assert!(ok, "{stdout}\n{stderr}");
    check_losses("llama vera", &r.log, &r.e);
    let back = portalora::adapter::peft::PeftFile::read(&r.out).unwrap();
    assert_eq!(back.peft_type, "VERA");
    assert!(back.tensors.contains_key("base_model.vera_A") && back.tensors.contains_key("base_model.vera_B"));
}

#[test]
fn train_delta_lora_writes_a_merged_model_and_the_adapter() {
    let r = Run::new("llama_delta-lora");
    let flags = ["--lr", "1e-2", "--delta-lambda", "2.0", "--delta-warmup", "1"];
    let Some((ok, stdout, stderr)) = r.train("tiny_llama", "delta-lora", &flags) else { return };
    assert!(ok, "{stdout}\n{stderr}");
    check_losses("llama delta-lora", &r.log, &r.e);
    assert!(r.out.join("config.json").exists() && r.out.join("model.safetensors").exists());
    assert!(
        r.out.join("adapter/adapter_config.json").exists() && r.out.join("adapter/adapter_model.safetensors").exists()
    );
    // The merged folder alone (W0 moved by Delta-LoRA, plus the final ΔW) gives the trained model.
    let got = r.eval(&r.out, &[]);
    assert!(
        (got - r.want_eval()).abs() / r.want_eval() < 1e-4,
        "merged Delta-LoRA {got} vs reference {}",
        r.want_eval()
    );
}

#[test]
fn merge_writes_the_base_keys_and_evaluates_like_the_adapter() {
    let r = Run::new("gpt2_lora");
    let model = fixture("tiny_gpt2");
    let merged = r.dir.join("merged");
    let args = ["merge", "--model", model.to_str().unwrap(), "--adapter", r.init.to_str().unwrap(), "--out"];
    let Some((ok, _, stderr)) = run(&[&args[..], &[merged.to_str().unwrap()]].concat()) else { return };
    assert!(ok, "{stderr}");
    let keys = |p: &Path| {
        let bytes = std::fs::read(p.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut k: Vec<(String, Vec<usize>)> = st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect();
        k.sort();
        k
    };
    assert_eq!(keys(&merged), keys(&model), "merge must keep the base's keys and shapes (a tied head stays tied)");
    let with_merge = r.eval(&merged, &[]);
    let with_branch = r.eval(&model, &["--adapter", r.init.to_str().unwrap()]);
    assert!(
        (with_merge - with_branch).abs() / with_branch < 1e-5,
        "merged {with_merge} vs adapter branch {with_branch}"
    );
}

#[test]
fn bad_train_flags_get_clear_messages() {
    let r = Run::new("gpt2_lora");
    let (vera, lora) = (fixture("adapters/gpt2_vera/init"), r.init.clone());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--targets", "q_proj"], "valid targets: c_attn"),
        (vec!["--targets", "c_attn", "--method", "qlora"], "unknown method"),
        (vec!["--targets", "c_attn", "--rank", "0"], "rank 0"),
        (vec!["--targets", "c_attn", "--rank", "100"], "1 ≤ r ≤ 24"),
        (vec!["--targets", "c_attn", "--dropout", "1.5"], "dropout 1.5"),
        (vec!["--targets", "c_attn", "--lr=-1"], "learning rate -1"),
        (vec!["--init-adapter", lora.to_str().unwrap(), "--rank", "8"], "--rank 8 disagrees"),
        (vec!["--init-adapter", vera.to_str().unwrap()], "VERA adapter"),
        (vec![], "--targets"),
    ];
    let model = fixture("tiny_gpt2");
    for (extra, want) in cases {
        let mut args = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            r.ids.to_str().unwrap(),
            "--steps",
            "1",
            "--out",
        ];
        args.push(r.out.to_str().unwrap());
        args.extend(extra);
        let Some((ok, stdout, stderr)) = run(&args) else { return };
        assert!(!ok, "{args:?} should fail:\n{stdout}");
        assert!(stderr.contains(want), "{args:?}: expected {want:?} in:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!r.out.exists(), "{args:?} left an output folder");
    }
}

#[test]
fn bench_step_reports_speed_memory_and_kernels_as_json() {
    let model = common::fixture("tiny_llama");
    let Some((ok, out, err)) = run(&[
        "bench",
        "step",
        "--model",
        model.to_str().unwrap(),
        "--method",
        "lora-fa",
        "--rank",
        "2",
        "--batch",
        "2",
        "--seq",
        "7",
        "--steps",
        "2",
        "--json",
    ]) else {
        return;
    };
    assert!(ok, "bench step failed: {err}");
    let last = out.lines().last().expect("output");
    let j: serde_json::Value = serde_json::from_str(last).expect("the last line is one JSON object");
    assert!(j["tokens_per_s"].as_f64().unwrap() > 0.0, "{last}");
    let bytes = &j["gpu_bytes"];
    for k in ["weights", "adapters", "optimizer", "activations"] {
        assert!(bytes[k].as_u64().unwrap() > 0, "gpu_bytes.{k}: {last}");
    }
    assert!(j["kept_bytes"].as_u64().unwrap() <= bytes["activations"].as_u64().unwrap());
    let kernels = j["kernels"].as_array().unwrap();
    assert!(kernels.iter().any(|k| k["kernel"].as_str().unwrap().contains("matmul")), "{last}");
    let sum: f64 = kernels.iter().map(|k| k["seconds"].as_f64().unwrap()).sum();
    assert!((sum - j["kernel_seconds"].as_f64().unwrap()).abs() < 1e-9 + 1e-6 * sum);
    assert_eq!(j["method"], "lora-fa");
    // Per-step overhead: the CPU's encoding inside the step's wall time, one pass and one
    // submission holding every dispatch the per-kernel breakdown timed one by one, and the GPU's
    // busy time from the pass's own timestamps.
    let (encode, step) = (j["encode_seconds"].as_f64().unwrap(), j["step_seconds"].as_f64().unwrap());
    assert!(encode > 0.0 && encode < step, "{last}");
    let timed: u64 = kernels.iter().map(|k| k["count"].as_u64().unwrap()).sum();
    assert_eq!((j["dispatches"].as_u64(), j["passes"].as_u64()), (Some(timed), Some(1)));
    if let Some(gpu) = j["gpu_step_seconds"].as_f64() {
        assert!(gpu > 0.0 && j["gpu_idle_seconds"].as_f64().unwrap() >= 0.0, "{last}");
    }
    assert_eq!(j["warmup_steps"].as_array().map(Vec::len), Some(1), "{last}");
    let (planned, unshared) = (j["planned_bytes"].as_u64().unwrap(), j["unshared_bytes"].as_u64().unwrap());
    assert!(planned > 0 && planned < unshared && planned <= bytes["activations"].as_u64().unwrap(), "{last}");
    // The seconds to the first step, in parts that add up to it (none negative, kernels compiled).
    let (total, parts) = (j["startup_seconds"].as_f64().unwrap(), &j["startup"]);
    let names = ["process", "context", "load", "upload", "plan", "compile", "optimizer", "first_submit"];
    let sum: f64 = names.iter().map(|k| parts[k].as_f64().unwrap_or_else(|| panic!("startup.{k}: {last}"))).sum();
    assert!(names.iter().all(|k| parts[k].as_f64().unwrap() >= 0.0), "{last}");
    assert!((sum - total).abs() <= 1e-6 * total.max(1.0) && total > 0.0, "{sum} vs {total}: {last}");
    assert!(parts["pipelines"].as_u64().unwrap() > 10 && parts["compile"].as_f64().unwrap() > 0.0, "{last}");
    assert!(out.contains("start-up: ") && out.contains(" pipelines)"), "{out}");
    // With the MLP recomputed in backward, less is kept (tiny LLaMA: gate and up, (N, F) per layer).
    let args = ["bench", "step", "--model", model.to_str().unwrap(), "--method", "lora-fa", "--rank", "2"];
    let more = ["--batch", "2", "--seq", "7", "--steps", "1", "--no-kernels", "--json", "--recompute-mlp"];
    let (ok, out, err) = run(&[&args[..], &more[..]].concat()).unwrap();
    assert!(ok, "bench step --recompute-mlp failed: {err}");
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(r["recompute_mlp"], true);
    let w = portalora::model::load_model(&model).unwrap().config;
    let mlp = (w.num_layers * 2 * 14 * w.intermediate_size * 4) as u64;
    assert_eq!(r["kept_bytes"].as_u64().unwrap(), j["kept_bytes"].as_u64().unwrap() - mlp, "{out}");
    // With the kept activations as f16, about half as much.
    let more = ["--batch", "2", "--seq", "7", "--steps", "1", "--no-kernels", "--json", "--recompute-mlp"];
    let (ok, out16, err) = run(&[&args[..], &more[..], &["--activations", "f16"][..]].concat()).unwrap();
    assert!(ok, "bench step --activations f16 failed: {err}");
    let h: serde_json::Value = serde_json::from_str(out16.lines().last().unwrap()).unwrap();
    assert_eq!(h["activations"], "f16");
    let (kept16, kept32) = (h["kept_bytes"].as_u64().unwrap(), r["kept_bytes"].as_u64().unwrap());
    assert!(kept16 < kept32 * 3 / 4, "f16 {kept16} vs f32 {kept32} bytes kept");
    // Bad input is named.
    let (ok, _, err) = run(&["bench", "step", "--model", model.to_str().unwrap(), "--base-dtype", "q3"]).unwrap();
    assert!(!ok && err.contains("q3") && err.contains("q4_1"), "{err}");
}

/// What a run does differently from transformers is said: a model folder whose config.json
/// asks for dropout of its own (GPT-2's 0.1) trains without it, with a note; an explicit
/// packed --base-dtype that some matrices cannot take leaves them f32, with a note.
#[test]
fn train_notes_what_it_does_not_apply() {
    let dir = tmp("notes");
    let model = dir.join("gpt2");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("tiny_gpt2").join(f), model.join(f)).unwrap();
    }
    let mut config = json(&fixture("tiny_gpt2/config.json"));
    config["resid_pdrop"] = serde_json::json!(0.1);
    config["attn_pdrop"] = serde_json::json!(0.05);
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("text.txt"), "To be, or not to be, that is the question.\n".repeat(20)).unwrap();
    let (m, t, o) = (model.to_str().unwrap(), dir.join("text.txt"), dir.join("out"));
    let args = ["train", "--model", m, "--data", t.to_str().unwrap(), "--targets", "c_attn", "--steps", "1"];
    let Some((ok, out, err)) =
        run(&[&args[..], &["--seq", "8", "--base-dtype", "q4_k", "--out", o.to_str().unwrap()]].concat())
    else {
        return;
    };
    assert!(ok, "{out}{err}");
    // Notes are lines of the run's progress (stdout), as the data summary is.
    let said = out + &err;
    assert!(said.contains("note: config.json sets resid_pdrop = 0.1, attn_pdrop = 0.05: transformers"), "{said}");
    assert!(said.contains("note: --base-dtype q4_k: 13 of 13 frozen matrices stay f32"), "{said}");
    std::fs::remove_dir_all(&dir).unwrap();
}
