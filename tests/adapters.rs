//! The five methods against PyTorch + PEFT (tests/fixtures/gen_adapters.py): per-step losses,
//! first-step gradients and the eval loss after training, on tiny GPT-2 and LLaMA models, starting
//! from adapters PEFT wrote. Also: files we write read back identically, merge equals the
//! adapter branch, unmerge restores the base, and LoRA-FA's kept-for-backward bytes.

mod common;

use common::peft::{check_run, check_run_with};
use common::{context, fixture, ids_of, json};
use portalora::adapter::{AdapterConfig, Method};
use portalora::model::load_model;
use portalora::train::{Schedule, TrainConfig, Trainer};

macro_rules! peft_match {
    ($name:ident, $arch:literal, $method:literal) => {
        #[test]
        fn $name() {
            let Some(ctx) = context() else { return };
            check_run(&ctx, $arch, $method);
        }
    };
}

peft_match!(gpt2_lora_matches_peft, "gpt2", "lora");
peft_match!(gpt2_lora_plus_matches_peft, "gpt2", "lora-plus");
peft_match!(gpt2_lora_fa_matches_peft, "gpt2", "lora-fa");
peft_match!(gpt2_lora_fa_projected_matches_peft, "gpt2", "lora-fa-projected");
peft_match!(gpt2_vera_matches_peft, "gpt2", "vera");
peft_match!(gpt2_delta_lora_matches_reference, "gpt2", "delta-lora");
peft_match!(llama_lora_matches_peft, "llama", "lora");
peft_match!(llama_lora_plus_matches_peft, "llama", "lora-plus");
peft_match!(llama_lora_fa_matches_peft, "llama", "lora-fa");
peft_match!(llama_lora_fa_projected_matches_peft, "llama", "lora-fa-projected");
peft_match!(llama_vera_matches_peft, "llama", "vera");
peft_match!(llama_delta_lora_matches_reference, "llama", "delta-lora");
peft_match!(gpt2_lora_sgd_momentum_matches_pytorch, "gpt2", "lora-sgd");
peft_match!(gpt2_dora_matches_peft, "gpt2", "dora");
peft_match!(gpt2_dora_with_dropout_matches_peft, "gpt2", "dora-dropout");
peft_match!(llama_dora_matches_peft, "llama", "dora");
peft_match!(llama_dora_with_dropout_matches_peft, "llama", "dora-dropout");
peft_match!(qwen3_dora_matches_peft, "qwen3", "dora");
peft_match!(llama_dora_with_lora_plus_groups_matches_peft, "llama", "dora-plus");

macro_rules! peft_match_recomputed {
    ($name:ident, $arch:literal, $method:literal) => {
        #[test]
        fn $name() {
            let Some(ctx) = context() else { return };
            check_run_with(&ctx, $arch, $method, true);
        }
    };
}

// LoRA keeps the MLP's input (only gate/up are recomputed); LoRA-FA and VeRA recompute the norm
// before them too.
peft_match_recomputed!(llama_lora_with_the_mlp_recomputed_matches_peft, "llama", "lora");
peft_match_recomputed!(llama_lora_fa_with_the_mlp_recomputed_matches_peft, "llama", "lora-fa");
peft_match_recomputed!(gpt2_lora_fa_with_the_mlp_recomputed_matches_peft, "gpt2", "lora-fa");
peft_match_recomputed!(gpt2_vera_with_the_mlp_recomputed_matches_peft, "gpt2", "vera");

/// Recomputation replays the forward kernels on the same inputs (dropout masks come from their
/// seeds), so training with and without it gives the same bits.
#[test]
fn recomputing_the_mlp_changes_no_bit() {
    let Some(ctx) = context() else { return };
    for arch in ["llama", "gpt2"] {
        let w = load_model(fixture(&format!("tiny_{arch}"))).unwrap();
        let ids = ids_of(&json(&fixture(&format!("tiny_{arch}/expected.json")))["input_ids"]);
        for method in [Method::Lora, Method::LoraFa, Method::Vera] {
            let mut cfg = AdapterConfig::new(method);
            cfg.rank = 3;
            cfg.dropout = 0.1;
            cfg.targets = portalora::adapter::all_targets(w.config.arch);
            let run = |recompute_mlp: bool| {
                let tc = TrainConfig { recompute_mlp, lr: 1e-2, ..TrainConfig::default() };
                let mut tr = Trainer::new(&ctx, &w, ids.len(), ids[0].len(), &cfg, &tc, None).unwrap();
                let losses: Vec<u64> = (0..3).map(|_| tr.train_step(&ctx, &ids).unwrap().loss.to_bits()).collect();
                (losses, tr.gradients(&ctx).unwrap())
            };
            let (plain, recomputed) = (run(false), run(true));
            assert_eq!(plain.0, recomputed.0, "{arch} {method:?}: losses");
            for ((name, a), (_, b)) in plain.1.iter().zip(&recomputed.1) {
                assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{arch} {method:?}: {name}");
            }
        }
    }
}
peft_match!(llama_lora_cosine_schedule_and_clipping_match_pytorch, "llama", "lora-sched");

/// transformers' schedule lambdas at hand-computed points (step index from 0).
#[test]
fn schedules_follow_transformers() {
    let (w, n) = (2, 10);
    assert_eq!(Schedule::Constant.multiplier(0, w, n), 0.0);
    assert_eq!(Schedule::Constant.multiplier(1, w, n), 0.5);
    assert_eq!(Schedule::Constant.multiplier(7, w, n), 1.0);
    assert_eq!(Schedule::Linear.multiplier(2, w, n), 1.0);
    assert!((Schedule::Linear.multiplier(6, w, n) - 0.5).abs() < 1e-12);
    assert_eq!(Schedule::Linear.multiplier(10, w, n), 0.0);
    assert!((Schedule::Cosine.multiplier(6, w, n) - 0.5).abs() < 1e-12);
    assert!((Schedule::Cosine.multiplier(4, w, n) - (0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos()))).abs() < 1e-12);
    assert_eq!(Schedule::Cosine.multiplier(0, 0, n), 1.0);
}
