//! The engine inside a browser — headless Chromium's WebGPU (SwiftShader: subgroups of 4, no
//! shader-f16) — run by wasm-bindgen-test (`make test-web`): kernels against the f64 references,
//! and a short LoRA training run whose per-step losses, read back asynchronously, equal PyTorch +
//! PEFT's on the same fixture as the native test (tests/adapters.rs).
#![cfg(target_arch = "wasm32")]

use std::path::Path;

use portalora::adapter::peft::PeftFile;
use portalora::adapter::{AdapterConfig, Method};
use portalora::gpu::{Context, Step};
use portalora::model::weights::load_safetensors_bytes;
use portalora::ops::attention::{attention_forward, AttentionShape};
use portalora::ops::matmul::{matmul, Matmul};
use portalora::reference::{self, max_rel_error, Rng};
use portalora::train::{Batch, TrainConfig, Trainer};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

async fn context() -> Context {
    let ctx =
        Context::new().await.expect("no WebGPU adapter: Chromium needs --enable-unsafe-webgpu (see webdriver.json)");
    let backend = ctx.info().backend.to_lowercase();
    assert!(backend.contains("webgpu"), "expected the browser's WebGPU, got {backend}");
    ctx
}

fn ids_of(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect()
}

#[wasm_bindgen_test]
async fn matmul_and_attention_match_the_references() {
    let ctx = context().await;
    let mut rng = Rng::new(5);
    for (m, k, n) in [(1, 1, 1), (7, 33, 5), (33, 16, 20)] {
        for (ta, tb) in [(false, false), (false, true), (true, false)] {
            let a = rng.vec(m * k);
            let b = rng.vec(k * n);
            let (sa, sb) = (if ta { [k, m] } else { [m, k] }, if tb { [n, k] } else { [k, n] });
            let at = ctx.upload_f32("a", &sa, &a).unwrap();
            let bt = ctx.upload_f32("b", &sb, &b).unwrap();
            let c = ctx.upload_f32("c", &[m, n], &vec![f32::NAN; m * n]).unwrap();
            let mut s = Step::new();
            matmul(&ctx, &mut s, &at, &bt, &c, Matmul { trans_a: ta, trans_b: tb, ..Matmul::nn() }).unwrap();
            ctx.run(&s).unwrap();
            let got = ctx.read(&c).unwrap().await.unwrap();
            let want = reference::matmul(&a, &b, m, k, n, ta, tb);
            assert!(max_rel_error(&got, &want) < 1e-5, "matmul {m}x{k}x{n} ta={ta} tb={tb}");
        }
    }
    for (batch, seq, heads, kv_heads, d) in [(1, 7, 3, 1, 8), (2, 5, 2, 2, 6)] {
        let q = rng.vec(batch * seq * heads * d);
        let k = rng.vec(batch * seq * kv_heads * d);
        let v = rng.vec(batch * seq * kv_heads * d);
        let (want, _) =
            reference::attention_forward(&q, &k, &v, batch, seq, heads, kv_heads, d, 0, 1.0 / (d as f64).sqrt());
        let up = |name: &str, x: &[f32]| ctx.upload_f32(name, &[x.len()], x).unwrap();
        let out = up("out", &vec![f32::NAN; q.len()]);
        let lse = up("lse", &vec![f32::NAN; batch * heads * seq]);
        let shape = AttentionShape::new(batch, seq, heads, kv_heads, d);
        let mut s = Step::new();
        attention_forward(&ctx, &mut s, shape, &up("q", &q), &up("k", &k), &up("v", &v), &out, &lse).unwrap();
        ctx.run(&s).unwrap();
        let got = ctx.read(&out).unwrap().await.unwrap();
        assert!(max_rel_error(&got, &want) < 1e-5, "attention {shape:?}");
    }
}

#[wasm_bindgen_test]
async fn lora_training_matches_peft_in_the_browser() {
    let ctx = context().await;
    let w = load_safetensors_bytes(
        "tiny_gpt2",
        include_str!("fixtures/tiny_gpt2/config.json"),
        &[include_bytes!("fixtures/tiny_gpt2/model.safetensors")],
    )
    .unwrap();
    let e: serde_json::Value = serde_json::from_str(include_str!("fixtures/adapters/gpt2_lora/expected.json")).unwrap();
    let peft = PeftFile::from_bytes(
        Path::new("gpt2_lora/init"),
        include_str!("fixtures/adapters/gpt2_lora/init/adapter_config.json"),
        include_bytes!("fixtures/adapters/gpt2_lora/init/adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = peft.adapter_config(Method::Lora, &AdapterConfig::new(Method::Lora)).unwrap();
    let tc = TrainConfig {
        lr: e["lr"].as_f64().unwrap(),
        weight_decay: e["weight_decay"].as_f64().unwrap(),
        eps: e["eps"].as_f64().unwrap(),
        max_grad_norm: 0.0,
        total_steps: 4,
        // The browser's memory-saving path (the page's plain path is driven by tests/web/e2e.mjs).
        recompute_mlp: true,
        ..TrainConfig::default()
    };
    let ids = ids_of(&e["input_ids"]);
    let mut trainer = Trainer::new(&ctx, &w, ids.len(), ids[0].len(), &cfg, &tc, Some(&peft)).unwrap();
    for (i, want) in e["losses"].as_array().unwrap().iter().enumerate() {
        let want = want.as_f64().unwrap();
        let got = trainer.train_step_async(&ctx, &[Batch { ids: &ids, predict: None }]).await.unwrap().loss;
        assert!((got - want).abs() / want < 1e-4, "step {}: loss {got} vs PEFT {want}", i + 1);
    }
    let eval = trainer.eval_loss_async(&ctx, &ids_of(&e["eval_ids"]), None).await.unwrap();
    let want = e["eval_loss"].as_f64().unwrap();
    assert!((eval - want).abs() / want < 1e-4, "eval loss {eval} vs PEFT {want}");
}
