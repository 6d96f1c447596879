//! Memory plans come from traces of the steps (gpu::plan): the checker walks every recorded
//! step of every family × method × --recompute-mlp × --activations f16 and finds no read of memory another tensor
//! overwrote; and it does find such reads in steps recorded over a deliberately wrong plan.

mod common;

use common::{context, fixture};
use portalora::adapter::{all_targets, AdapterConfig, Method};
use portalora::gpu::plan::{check, Planner};
use portalora::gpu::{DType, Step};
use portalora::model::load_model;
use portalora::ops::elementwise::{add_forward, scale_forward};
use portalora::train::{TrainConfig, Trainer};

const MODELS: [&str; 7] =
    ["tiny_llama", "tiny_gpt2", "tiny_qwen2", "tiny_qwen3", "tiny_llama3", "tiny_gemma3", "tiny_mistral"];
const METHODS: [Method; 6] = Method::ALL;

#[test]
fn every_recorded_step_of_every_family_method_and_memory_setting_reads_only_its_own_memory() {
    let Some(ctx) = context() else { return };
    for name in MODELS {
        let w = load_model(fixture(name)).unwrap();
        for method in METHODS {
            for (recompute, f16) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut a = AdapterConfig::new(method);
                (a.rank, a.targets, a.dropout) = (4, all_targets(w.config.arch), 0.1);
                if method == Method::DeltaLora {
                    (a.dropout, a.delta_warmup) = (0.0, 0);
                }
                let cfg = TrainConfig { recompute_mlp: recompute, activations_f16: f16, ..TrainConfig::default() };
                let what = format!("{name} {method:?} recompute {recompute} f16 {f16}");
                let t = Trainer::new(&ctx, &w, 2, 24, &a, &cfg, None).unwrap_or_else(|e| panic!("{what}: {e}"));
                let names = ["train", "loss copy", "update", "clip copy", "after-step"];
                let training: Vec<(&str, &Step)> = names.into_iter().zip(t.recorded_steps()).collect();
                check(&training).unwrap_or_else(|e| panic!("{what}: {e}"));
                check(&[("forward", t.model.forward_step())]).unwrap_or_else(|e| panic!("{what}: {e}"));
                let acts = &t.model.acts;
                assert!(acts.planned_bytes < acts.unshared_bytes * 3 / 4, "{what}: the plan shares little");
                assert!(acts.kept_bytes > 0 && acts.kept_bytes < acts.planned_bytes, "{what}: kept bytes");
            }
        }
    }
}

#[test]
fn the_checker_finds_a_read_of_memory_another_tensor_overwrote() {
    let Some(ctx) = context() else { return };
    let input = ctx.upload_f32("input", &[64], &[1.0; 64]).unwrap();
    let out = ctx.tensor("out", &[64], DType::F32).unwrap();
    // A plan told that `a` dies before `b` is born, for a step that reads `a` after writing `b`.
    let plan = |first_read_of_a_after_b: bool| {
        let mut p = Planner::new();
        let (ia, ib) = (p.add("a", &[64], DType::F32), p.add("b", &[64], DType::F32));
        let t = p.stand_ins(&ctx).unwrap();
        let mut told = Step::trace();
        scale_forward(&ctx, &mut told, &input, 2.0, &t[ia]).unwrap();
        scale_forward(&ctx, &mut told, &input, 3.0, &t[ib]).unwrap();
        add_forward(&ctx, &mut told, &t[ib], &input, &out).unwrap();
        let planned = p.allocate(&ctx, &[&told], &[]).unwrap();
        let (a, b) = (planned.get(ia), planned.get(ib));
        assert!(a.overlaps(&b), "the plan lets a and b share");
        let mut s = Step::new();
        if first_read_of_a_after_b {
            scale_forward(&ctx, &mut s, &input, 2.0, &a).unwrap();
            scale_forward(&ctx, &mut s, &input, 3.0, &b).unwrap();
            add_forward(&ctx, &mut s, &a, &input, &out).unwrap();
        } else {
            // `a` read before it is written: on replay it holds what `b` left there.
            add_forward(&ctx, &mut s, &a, &input, &out).unwrap();
            scale_forward(&ctx, &mut s, &input, 2.0, &a).unwrap();
            scale_forward(&ctx, &mut s, &input, 3.0, &b).unwrap();
        }
        check(&[("step", &s)])
    };
    let err = plan(true).unwrap_err();
    assert!(
        err.contains("step dispatch 2") && err.contains("\"a\"") && err.contains("\"b\" at step dispatch 1"),
        "{err}"
    );
    let err = plan(false).unwrap_err();
    assert!(err.contains("replayed") && err.contains("\"a\""), "{err}");
    // The same steps over the plan the traces give pass.
    let mut p = Planner::new();
    let (ia, ib) = (p.add("a", &[64], DType::F32), p.add("b", &[64], DType::F32));
    let t = p.stand_ins(&ctx).unwrap();
    let record = |s: &mut Step, a: &portalora::gpu::Tensor, b: &portalora::gpu::Tensor| {
        scale_forward(&ctx, s, &input, 2.0, a).unwrap();
        scale_forward(&ctx, s, &input, 3.0, b).unwrap();
        add_forward(&ctx, s, a, b, &out).unwrap();
    };
    let mut trace = Step::trace();
    record(&mut trace, &t[ia], &t[ib]);
    let planned = p.allocate(&ctx, &[&trace], &[]).unwrap();
    assert!(!planned.get(ia).overlaps(&planned.get(ib)));
    let mut s = Step::new();
    record(&mut s, &planned.get(ia), &planned.get(ib));
    check(&[("step", &s)]).unwrap();
    assert!(ctx.run(&trace).is_err(), "a trace cannot run");
}
