//! The model's forward pass on the GPU against the f64 CPU reference and transformers' outputs.

mod common;

use common::{fixture, ids_of, json};

use portalora::model::gpu::{GpuModel, GpuModelError, PlanOptions};
use portalora::model::load_model;
use portalora::reference;
use portalora::rng::Rng;

#[test]
fn tiny_llama_forward_matches_reference_and_transformers() {
    check_forward("tiny_llama");
}

#[test]
fn tiny_gpt2_forward_matches_reference_and_transformers() {
    check_forward("tiny_gpt2");
}

fn check_forward(name: &str) {
    let Some(ctx) = common::context() else { return };
    let w = load_model(fixture(name)).unwrap();
    let e = json(&fixture(&format!("{name}/expected.json")));
    let ids: Vec<Vec<u32>> = ids_of(&e["input_ids"]);
    let (b, t) = (ids.len(), ids[0].len());
    let model = GpuModel::new(&ctx, &w, b, t).unwrap();
    ctx.fill_f32(&model.acts.logits, f32::NAN).unwrap();
    let (sum, n) = model.loss_sum(&ctx, &ids).unwrap();
    assert_eq!(n, b * (t - 1));
    let want = e["loss"].as_f64().unwrap();
    let got = sum / n as f64;
    assert!((got - want).abs() <= 1e-4 * want, "GPU loss {got} vs transformers {want}");
    let (ref_loss, _) = reference::model::loss(&w, &ids).unwrap();
    assert!((got - ref_loss).abs() <= 1e-5 * ref_loss, "GPU loss {got} vs reference {ref_loss}");
    let logits = model.last_logits(&ctx).unwrap();
    let want_logits: Vec<f64> = reference::model::forward(&w, &ids).unwrap().into_iter().flatten().flatten().collect();
    let err = reference::max_rel_error(&logits, &want_logits);
    assert!(err <= 1e-5, "logits relative error {err:e}");
}

#[test]
fn chunked_lm_head_gives_the_same_loss() {
    let Some(ctx) = common::context() else { return };
    let w = load_model(fixture("tiny_llama")).unwrap();
    let mut rng = Rng::new(9);
    let (b, t) = (3, 50); // 150 rows: chunks of 64, 64 and 22
    let ids: Vec<Vec<u32>> = (0..b).map(|_| (0..t).map(|_| (rng.next_u64() % 61) as u32).collect()).collect();
    let whole = GpuModel::new(&ctx, &w, b, t).unwrap().loss_sum(&ctx, &ids).unwrap();
    let opts = PlanOptions { logit_chunk_rows: Some(64), ..PlanOptions::default() };
    let chunked = GpuModel::with_options(&ctx, &w, b, t, opts).unwrap();
    assert_eq!(chunked.acts.chunk_rows, 64);
    let parts = chunked.loss_sum(&ctx, &ids).unwrap();
    assert_eq!(whole.1, parts.1);
    assert!((whole.0 - parts.0).abs() <= 1e-5 * whole.0, "{whole:?} vs {parts:?}");
    let (ref_loss, _) = reference::model::loss(&w, &ids).unwrap();
    assert!((parts.0 / parts.1 as f64 - ref_loss).abs() <= 1e-5 * ref_loss);
}

#[test]
fn bad_ids_are_refused_with_their_position() {
    let Some(ctx) = common::context() else { return };
    let w = load_model(fixture("tiny_llama")).unwrap();
    let model = GpuModel::new(&ctx, &w, 2, 4).unwrap();
    let e = model.loss_sum(&ctx, &[vec![1, 2, 3, 4], vec![5, 61, 0, 0]]).unwrap_err();
    assert!(matches!(e, GpuModelError::BadId { id: 61, row: 1, pos: 1, vocab: 61 }), "{e}");
    let e = model.loss_sum(&ctx, &[vec![1, 2, 3]]).unwrap_err();
    assert!(e.to_string().contains("4 tokens") && e.to_string().contains("has 3"), "{e}");
    let e = model.loss_sum(&ctx, &[vec![1; 4], vec![1; 4], vec![1; 4]]).unwrap_err();
    assert!(matches!(e, GpuModelError::BatchSize { .. }), "{e}");
    assert!(matches!(GpuModel::new(&ctx, &w, 1, 65).unwrap_err(), GpuModelError::TooLong { .. }));
}

#[test]
fn smollm2_gguf_loss_on_the_gpu_matches_transformers() {
    let Some(ctx) = common::context() else { return };
    let Some(path) = common::smollm2_path() else { return };
    let w = load_model(&path).unwrap();
    let e = json(&fixture("smollm2_expected.json"));
    let prompt: Vec<u32> = e["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let model = GpuModel::new(&ctx, &w, 1, prompt.len()).unwrap();
    let (sum, n) = model.loss_sum(&ctx, std::slice::from_ref(&prompt)).unwrap();
    let want = e["loss"].as_f64().unwrap();
    assert!((sum / n as f64 - want).abs() <= 1e-4 * want, "GPU loss {} vs transformers {want}", sum / n as f64);
    // The last position's top logit is the first token of transformers' greedy continuation.
    let logits = model.last_logits(&ctx).unwrap();
    let vocab = w.config.vocab_size;
    let last = &logits[(prompt.len() - 1) * vocab..];
    let argmax = last.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
    assert_eq!(argmax as u64, e["greedy_continuation_ids"][0].as_u64().unwrap());
}

#[test]
fn generator_with_kv_cache_matches_the_full_forward() {
    check_generator("tiny_llama");
    check_generator("tiny_gpt2");
}

fn check_generator(name: &str) {
    use portalora::model::generate::Generator;
    use portalora::model::gpu::ParameterTensors;
    let Some(ctx) = common::context() else { return };
    let w = load_model(fixture(name)).unwrap();
    let mut rng = Rng::new(17);
    let vocab = w.config.vocab_size as u64;
    let ids: Vec<u32> = (0..13).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let want = reference::model::forward(&w, std::slice::from_ref(&ids)).unwrap().remove(0);
    let params = ParameterTensors::upload(&ctx, &w).unwrap();
    let mut gen = Generator::new(&ctx, &w.config, &params, 16).unwrap();
    // A prefill of 5 tokens, then one token at a time.
    let got = gen.feed(&ctx, &ids[..5]).unwrap();
    assert!(reference::max_rel_error(&got, &want[4]) <= 1e-5, "{name}: prefill logits");
    for (t, &id) in ids.iter().enumerate().skip(5) {
        let got = gen.feed(&ctx, &[id]).unwrap();
        let err = reference::max_rel_error(&got, &want[t]);
        assert!(err <= 1e-5, "{name}: position {t}: relative error {err:e}");
    }
    let e = gen.feed(&ctx, &[1, 2, 3, 4]).unwrap_err();
    assert!(matches!(e, GpuModelError::TooLong { seq: 17, max: 16 }), "{e}");
}

#[test]
fn sampling_rules() {
    use portalora::model::generate::{sample, Sampling};
    let logits = [0.5f32, 3.0, -1.0, 2.9, 0.0];
    let mut rng = Rng::new(1);
    assert_eq!(sample(&logits, Sampling::default(), &mut rng), 1);
    let top1 = Sampling { temperature: 5.0, top_k: 1, ..Sampling::default() };
    assert!((0..50).all(|_| sample(&logits, top1, &mut rng) == 1));
    let nucleus = Sampling { temperature: 1.0, top_p: 0.3, ..Sampling::default() };
    assert!((0..50).all(|_| sample(&logits, nucleus, &mut rng) == 1));
    let free = Sampling { temperature: 1.0, seed: 7, ..Sampling::default() };
    let draw = |seed| {
        let mut r = Rng::new(seed);
        (0..200).map(|_| sample(&logits, free, &mut r)).collect::<Vec<_>>()
    };
    assert_eq!(draw(7), draw(7), "same seed, same tokens");
    let d = draw(7);
    let count = |t| d.iter().filter(|&&x| x == t).count() as f64 / d.len() as f64;
    // softmax: p(1) ≈ 0.47, p(3) ≈ 0.43, p(2) ≈ 0.01
    assert!(count(1) > 0.3 && count(3) > 0.3 && count(2) < 0.05, "{d:?}");
}

#[test]
fn smollm2_greedy_generation_matches_transformers() {
    use portalora::model::generate::{Generator, Sampling};
    use portalora::model::gpu::ParameterTensors;
    let Some(ctx) = common::context() else { return };
    let Some(path) = common::smollm2_path() else { return };
    let w = load_model(&path).unwrap();
    let e = json(&fixture("smollm2_expected.json"));
    let prompt: Vec<u32> = e["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let want: Vec<u32> =
        e["greedy_continuation_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let params = ParameterTensors::upload(&ctx, &w).unwrap();
    let mut gen = Generator::new(&ctx, &w.config, &params, prompt.len() + want.len()).unwrap();
    let got = gen.generate(&ctx, &prompt, want.len(), Sampling::default(), &[], |_| {}).unwrap();
    assert_eq!(got, want, "transformers continues with {:?}", e["greedy_continuation"]);
}

#[test]
fn tiny_llama_layer_input_gradients_match_transformers() {
    check_gradients("tiny_llama");
}

#[test]
fn tiny_gpt2_layer_input_gradients_match_transformers() {
    check_gradients("tiny_gpt2");
}

fn check_gradients(name: &str) {
    let Some(ctx) = common::context() else { return };
    let w = load_model(fixture(name)).unwrap();
    let e = json(&fixture(&format!("{name}/expected.json")));
    let ids: Vec<Vec<u32>> = ids_of(&e["input_ids"]);
    let (b, t) = (ids.len(), ids[0].len());
    // Every layer's input gradient stays readable after the step (by default the planner lets
    // them share memory two layers apart).
    let opts = PlanOptions { keep_layer_grads: true, backward: true, ..PlanOptions::default() };
    let mut model = GpuModel::with_options(&ctx, &w, b, t, opts).unwrap();
    model.enable_backward(&ctx).unwrap();
    for d in &model.grads.as_ref().unwrap().dx {
        ctx.fill_f32(d, f32::NAN).unwrap();
    }
    let (sum, n) = model.forward_backward(&ctx, &ids).unwrap();
    let want_loss = e["loss"].as_f64().unwrap();
    assert!((sum / n as f64 - want_loss).abs() <= 1e-4 * want_loss);
    let grads = e["layer_input_grads"].as_array().unwrap();
    assert_eq!(grads.len(), w.config.num_layers + 1);
    for (l, want) in grads.iter().enumerate() {
        let want: Vec<f64> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let got = ctx.read_f32(&model.grads.as_ref().unwrap().dx[l]).unwrap();
        let err = reference::max_rel_error(&got, &want);
        assert!(err <= 1e-4, "{name}: d loss / d input of layer {l}: relative error {err:e}");
    }
    // The forward-only step still works alongside and agrees.
    let (sum2, _) = model.loss_sum(&ctx, &ids).unwrap();
    assert!((sum - sum2).abs() <= 1e-6 * sum.abs());
    // A model planned for the forward pass alone shares its layers' activation memory (only the
    // residual streams of neighbouring layers are live together) and gives the same loss.
    let inference = GpuModel::new(&ctx, &w, b, t).unwrap();
    let (sum3, _) = inference.loss_sum(&ctx, &ids).unwrap();
    assert_eq!(sum3.to_bits(), sum2.to_bits());
    let (planned, unshared) = (inference.acts.planned_bytes, inference.acts.unshared_bytes);
    assert!(planned < model.acts.planned_bytes, "{name}: {planned} vs training's {}", model.acts.planned_bytes);
    assert!(planned < unshared, "{name}: {planned} of {unshared}");
}

/// Vocabulary tables larger than one storage binding are split into parts of rows; here the split
/// is forced on the tiny models and must not change the loss, the gradients or generation.
#[test]
fn split_vocabulary_tables_give_the_same_results() {
    use portalora::model::generate::Generator;
    use portalora::model::gpu::ParameterTensors;
    let Some(ctx) = common::context() else { return };
    for name in ["tiny_llama", "tiny_gpt2"] {
        let w = load_model(fixture(name)).unwrap();
        let e = json(&fixture(&format!("{name}/expected.json")));
        let ids: Vec<Vec<u32>> = ids_of(&e["input_ids"]);
        let (b, t) = (ids.len(), ids[0].len());
        let keep = PlanOptions { keep_layer_grads: true, ..PlanOptions::default() };
        let mut whole = GpuModel::with_options(&ctx, &w, b, t, keep.clone()).unwrap();
        let opts = PlanOptions { table_part_rows: Some(16), ..keep };
        let mut split = GpuModel::with_options(&ctx, &w, b, t, opts).unwrap();
        let align_rows = ctx.limits().storage_offset_alignment as usize / 4;
        if align_rows <= 16 {
            assert!(split.params.embed.parts.len() > 1, "{name}: the table should be split");
        }
        let (l1, _) = whole.forward_backward(&ctx, &ids).unwrap();
        let (l2, _) = split.forward_backward(&ctx, &ids).unwrap();
        assert!((l1 - l2).abs() <= 1e-5 * l1, "{name}: loss {l1} vs split {l2}");
        for l in 0..=w.config.num_layers {
            let g1 = ctx.read_f32(&whole.grads.as_ref().unwrap().dx[l]).unwrap();
            let g2 = ctx.read_f32(&split.grads.as_ref().unwrap().dx[l]).unwrap();
            let want: Vec<f64> = g1.iter().map(|&v| v as f64).collect();
            assert!(reference::max_rel_error(&g2, &want) <= 1e-5, "{name}: gradient of layer {l}");
        }
        let params = ParameterTensors::upload_with(&ctx, &w, Some(16)).unwrap();
        let mut gen = Generator::new(&ctx, &w.config, &params, t).unwrap();
        let got = gen.feed(&ctx, &ids[0]).unwrap();
        let want = &reference::model::forward(&w, &ids[..1]).unwrap()[0][t - 1];
        assert!(reference::max_rel_error(&got, want) <= 1e-5, "{name}: generation logits");
    }
}
