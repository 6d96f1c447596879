//! Training runs checked against PyTorch + PEFT fixtures (tests/fixtures/gen_adapters.py):
//! per-step losses, first-step gradients and the eval loss after training.

use std::collections::BTreeMap;

use super::{fixture, ids_of, json};
use portalora::adapter::peft::PeftFile;
use portalora::adapter::{AdapterConfig, Method};
use portalora::gpu::Context;
use portalora::model::load_model;
use portalora::train::{OptimizerKind, TrainConfig, Trainer};

pub const TOL: f64 = 1e-4;

pub fn rel(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(1e-12)
}

/// The settings of a fixture run as our configs.
fn configs(e: &serde_json::Value, peft: &PeftFile) -> (AdapterConfig, TrainConfig) {
    let method: Method = e["method"].as_str().unwrap().parse().unwrap();
    let mut base = AdapterConfig::new(method);
    base.lorafa_projected = e["projected"].as_bool().unwrap();
    base.delta_lambda = e["delta_lambda"].as_f64().unwrap();
    base.delta_warmup = e["delta_warmup"].as_u64().unwrap();
    let cfg = peft.adapter_config(method, &base).unwrap();
    let tc = TrainConfig {
        optimizer: if e["optimizer"] == "sgd" { OptimizerKind::Sgd } else { OptimizerKind::AdamW },
        lr: e["lr"].as_f64().unwrap(),
        weight_decay: e["weight_decay"].as_f64().unwrap(),
        eps: e["eps"].as_f64().unwrap(),
        momentum: e["momentum"].as_f64().unwrap(),
        lr_ratio: e["lr_ratio"].as_f64().unwrap(),
        max_grad_norm: e["max_grad_norm"].as_f64().unwrap(),
        schedule: e["schedule"].as_str().unwrap().parse().unwrap(),
        warmup_steps: e["warmup_steps"].as_u64().unwrap(),
        total_steps: e["total_steps"].as_u64(),
        lora_plus: e["lora_plus"].as_bool().unwrap_or(false),
        ..TrainConfig::default()
    };
    (cfg, tc)
}

/// Our gradients with row parts (GPT-2 c_attn's q/k/v thirds) joined under PEFT's names.
fn joined(grads: Vec<(String, Vec<f32>)>) -> BTreeMap<String, Vec<f32>> {
    let mut out: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for (name, g) in grads {
        let key = name.split("[part").next().unwrap().to_string();
        out.entry(key).or_default().extend(g);
    }
    out
}

pub fn check_run(ctx: &Context, arch: &str, method: &str) {
    check_run_with(ctx, arch, method, false)
}

/// With `recompute_mlp`, the MLP's up-projections are recomputed in backward (activation
/// checkpointing) instead of kept: PEFT's figures must not notice.
pub fn check_run_with(ctx: &Context, arch: &str, method: &str, recompute_mlp: bool) {
    let tc = TrainConfig { recompute_mlp, ..TrainConfig::default() };
    check_run_within(ctx, arch, method, &tc, TOL)
}

/// [`check_run_with`] with `plan`'s memory settings (recompute_mlp, activations_f16) and every
/// figure within `tol`.
pub fn check_run_within(ctx: &Context, arch: &str, method: &str, plan: &TrainConfig, tol: f64) {
    let dir = fixture(&format!("adapters/{arch}_{method}"));
    let e = json(&dir.join("expected.json"));
    let w = load_model(fixture(&format!("tiny_{arch}"))).unwrap();
    let peft = PeftFile::read(&dir.join("init")).unwrap();
    let (cfg, mut tc) = configs(&e, &peft);
    (tc.recompute_mlp, tc.activations_f16) = (plan.recompute_mlp, plan.activations_f16);
    let ids = ids_of(&e["input_ids"]);
    let mut trainer = Trainer::new(ctx, &w, ids.len(), ids[0].len(), &cfg, &tc, Some(&peft)).unwrap();
    let want_losses: Vec<f64> = e["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    for (i, want) in want_losses.iter().enumerate() {
        let stats = trainer.train_step(ctx, &ids).unwrap();
        assert!(rel(stats.loss, *want) < tol, "{arch} {method} step {}: loss {} vs PEFT {want}", i + 1, stats.loss);
        if i == 0 {
            let got = joined(trainer.gradients(ctx).unwrap());
            let want = e["grads"].as_object().unwrap();
            assert_eq!(got.len(), want.len(), "{arch} {method}: gradient tensors {:?}", got.keys());
            for (name, wg) in want {
                let wg: Vec<f64> = wg.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                let g = got.get(name).unwrap_or_else(|| panic!("{arch} {method}: no gradient for {name}"));
                assert_eq!(g.len(), wg.len(), "{name}");
                let err = portalora::reference::max_rel_error(g, &wg);
                assert!(err < tol, "{arch} {method} gradient {name}: max rel error {err:.2e}");
            }
        }
    }
    let eval = trainer.eval_loss(ctx, &ids_of(&e["eval_ids"])).unwrap();
    let want = e["eval_loss"].as_f64().unwrap();
    assert!(rel(eval, want) < tol, "{arch} {method}: eval loss after training {eval} vs PEFT {want}");
}
