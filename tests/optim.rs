//! AdamW and SGD steps on the GPU against PyTorch's optimizers on the same gradients
//! (tests/fixtures/gen_optim.py), replaying one recorded step with new per-step values.

mod common;

use common::{fixture, json};
use portalora::gpu::{Context, DType, Step, Tensor};
use portalora::ops::optim::{adamw_step, sgd_step, AdamW, Hyper, Sgd};
use portalora::reference::max_rel_error;

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

struct Run {
    hyper: Tensor,
    grad: Tensor,
    param: Tensor,
    step: Step,
}

fn setup(ctx: &Context, kind: &str, init: &[f32], clip: f32) -> Run {
    let n = init.len();
    let hyper = ctx.tensor("hyper", &[Hyper::FLOATS], DType::F32).unwrap();
    let clip = ctx.upload_f32("clip", &[2], &[clip, 0.0]).unwrap();
    let grad = ctx.tensor("grad", &[n], DType::F32).unwrap();
    let param = ctx.upload_f32("param", &[n], init).unwrap();
    let m = ctx.tensor("m", &[n], DType::F32).unwrap();
    let v = ctx.tensor("v", &[n], DType::F32).unwrap();
    ctx.fill_f32(&m, f32::NAN).unwrap(); // must be ignored on the first step of SGD...
    if kind == "adamw" {
        ctx.fill_f32(&m, 0.0).unwrap(); // ...while AdamW's moments start at zero.
        ctx.fill_f32(&v, 0.0).unwrap();
    }
    let mut step = Step::new();
    if kind == "adamw" {
        adamw_step(ctx, &mut step, &hyper, &clip, &grad, &param, &m, &v).unwrap();
    } else {
        sgd_step(ctx, &mut step, &hyper, &clip, &grad, &param, &m).unwrap();
    }
    Run { hyper, grad, param, step }
}

fn hyper_of(kind: &str, hp: &serde_json::Value, t: u64) -> Vec<f32> {
    let f = |k: &str| hp[k].as_f64().unwrap();
    if kind == "adamw" {
        let betas = hp["betas"].as_array().unwrap();
        let a = AdamW {
            lr: f("lr"),
            beta1: betas[0].as_f64().unwrap(),
            beta2: betas[1].as_f64().unwrap(),
            eps: f("eps"),
            weight_decay: f("weight_decay"),
        };
        a.hyper(t).to_f32s()
    } else {
        Sgd { lr: f("lr"), momentum: f("momentum"), weight_decay: f("weight_decay") }.hyper(t).to_f32s()
    }
}

#[test]
fn optimizers_match_pytorch() {
    let Some(ctx) = common::context() else { return };
    let cases = json(&fixture("optim_expected.json"));
    for case in cases.as_array().unwrap() {
        let kind = case["kind"].as_str().unwrap();
        let init = floats(&case["init"]);
        let run = setup(&ctx, kind, &init, 1.0);
        for (t, (g, want)) in
            case["grads"].as_array().unwrap().iter().zip(case["params"].as_array().unwrap()).enumerate()
        {
            ctx.write_f32(&run.grad, &floats(g)).unwrap();
            ctx.write_f32(&run.hyper, &hyper_of(kind, &case["hp"], t as u64 + 1)).unwrap();
            ctx.run(&run.step).unwrap();
            let want: Vec<f64> = want.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let err = max_rel_error(&ctx.read_f32(&run.param).unwrap(), &want);
            assert!(err <= 1e-5, "{kind} {:?} n={} step {}: relative error {err:e}", case["hp"], init.len(), t + 1);
        }
    }
}

#[test]
fn gradient_scale_multiplies_the_gradient() {
    let Some(ctx) = common::context() else { return };
    let cases = json(&fixture("optim_expected.json"));
    for case in cases.as_array().unwrap() {
        let kind = case["kind"].as_str().unwrap();
        let init = floats(&case["init"]);
        let (halved, scaled) = (setup(&ctx, kind, &init, 1.0), setup(&ctx, kind, &init, 0.5));
        for (t, g) in case["grads"].as_array().unwrap().iter().enumerate() {
            let g = floats(g);
            ctx.write_f32(&halved.grad, &g.iter().map(|v| v * 0.5).collect::<Vec<_>>()).unwrap();
            ctx.write_f32(&scaled.grad, &g).unwrap();
            for r in [&halved, &scaled] {
                ctx.write_f32(&r.hyper, &hyper_of(kind, &case["hp"], t as u64 + 1)).unwrap();
                ctx.run(&r.step).unwrap();
            }
        }
        let want: Vec<f64> = ctx.read_f32(&halved.param).unwrap().iter().map(|&v| v as f64).collect();
        assert!(max_rel_error(&ctx.read_f32(&scaled.param).unwrap(), &want) <= 1e-6, "{kind}");
    }
}

#[test]
fn global_norm_clipping_matches_reference() {
    use portalora::ops::optim::{grad_norm_clip, grad_norm_partials};
    use portalora::rng::Rng;
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(8);
    let sizes = [1usize, 7, 4096, 4097, 33, 70_001];
    let data: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n)).collect();
    let grads: Vec<Tensor> = data.iter().map(|d| ctx.upload_f32("g", &[d.len()], d).unwrap()).collect();
    let refs: Vec<&Tensor> = grads.iter().collect();
    let partials = ctx.tensor("partials", &[grad_norm_partials(&refs)], DType::F32).unwrap();
    let norm: f64 = data.iter().flatten().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    for max_norm in [0.0f32, 1.0, 1e6] {
        let clip = ctx.tensor("clip", &[2], DType::F32).unwrap();
        ctx.fill_f32(&clip, f32::NAN).unwrap();
        let mut step = Step::new();
        grad_norm_clip(&ctx, &mut step, &refs, &partials, max_norm, &clip).unwrap();
        ctx.run(&step).unwrap();
        let got = ctx.read_f32(&clip).unwrap();
        let want_scale = if max_norm > 0.0 { (max_norm as f64 / (norm + 1e-6)).min(1.0) } else { 1.0 };
        assert!((got[1] as f64 - norm).abs() <= 1e-5 * norm, "norm {} vs {norm}", got[1]);
        assert!((got[0] as f64 - want_scale).abs() <= 1e-5, "max_norm {max_norm}: scale {} vs {want_scale}", got[0]);
        // Bit-reproducible.
        ctx.run(&step).unwrap();
        assert_eq!(ctx.read_f32(&clip).unwrap(), got);
    }
}

#[test]
fn a_nan_or_inf_gradient_is_found_and_attributed_on_the_gpu() {
    use portalora::ops::optim::{grad_norm_clip, grad_norm_partials, partial_owner};
    use portalora::rng::Rng;
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(9);
    let sizes = [1usize, 7, 4097, 33, 70_001, 129];
    for (bad_tensor, bad_at, value) in [
        (None, 0, 0.0),
        (Some(0usize), 0usize, f32::NAN),
        (Some(2), 4096, f32::INFINITY),
        (Some(4), 65_000, f32::NEG_INFINITY),
        (Some(5), 128, f32::NAN),
    ] {
        let mut data: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n)).collect();
        if let Some(t) = bad_tensor {
            data[t][bad_at] = value;
            // A later tensor too: the first one must be reported.
            if t + 1 < data.len() {
                data[t + 1][0] = f32::NAN;
            }
        }
        let grads: Vec<Tensor> = data.iter().map(|d| ctx.upload_f32("g", &[d.len()], d).unwrap()).collect();
        let refs: Vec<&Tensor> = grads.iter().collect();
        let partials = ctx.tensor("partials", &[grad_norm_partials(&refs)], DType::F32).unwrap();
        let clip = ctx.tensor("clip", &[3], DType::F32).unwrap();
        ctx.fill_f32(&clip, 12345.0).unwrap();
        let mut step = Step::new();
        grad_norm_clip(&ctx, &mut step, &refs, &partials, 1.0, &clip).unwrap();
        ctx.run(&step).unwrap();
        let got = ctx.read_f32(&clip).unwrap();
        let found = (got[2] >= 0.0).then(|| partial_owner(&sizes, got[2] as usize)).flatten();
        assert_eq!(found, bad_tensor, "clip {got:?} for {value} in tensor {bad_tensor:?} at {bad_at}");
        if bad_tensor.is_none() {
            assert_eq!(got[2], -1.0);
            assert!(got[1].is_finite());
        }
    }
}

/// Many tensors in one dispatch (as many as the adapter's bindings allow, the rest in more) give
/// each tensor exactly what a dispatch of its own gives: AdamW and SGD, awkward sizes.
#[test]
fn grouped_optimizer_steps_equal_one_tensor_at_a_time() {
    use portalora::ops::optim::{adamw_steps, sgd_steps};
    let Some(ctx) = common::context() else { return };
    let mut rng = portalora::rng::Rng::new(21);
    let sizes = [1usize, 7, 255, 256, 257, 1000, 33, 4097, 5, 300, 64, 2, 513, 9, 77, 3, 1024];
    let hyper = ctx.upload_f32("hyper", &[Hyper::FLOATS], &AdamW::new(0.01).hyper(3).to_f32s()).unwrap();
    let clip = ctx.upload_f32("clip", &[2], &[0.7, 0.0]).unwrap();
    for kind in ["adamw", "sgd"] {
        let sgd = Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.01 };
        // (gradient, parameter, first moment, second moment ≥ 0)
        let values: Vec<[Vec<f32>; 4]> = sizes
            .iter()
            .map(|&n| {
                let [g, w, m, v] = [0; 4].map(|_| rng.vec(n));
                [g, w, m, v.iter().map(|x| x.abs()).collect()]
            })
            .collect();
        let run = |grouped: bool| -> Vec<Vec<f32>> {
            if kind == "sgd" {
                ctx.write_f32(&hyper, &sgd.hyper(2).to_f32s()).unwrap();
            }
            let t: Vec<[Tensor; 4]> = values
                .iter()
                .map(|vs| {
                    ["g", "w", "m", "v"]
                        .map(|l| l)
                        .iter()
                        .zip(vs)
                        .map(|(l, v)| ctx.upload_f32(l, &[v.len()], v).unwrap())
                        .collect::<Vec<_>>()
                        .try_into()
                        .unwrap()
                })
                .collect();
            let mut step = Step::new();
            if grouped && kind == "adamw" {
                let refs: Vec<_> = t.iter().map(|[g, w, m, v]| (g, w, m, v)).collect();
                adamw_steps(&ctx, &mut step, &hyper, &clip, &refs).unwrap();
            } else if grouped {
                let refs: Vec<_> = t.iter().map(|[g, w, m, _]| (g, w, m)).collect();
                sgd_steps(&ctx, &mut step, &hyper, &clip, &refs).unwrap();
            } else {
                for [g, w, m, v] in &t {
                    match kind {
                        "adamw" => adamw_step(&ctx, &mut step, &hyper, &clip, g, w, m, v).unwrap(),
                        _ => sgd_step(&ctx, &mut step, &hyper, &clip, g, w, m).unwrap(),
                    }
                }
            }
            if grouped {
                assert!(step.len() < sizes.len(), "{kind}: {} dispatches for {} tensors", step.len(), sizes.len());
            }
            ctx.run(&step).unwrap();
            t.iter().flat_map(|[_, w, m, v]| [w, m, v].map(|x| ctx.read_f32(x).unwrap())).collect()
        };
        let bits =
            |r: Vec<Vec<f32>>| -> Vec<Vec<u32>> { r.iter().map(|v| v.iter().map(|x| x.to_bits()).collect()).collect() };
        let (grouped, single) = (bits(run(true)), bits(run(false)));
        assert!(grouped == single, "{kind}: grouped steps differ from one tensor at a time");
    }
}
