//! Documents packed into one row (issue 17): each starts at position 0 and attends only within
//! itself, in every attention path, so a packed row's loss and adapter gradients equal the sums
//! over its documents computed alone. Paths: the fused kernels (scalar: the tiny LLaMA's head_dim
//! 6; vec4 with a sliding window: Gemma 3's, without subgroups) and attention as batched matmuls
//! (GPT-2's learned positions and Gemma 3 with subgroups), forward and backward.

mod common;

use common::fixture;
use portalora::adapter::{AdapterConfig, Method};
use portalora::gpu::{Context, ContextOptions};
use portalora::model::{load_model, Weights};
use portalora::rng::Rng;
use portalora::train::{Batch, TrainConfig, Trainer};

/// (mean loss, gradients) of one fresh trainer's first step on one row.
fn first_step(
    ctx: &Context,
    w: &Weights,
    targets: &str,
    ids: &[u32],
    predict: &[bool],
    pos: Option<&[u32]>,
) -> (f64, Vec<(String, Vec<f32>)>) {
    let cfg = AdapterConfig {
        targets: targets.split(',').map(String::from).collect(),
        seed: 7,
        rank: 4,
        ..AdapterConfig::new(Method::Lora)
    };
    let tc = TrainConfig { lr: 0.0, max_grad_norm: 0.0, total_steps: Some(1), ..TrainConfig::default() };
    let mut t = Trainer::new(ctx, w, 1, ids.len(), &cfg, &tc, None).unwrap();
    let (ids, predict) = (vec![ids.to_vec()], vec![predict.to_vec()]);
    let pos = pos.map(|p| vec![p.to_vec()]);
    let st =
        t.train_step_batches(ctx, &[Batch { ids: &ids, predict: Some(&predict), positions: pos.as_deref() }]).unwrap();
    (st.loss, t.gradients(ctx).unwrap())
}

#[test]
fn a_packed_row_equals_its_documents_alone() {
    let Some(ctx) = common::context() else { return };
    let portable =
        pollster::block_on(Context::with_options(ContextOptions { disable_subgroups: true, ..Default::default() }))
            .unwrap();
    let lengths = [5usize, 9, 3, 7];
    for (family, targets) in [
        ("tiny_llama", "q_proj,v_proj,down_proj"),
        ("tiny_gpt2", "c_attn,c_fc"),
        ("tiny_gemma3", "q_proj,k_proj,o_proj"),
    ] {
        let w = load_model(fixture(family)).unwrap();
        let mut rng = Rng::new(31);
        let docs: Vec<Vec<u32>> = lengths
            .iter()
            .map(|&l| (0..l).map(|_| (rng.next_u64() % w.config.vocab_size as u64) as u32).collect())
            .collect();
        let row: Vec<u32> = docs.concat();
        let pos: Vec<u32> = lengths.iter().flat_map(|&l| 0..l as u32).collect();
        let predict: Vec<bool> = pos.iter().map(|&p| p > 0).collect();
        for (name, c) in [("subgroups", &ctx), ("portable", &portable)] {
            let what = format!("{family} ({name})");
            let (loss, grads) = first_step(c, &w, targets, &row, &predict, Some(&pos));
            let n_all: usize = lengths.iter().map(|l| l - 1).sum();
            let mut want_loss = 0.0;
            let mut want_grads: Vec<Vec<f64>> = grads.iter().map(|(_, g)| vec![0.0; g.len()]).collect();
            for d in &docs {
                let p: Vec<bool> = (0..d.len()).map(|i| i > 0).collect();
                let (l, g) = first_step(c, &w, targets, d, &p, None);
                let n = (d.len() - 1) as f64;
                want_loss += l * n;
                for (acc, (_, gd)) in want_grads.iter_mut().zip(&g) {
                    for (a, v) in acc.iter_mut().zip(gd) {
                        *a += *v as f64 * n;
                    }
                }
            }
            let got_loss = loss * n_all as f64;
            assert!(
                (got_loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
                "{what}: loss sum {got_loss} vs {want_loss}"
            );
            for ((name, g), want) in grads.iter().zip(&want_grads) {
                let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
                let err = g.iter().zip(want).map(|(a, b)| (*a as f64 * n_all as f64 - b).abs()).fold(0.0, f64::max);
                assert!(err <= 1e-5 * scale, "{what}: gradient {name}: max error {err:e} (scale {scale:e})");
            }
        }
    }
}

/// transformers on the same packed row (tests/fixtures/gen_packing.py: per-document
/// position_ids and a block-diagonal mask, which agree with the documents run alone): the loss
/// summed over every token but each document's first, on both attention paths.
#[test]
fn a_packed_row_scores_as_transformers_with_position_ids_and_a_block_mask() {
    let Some(ctx) = common::context() else { return };
    let portable =
        pollster::block_on(Context::with_options(ContextOptions { disable_subgroups: true, ..Default::default() }))
            .unwrap();
    let e = common::json(&fixture("packing_expected.json"));
    for case in e["cases"].as_array().unwrap() {
        let family = case["family"].as_str().unwrap();
        let w = load_model(fixture(family)).unwrap();
        let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let pos: Vec<u32> = case["positions"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let predict: Vec<bool> = pos.iter().map(|&p| p > 0).collect();
        let want = case["loss_sum"].as_f64().unwrap();
        for (name, c) in [("subgroups", &ctx), ("portable", &portable)] {
            let model = portalora::model::gpu::GpuModel::new(c, &w, 1, ids.len()).unwrap();
            let (rows, masks, positions) = (vec![ids.clone()], vec![predict.clone()], vec![pos.clone()]);
            let (got, n) =
                pollster::block_on(model.loss_sum_docs_async(c, &rows, Some(&masks), Some(&positions))).unwrap();
            assert_eq!(n as u64, case["targets"].as_u64().unwrap());
            assert!(
                (got - want).abs() <= 1e-4 * want.abs(),
                "{family} ({name}): loss sum {got} vs transformers {want}"
            );
        }
    }
}
