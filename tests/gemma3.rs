//! Gemma-3-270M from PyPI (scripts/fetch-assets; skipped without it, failing under
//! PORTALORA_REQUIRE_ASSETS=1), end to end against transformers loading the same Q4_K_M GGUF
//! (tests/fixtures/gen_gemma3_270m.py): the loss and logits of a prompt and of a Hamlet excerpt,
//! greedy generation with the base kept quantized on the GPU, and a short LoRA run that learns.

mod common;

use common::{context, fixture, gemma3_path, json, tmp};
use portalora::adapter::{AdapterConfig, Method};
use portalora::finetune::{run, RunConfig};
use portalora::model::generate::{Generator, Sampling};
use portalora::model::gpu::{BaseDType, GpuModel, ParameterTensors};
use portalora::model::load_model;
use portalora::train::TrainConfig;

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()
}

#[test]
fn gemma3_270m_prompt_loss_and_logits_match_transformers() {
    let Some(ctx) = context() else { return };
    let Some(path) = gemma3_path() else { return };
    let w = load_model(&path).unwrap();
    let e = json(&fixture("gemma3_270m_expected.json"));
    let prompt = ids(&e["prompt_ids"]);
    let model = GpuModel::new(&ctx, &w, 1, prompt.len()).unwrap();
    ctx.fill_f32(&model.acts.logits, f32::NAN).unwrap();
    let (sum, n) = model.loss_sum(&ctx, std::slice::from_ref(&prompt)).unwrap();
    let want = e["loss"].as_f64().unwrap();
    assert!((sum / n as f64 - want).abs() <= 1e-4 * want, "loss {} vs transformers {want}", sum / n as f64);
    let vocab = w.config.vocab_size;
    let logits = model.last_logits(&ctx).unwrap();
    let last = &logits[(prompt.len() - 1) * vocab..];
    let head: Vec<f64> = e["last_logits_head"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let scale = head.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = last.iter().zip(&head).fold(0.0f64, |m, (g, w)| m.max((*g as f64 - w).abs() / scale));
    assert!(err <= 1e-4, "last-position logits: relative error {err:e}");
    for t in e["last_logits_top"].as_array().unwrap() {
        let (id, want) = (t["id"].as_u64().unwrap() as usize, t["logit"].as_f64().unwrap());
        assert!((last[id] as f64 - want).abs() <= 1e-4 * want.abs().max(1.0), "logit {id}: {} vs {want}", last[id]);
    }
}

#[test]
fn gemma3_270m_eval_of_a_hamlet_excerpt_matches_transformers() {
    let Some(path) = gemma3_path() else { return };
    let out = common::bin()
        .args(["eval", "--model", path.to_str().unwrap(), "--seq", "128", "--json", "--data"])
        .arg(fixture("hamlet_excerpt.txt"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let got: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let e = json(&fixture("gemma3_270m_expected.json"));
    let (loss, want) = (got["loss"].as_f64().unwrap(), e["excerpt_loss"].as_f64().unwrap());
    assert!((loss - want).abs() <= 1e-4 * want, "eval loss {loss} vs transformers {want}");
    // 7 rows of 128, BOS never a target: 7 · 127 positions.
    assert_eq!(got["tokens"].as_u64(), Some(e["excerpt_rows"].as_u64().unwrap() * 127));
}

#[test]
fn gemma3_270m_generates_transformers_greedy_tokens_from_its_quantized_base() {
    let Some(ctx) = context() else { return };
    let Some(path) = gemma3_path() else { return };
    let w = load_model(&path).unwrap();
    let e = json(&fixture("gemma3_270m_expected.json"));
    let (prompt, want) = (ids(&e["prompt_ids"]), ids(&e["greedy_continuation_ids"]));
    // As stored: Q8_0, Q5_0, Q4_K and Q6_K matrices read by the kernels (where subgroups exist).
    let params = ParameterTensors::upload_as(&ctx, &w, None, BaseDType::Auto).unwrap();
    let mut gen = Generator::new(&ctx, &w.config, &params, prompt.len() + want.len()).unwrap();
    let got = gen.generate(&ctx, &prompt, want.len(), Sampling::default(), &[], |_| {}).unwrap();
    assert_eq!(got, want, "transformers continues with {:?}", e["greedy_continuation"]);
}

#[test]
fn a_short_lora_run_on_gemma3_270m_lowers_its_loss() {
    let Some(ctx) = context() else { return };
    let Some(path) = gemma3_path() else { return };
    let dir = tmp("gemma3-run");
    let mut cfg = RunConfig::new(path, dir.join("out"));
    cfg.data = Some(fixture("hamlet_excerpt.txt"));
    cfg.adapter =
        AdapterConfig { rank: 8, alpha: 16.0, targets: vec!["all-linear".into()], ..AdapterConfig::new(Method::Lora) };
    cfg.train = TrainConfig { lr: 1e-3, ..TrainConfig::default() };
    (cfg.batch, cfg.seq, cfg.steps, cfg.val_fraction, cfg.eval_every) = (2, 128, Some(6), 0.3, 0);
    let s = run(&ctx, &cfg, false, &mut |_| {}).unwrap();
    let (before, after) = (s.val_before.unwrap(), s.val_after.unwrap());
    assert!(after < before - 0.05, "validation loss {before} → {after}");
    let first = s.train_loss.first().unwrap().1;
    let last = s.train_loss.last().unwrap().1;
    assert!(last < first, "training loss {first} → {last}");
    std::fs::remove_dir_all(&dir).unwrap();
}
