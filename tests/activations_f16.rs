//! `--activations f16`: what a layer's backward pass reads of its forward pass kept as half floats
//! in between. Checked against PyTorch + PEFT (tests/fixtures/gen_adapters.py) within what f16's
//! rounding of the kept activations moves (every family, several methods), against our own f32
//! path (the forward pass and the first loss unchanged to the bit, the kept bytes about halved,
//! recomputation combined), and with an activation past f16's range, which must stop a run as a
//! non-finite gradient instead of training on a clipped value.

mod common;

use common::peft::check_run_within;
use common::{context, fixture, ids_of, json};
use portalora::adapter::{AdapterConfig, Method};
use portalora::model::load_model;
use portalora::train::{TrainConfig, Trainer};

/// f16 keeps 11 significant bits (relative rounding ≤ 2^-11 ≈ 4.9e-4 per kept value); through
/// a few layers' backward passes the gradients move by about that much, far below what a wrong
/// tensor would move them (measured: 3.8e-4 to 9.8e-4, Gemma 3 4.2e-3, where the scaled
/// embeddings and four norms per layer put larger values through the rounding).
const F16_TOL: f64 = 5e-3;

macro_rules! peft_within_f16 {
    ($name:ident, $arch:literal, $method:literal) => {
        #[test]
        fn $name() {
            let Some(ctx) = context() else { return };
            let plan = TrainConfig { activations_f16: true, ..TrainConfig::default() };
            check_run_within(&ctx, $arch, $method, &plan, F16_TOL);
        }
    };
}

peft_within_f16!(gpt2_lora_with_f16_activations_matches_peft, "gpt2", "lora");
peft_within_f16!(llama_lora_with_f16_activations_matches_peft, "llama", "lora");
peft_within_f16!(llama_vera_with_f16_activations_matches_peft, "llama", "vera");
peft_within_f16!(llama3_lora_fa_with_f16_activations_matches_peft, "llama3", "lora-fa");
peft_within_f16!(qwen3_lora_with_f16_activations_matches_peft, "qwen3", "lora");
peft_within_f16!(gemma3_lora_with_f16_activations_matches_peft, "gemma3", "lora");
peft_within_f16!(mistral_delta_lora_with_f16_activations_matches_peft, "mistral", "delta-lora");

/// Losses, gradients, (kept bytes, f32 bytes kept as f16).
type Outcome = (Vec<f64>, Vec<(String, Vec<f32>)>, (u64, u64));

/// A run of three steps (all projections, dropout) with or without f16 activations (and
/// recomputation): the losses, the gradients after them, the model's kept bytes and the f32
/// bytes of what it keeps as f16.
fn run(arch: &str, method: Method, f16: bool, recompute_mlp: bool) -> Outcome {
    let ctx = context().unwrap();
    let w = load_model(fixture(&format!("tiny_{arch}"))).unwrap();
    let ids = ids_of(&json(&fixture(&format!("tiny_{arch}/expected.json")))["input_ids"]);
    let mut cfg = AdapterConfig::new(method);
    cfg.rank = 3;
    cfg.dropout = 0.1;
    cfg.targets = portalora::adapter::all_targets(w.config.arch);
    let tc = TrainConfig { activations_f16: f16, recompute_mlp, lr: 1e-2, ..TrainConfig::default() };
    let mut tr = Trainer::new(&ctx, &w, ids.len(), ids[0].len(), &cfg, &tc, None).unwrap();
    let losses = (0..3).map(|_| tr.train_step(&ctx, &ids).unwrap().loss).collect();
    let packed: u64 = tr.model.acts.halves.iter().flat_map(|h| &h.kept).map(|(f, _, _)| f.byte_len()).sum();
    (losses, tr.gradients(&ctx).unwrap(), (tr.model.acts.kept_bytes, packed))
}

/// The forward pass is the f32 one (the first loss to the bit); the kept bytes are about half;
/// the gradients move by f16's rounding and no more; recomputing the MLP combines with it.
#[test]
fn f16_activations_halve_the_kept_bytes_and_round_only_the_backward_pass() {
    if context().is_none() {
        return;
    }
    for arch in ["llama", "gpt2", "gemma3"] {
        let cases = [(Method::Lora, false), (Method::Vera, false), (Method::Lora, true), (Method::Dora, false)];
        for (method, recompute) in cases {
            let what = format!("{arch} {method:?} recompute {recompute}");
            let (l32, g32, (kept32, none)) = run(arch, method, false, recompute);
            let (l16, g16, (kept16, packed)) = run(arch, method, true, recompute);
            assert_eq!(none, 0, "{what}");
            // Each kept tensor's f32 bytes become half as many, and nothing else changes.
            assert_eq!(kept16, kept32 - packed / 2, "{what}: kept bytes");
            assert_eq!(l32[0].to_bits(), l16[0].to_bits(), "{what}: the first loss");
            for (a, b) in l32.iter().zip(&l16) {
                assert!((a - b).abs() <= 1e-3 * a.abs(), "{what}: losses {l32:?} vs {l16:?}");
            }
            // The layers' statistics (rstd, log-sum-exps) stay f32, as does the last residual:
            // a large share of so tiny a model (hidden size 30).
            let ratio = kept16 as f64 / kept32 as f64;
            assert!((0.5..0.7).contains(&ratio), "{what}: kept bytes {kept16} vs {kept32} ({ratio:.3})");
            let mut moved = 0.0f64;
            for ((name, a), (_, b)) in g32.iter().zip(&g16) {
                let want: Vec<f64> = a.iter().map(|&v| v as f64).collect();
                let err = portalora::reference::max_rel_error(b, &want);
                assert!(err < 2.0 * F16_TOL, "{what}: gradient {name} moved by {err:.2e}");
                moved = moved.max(err);
            }
            assert!(moved > 1e-6, "{what}: no gradient moved at all: nothing was kept as f16");
        }
    }
}

/// An activation past f16's range (here the first MLP's up-projection, its weight scaled by
/// 10⁶) becomes Inf in its f16 copy: the step's gradient check names a non-finite gradient,
/// where the f32 run stays finite.
#[test]
fn an_activation_past_f16_range_stops_the_step_as_non_finite() {
    let Some(ctx) = context() else { return };
    let mut w = load_model(fixture("tiny_llama")).unwrap();
    let up = w.tensors.get_mut("model.layers.0.mlp.up_proj.weight").unwrap();
    up.data.iter_mut().for_each(|v| *v *= 1e6);
    let ids = ids_of(&json(&fixture("tiny_llama/expected.json"))["input_ids"]);
    let mut cfg = AdapterConfig::new(Method::Lora);
    cfg.rank = 4;
    cfg.targets = portalora::adapter::all_targets(w.config.arch);
    for f16 in [false, true] {
        let tc = TrainConfig { activations_f16: f16, ..TrainConfig::default() };
        let mut tr = Trainer::new(&ctx, &w, ids.len(), ids[0].len(), &cfg, &tc, None).unwrap();
        let stats = tr.train_step(&ctx, &ids).unwrap();
        assert!(stats.loss.is_finite(), "f16 {f16}: the forward pass is f32: loss {}", stats.loss);
        assert_eq!(stats.nonfinite_grad.is_some(), f16, "f16 {f16}: {stats:?}");
    }
}

/// The run's error says what to do when f16 activations are the likely cause.
#[test]
fn a_run_stopped_by_an_f16_overflow_says_to_use_f32_activations() {
    let Some(ctx) = context() else { return };
    let dir = common::tmp("f16_overflow");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(fixture("tiny_llama/config.json"), model.join("config.json")).unwrap();
    let bytes = std::fs::read(fixture("tiny_llama/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let mut data = view.data().to_vec();
            if name == "model.layers.0.mlp.up_proj.weight" {
                for c in data.chunks_exact_mut(4) {
                    let v = f32::from_le_bytes((&*c).try_into().unwrap()) * 1e6;
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
            (name, view.shape().to_vec(), data)
        })
        .collect();
    let views = owned.iter().map(|(n, s, d)| {
        (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
    });
    std::fs::write(model.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    let ids = dir.join("ids.json");
    std::fs::write(
        &ids,
        serde_json::json!({ "input_ids": json(&fixture("tiny_llama/expected.json"))["input_ids"] }).to_string(),
    )
    .unwrap();
    let mut cfg = portalora::finetune::RunConfig::new(&model, dir.join("out"));
    cfg.ids = Some(ids);
    cfg.adapter = AdapterConfig { rank: 4, targets: vec!["up_proj".into()], ..AdapterConfig::new(Method::Lora) };
    cfg.train = TrainConfig { activations_f16: true, ..TrainConfig::default() };
    cfg.steps = Some(2);
    let err = portalora::finetune::run(&ctx, &cfg, false, &mut |_| {}).expect_err("Inf gradients").to_string();
    assert!(err.contains("the gradient of") && err.contains("try --activations f32"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
