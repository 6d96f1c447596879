//! The adapter kernels against f64 references at awkward shapes, the adapter branches against
//! finite differences (with dropout on), merge / unmerge, PEFT file round trips, the memory
//! report, and the errors bad adapter settings get.

mod common;

use common::{context, fixture};
use portalora::adapter::peft::{self, PeftFile};
use portalora::adapter::{self, AdapterConfig, AdapterError, Method};
use portalora::gpu::{Context, Step};
use portalora::model::gpu::{GpuModel, PlanOptions};
use portalora::model::{load_model, Weights};
use portalora::ops::adapter::{dropout_backward, dropout_forward, scale_backward, scale_forward};
use portalora::reference::{dropout_keep, max_rel_error};
use portalora::rng::Rng;

#[test]
fn dropout_matches_reference_mask() {
    let Some(ctx) = context() else { return };
    let mut rng = Rng::new(11);
    for (n, p, salt) in [(1usize, 0.5f32, 0u32), (7, 0.1, 3), (33 * 129, 0.5, 7), (70_001, 0.25, 1)] {
        let x = rng.vec(n);
        let xt = ctx.upload_f32("x", &[n], &x).unwrap();
        let seed = ctx.upload_u32("seed", &[1], &[0xdead_beef]).unwrap();
        let out = ctx.upload_f32("out", &[n], &vec![f32::NAN; n]).unwrap();
        let dx0 = rng.vec(n);
        let dx = ctx.upload_f32("dx", &[n], &dx0).unwrap();
        let mut s = Step::new();
        dropout_forward(&ctx, &mut s, &xt, &seed, salt, p, &out).unwrap();
        dropout_backward(&ctx, &mut s, &xt, &seed, salt, p, &dx).unwrap();
        ctx.run(&s).unwrap();
        let keep: Vec<f64> = (0..n).map(|i| dropout_keep(0xdead_beef, salt, i as u32, p)).collect();
        let want: Vec<f64> = x.iter().zip(&keep).map(|(&v, k)| v as f64 * k).collect();
        assert!(max_rel_error(&ctx.read_f32(&out).unwrap(), &want) < 1e-6, "forward n={n}");
        let want: Vec<f64> = (0..n).map(|i| dx0[i] as f64 + x[i] as f64 * keep[i]).collect();
        assert!(max_rel_error(&ctx.read_f32(&dx).unwrap(), &want) < 1e-6, "backward n={n}");
        if n > 10_000 {
            let dropped = keep.iter().filter(|&&k| k == 0.0).count() as f64 / n as f64;
            let sigma = (p as f64 * (1.0 - p as f64) / n as f64).sqrt();
            assert!((dropped - p as f64).abs() < 5.0 * sigma, "dropped fraction {dropped} for p = {p}");
        }
    }
}

#[test]
fn dropout_masks_differ_by_seed_and_salt() {
    let a: Vec<f64> = (0..256).map(|i| dropout_keep(1, 0, i, 0.5)).collect();
    let b: Vec<f64> = (0..256).map(|i| dropout_keep(2, 0, i, 0.5)).collect();
    let c: Vec<f64> = (0..256).map(|i| dropout_keep(1, 1, i, 0.5)).collect();
    assert_ne!(a, b);
    assert_ne!(a, c);
}

#[test]
fn scale_kernels_match_f64() {
    let Some(ctx) = context() else { return };
    let mut rng = Rng::new(5);
    for (rows, cols) in [(1usize, 1usize), (7, 33), (129, 7), (33, 129)] {
        let a = rng.vec(rows * cols);
        let b = rng.vec(rows * cols);
        let col = rng.vec(cols);
        let row = rng.vec(rows);
        let acc0 = rng.vec(rows * cols);
        let at = ctx.upload_f32("a", &[rows, cols], &a).unwrap();
        let bt = ctx.upload_f32("b", &[rows, cols], &b).unwrap();
        let colt = ctx.upload_f32("col", &[cols], &col).unwrap();
        let rowt = ctx.upload_f32("row", &[rows], &row).unwrap();
        let plain = ctx.upload_f32("plain", &[rows, cols], &vec![f32::NAN; rows * cols]).unwrap();
        let both = ctx.upload_f32("both", &[rows, cols], &acc0).unwrap();
        let dcol = ctx.upload_f32("dcol", &[cols], &vec![f32::NAN; cols]).unwrap();
        let mut s = Step::new();
        scale_forward(&ctx, &mut s, &at, &colt, None, &plain, false).unwrap();
        scale_forward(&ctx, &mut s, &at, &colt, Some(&rowt), &both, true).unwrap();
        scale_backward(&ctx, &mut s, &at, &bt, &dcol, false).unwrap();
        ctx.run(&s).unwrap();
        let idx = |i: usize, j: usize| i * cols + j;
        let want: Vec<f64> = (0..rows * cols).map(|k| a[k] as f64 * col[k % cols] as f64).collect();
        assert!(max_rel_error(&ctx.read_f32(&plain).unwrap(), &want) < 1e-6);
        let want: Vec<f64> = (0..rows * cols)
            .map(|k| acc0[k] as f64 + a[k] as f64 * col[k % cols] as f64 * row[k / cols] as f64)
            .collect();
        assert!(max_rel_error(&ctx.read_f32(&both).unwrap(), &want) < 1e-6);
        let want: Vec<f64> =
            (0..cols).map(|j| (0..rows).map(|i| a[idx(i, j)] as f64 * b[idx(i, j)] as f64).sum()).collect();
        assert!(max_rel_error(&ctx.read_f32(&dcol).unwrap(), &want) < 1e-5, "{rows}x{cols}");
    }
}

/// DoRA's kernels (shaders/dora.wgsl) against f64 at awkward shapes, outputs poisoned with NaN
/// (in-place ones start from random values): the norms and scales, both forward modes, both
/// backward modes (with and without a bias), the per-output sums of squares and the weight
/// scaling, by rows and by columns.
#[test]
fn dora_kernels_match_f64() {
    use portalora::ops::dora::{dora_backward, dora_forward, dora_norm, dora_sumsq, dora_weight, DoraSaved};
    let Some(ctx) = context() else { return };
    let mut rng = Rng::new(23);
    let nan = |label: &str, n: usize| ctx.upload_f32(label, &[n], &vec![f32::NAN; n]).unwrap();
    let up = |label: &str, d: &[f32]| ctx.upload_f32(label, &[d.len()], d).unwrap();
    let close = |got: &portalora::gpu::Tensor, want: &[f64], what: &str| {
        let err = max_rel_error(&ctx.read_f32(got).unwrap(), want);
        assert!(err < 1e-5, "{what}: max rel error {err:e}");
    };
    for (rows, out, r) in [(1usize, 1usize, 1usize), (37, 53, 5), (130, 7, 16)] {
        // Norms: c large enough that c + Σ B·U stays positive, m of either sign.
        let c: Vec<f32> = rng.vec(out).iter().map(|v| v.abs() * r as f32 + 1.0).collect();
        let (b, u, m) = (rng.vec(out * r), rng.vec(r * out), rng.vec(out));
        let bt = ctx.upload_f32("B", &[out, r], &b).unwrap();
        let (ct, ut, mt, nt, gt) = (up("c", &c), up("U", &u), up("m", &m), nan("n", out), nan("g", out));
        let mut s = Step::new();
        dora_norm(&ctx, &mut s, &ct, &bt, &ut, &mt, &nt, &gt).unwrap();
        ctx.run(&s).unwrap();
        let n: Vec<f64> = (0..out)
            .map(|o| (c[o] as f64 + (0..r).map(|j| b[o * r + j] as f64 * u[j * out + o] as f64).sum::<f64>()).sqrt())
            .collect();
        close(&nt, &n, "dora_norm n");
        let g: Vec<f64> = (0..out).map(|o| m[o] as f64 / n[o]).collect();
        close(&gt, &g, "dora_norm g");
        let g32 = ctx.read_f32(&gt).unwrap();
        // Forward: y = g ⊙ y, and y += g ⊙ u.
        let (y0, uu) = (rng.vec(rows * out), rng.vec(rows * out));
        let (ya, yb, ut2) = (up("y", &y0), up("y", &y0), up("u", &uu));
        let mut s = Step::new();
        dora_forward(&ctx, &mut s, &gt, None, &ya).unwrap();
        dora_forward(&ctx, &mut s, &gt, Some(&ut2), &yb).unwrap();
        ctx.run(&s).unwrap();
        let gk = |k: usize| g32[k % out] as f64;
        close(&ya, &(0..rows * out).map(|k| gk(k) * y0[k] as f64).collect::<Vec<_>>(), "dora_forward");
        let want: Vec<f64> = (0..rows * out).map(|k| y0[k] as f64 + gk(k) * uu[k] as f64).collect();
        close(&yb, &want, "dora_forward with u");
        // Backward: dm, g ⊙ dy, (g − 1) ⊙ dy; v = y − bias over m, or u over n.
        let (dy, bias) = (rng.vec(rows * out), rng.vec(out));
        let (dyt, bt2, nt32) = (up("dy", &dy), up("bias", &bias), ctx.read_f32(&nt).unwrap());
        for (name, saved, dm_of) in [
            ("y − bias", DoraSaved::Output { y: &ya, bias: Some(&bt2) }, 0),
            ("y", DoraSaved::Output { y: &ya, bias: None }, 1),
            ("u", DoraSaved::Dropout { u: &ut2 }, 2),
        ] {
            let (dm, dyg, h) = (nan("dm", out), nan("dyg", rows * out), nan("h", rows * out));
            let mut s = Step::new();
            dora_backward(&ctx, &mut s, &dyt, saved, &mt, &nt, &gt, &dm, &dyg, &h).unwrap();
            ctx.run(&s).unwrap();
            let y = ctx.read_f32(&ya).unwrap();
            let want: Vec<f64> = (0..out)
                .map(|o| {
                    let v = |t: usize| match dm_of {
                        0 => y[t * out + o] as f64 - bias[o] as f64,
                        1 => y[t * out + o] as f64,
                        _ => uu[t * out + o] as f64,
                    };
                    let sum: f64 = (0..rows).map(|t| dy[t * out + o] as f64 * v(t)).sum();
                    sum / if dm_of == 2 { nt32[o] as f64 } else { m[o] as f64 }
                })
                .collect();
            close(&dm, &want, &format!("dora_backward dm ({name}, {rows}x{out})"));
            close(&dyg, &(0..rows * out).map(|k| gk(k) * dy[k] as f64).collect::<Vec<_>>(), "dyg");
            close(&h, &(0..rows * out).map(|k| (gk(k) - 1.0) * dy[k] as f64).collect::<Vec<_>>(), "h");
        }
        // Sums of squares and weight scaling: W (out, rows) by rows, (rows, out) by columns.
        let w = rng.vec(rows * out);
        for per_row in [true, false] {
            let shape = if per_row { [out, rows] } else { [rows, out] };
            let wt = ctx.upload_f32("W", &shape, &w).unwrap();
            let (c2, w2, w3) =
                (nan("c", out), ctx.upload_f32("W", &shape, &w).unwrap(), ctx.upload_f32("W", &shape, &w).unwrap());
            let mut s = Step::new();
            dora_sumsq(&ctx, &mut s, &wt, per_row, &c2).unwrap();
            dora_weight(&ctx, &mut s, &gt, &w2, per_row, false).unwrap();
            dora_weight(&ctx, &mut s, &gt, &w3, per_row, true).unwrap();
            ctx.run(&s).unwrap();
            let o_of = |k: usize| if per_row { k / rows } else { k % out };
            let sums: Vec<f64> = (0..out)
                .map(|o| (0..rows * out).filter(|&k| o_of(k) == o).map(|k| (w[k] as f64).powi(2)).sum())
                .collect();
            close(&c2, &sums, &format!("dora_sumsq per_row {per_row}"));
            close(&w2, &(0..rows * out).map(|k| w[k] as f64 * g32[o_of(k)] as f64).collect::<Vec<_>>(), "scaled W");
            close(&w3, &(0..rows * out).map(|k| w[k] as f64 / g32[o_of(k)] as f64).collect::<Vec<_>>(), "divided W");
        }
    }
}

/// A model planned for `cfg`'s adapter with backward enabled.
fn model_with(ctx: &Context, w: &Weights, cfg: &AdapterConfig, batch: usize, seq: usize) -> GpuModel {
    let sites = adapter::sites(&w.config, &cfg.targets).unwrap();
    let mut model = GpuModel::with_options(ctx, w, batch, seq, PlanOptions::default()).unwrap();
    let a = adapter::build(ctx, cfg, sites, batch * seq).unwrap();
    model.enable_backward(ctx).unwrap();
    model.attach(ctx, a).unwrap();
    model
}

fn rows(vocab: usize, batch: usize, seq: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(seed);
    (0..batch).map(|_| (0..seq).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()).collect()
}

/// Central finite differences of the training loss against the adapter gradients, for a few
/// elements of every trainable tensor of the first and last site, with dropout on (same seed, so
/// the same mask, in every pass).
fn finite_differences(arch: &str, method: Method, targets: &[&str], dropout: f32) {
    let Some(ctx) = context() else { return };
    let w = load_model(fixture(&format!("tiny_{arch}"))).unwrap();
    let mut cfg = AdapterConfig::new(method);
    cfg.rank = if method == Method::Vera { 7 } else { 3 };
    cfg.alpha = 5.0;
    cfg.dropout = dropout;
    cfg.seed = 3;
    cfg.targets = targets.iter().map(|s| s.to_string()).collect();
    let (b, t) = (2, 7);
    let mut model = model_with(&ctx, &w, &cfg, b, t);
    let seed = model.adapter().unwrap().dropout_seed().cloned();
    if let Some(seed) = &seed {
        ctx.write_u32(seed, &[77]).unwrap();
    }
    // Non-zero B / λ_b so that every gradient is non-trivial.
    let mut rng = Rng::new(9);
    for p in model.adapter().unwrap().params() {
        let v = ctx.read_f32(p.value).unwrap();
        let nv: Vec<f32> = v.iter().map(|x| x + 0.3 * rng.uniform()).collect();
        ctx.write_f32(p.value, &nv).unwrap();
    }
    let ids = rows(w.config.vocab_size, b, t, 4);
    let n = (b * (t - 1)) as f64;
    let (_, _) = model.forward_backward(&ctx, &ids).unwrap();
    let params: Vec<(String, portalora::gpu::Tensor, portalora::gpu::Tensor)> =
        model.adapter().unwrap().params().iter().map(|p| (p.name.clone(), p.value.clone(), p.grad.clone())).collect();
    let grads: Vec<Vec<f32>> = params.iter().map(|(_, _, g)| ctx.read_f32(g).unwrap()).collect();
    let checked: Vec<usize> = vec![0, 1, params.len() - 2, params.len() - 1];
    for &pi in &checked {
        let (name, value, _) = &params[pi];
        let base = ctx.read_f32(value).unwrap();
        let g = &grads[pi];
        let gmax = g.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        for k in [0, base.len() / 2, base.len() - 1] {
            let h = 1e-2f32;
            let mut loss = [0.0; 2];
            for (j, sign) in [1.0f32, -1.0].into_iter().enumerate() {
                let mut v = base.clone();
                v[k] += sign * h;
                ctx.write_f32(value, &v).unwrap();
                loss[j] = model.forward_backward(&ctx, &ids).unwrap().0 / n;
            }
            ctx.write_f32(value, &base).unwrap();
            let fd = (loss[0] - loss[1]) / (2.0 * h as f64);
            let err = (fd - g[k] as f64).abs() / gmax.max(1e-3);
            assert!(err < 2e-2, "{arch} {method} {name}[{k}]: finite difference {fd:.6} vs gradient {:.6}", g[k]);
        }
    }
}

#[test]
fn lora_gradients_match_finite_differences_with_dropout() {
    finite_differences("llama", Method::Lora, &["q_proj", "v_proj", "o_proj", "down_proj"], 0.3);
}

#[test]
fn lora_gradients_match_finite_differences_gpt2() {
    finite_differences("gpt2", Method::Lora, &["c_attn", "c_proj", "c_fc"], 0.2);
}

#[test]
fn lora_fa_gradients_match_finite_differences_with_dropout() {
    finite_differences("gpt2", Method::LoraFa, &["c_attn", "mlp.c_proj"], 0.4);
}

#[test]
fn vera_gradients_match_finite_differences_with_dropout() {
    finite_differences("llama", Method::Vera, &["k_proj", "up_proj", "down_proj"], 0.25);
    finite_differences("gpt2", Method::Vera, &["c_attn", "c_fc"], 0.0);
}

/// Merge gives the loss of the adapter branch; unmerge gives the base weights back.
fn merge_roundtrip(arch: &str, fixture_dir: &str, method: Method) {
    let Some(ctx) = context() else { return };
    let w = load_model(fixture(&format!("tiny_{arch}"))).unwrap();
    let file = PeftFile::read(&fixture(&format!("adapters/{fixture_dir}/init"))).unwrap();
    let cfg = file.adapter_config(method, &AdapterConfig::new(method)).unwrap();
    let mut model = model_with(&ctx, &w, &cfg, 2, 9);
    file.load_into(&ctx, model.adapter_mut().unwrap(), &w.config).unwrap();
    let ids = rows(w.config.vocab_size, 2, 9, 8);
    let before: Vec<Vec<f32>> = weights_of(&ctx, &model);
    let (with_branch, _) = model.loss_sum(&ctx, &ids).unwrap();
    model.merge(&ctx).unwrap();
    let (merged, _) = model.loss_sum(&ctx, &ids).unwrap();
    assert!((merged - with_branch).abs() / with_branch < 1e-5, "{arch}: merged {merged} vs branch {with_branch}");
    let changed = weights_of(&ctx, &model);
    assert!(before.iter().zip(&changed).any(|(a, b)| a != b), "merge changed no weight");
    model.unmerge(&ctx).unwrap();
    for (a, b) in before.iter().zip(weights_of(&ctx, &model)) {
        let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 1e-6, "{arch}: unmerge is off by {err}");
    }
    let (again, _) = model.loss_sum(&ctx, &ids).unwrap();
    assert!((again - with_branch).abs() / with_branch < 1e-5);
}

fn weights_of(ctx: &Context, model: &GpuModel) -> Vec<Vec<f32>> {
    model.site_weights().unwrap().iter().flat_map(|w| w.parts.iter().map(|p| ctx.read_f32(p).unwrap())).collect()
}

#[test]
fn merge_and_unmerge_lora_gpt2() {
    merge_roundtrip("gpt2", "gpt2_lora", Method::Lora);
}

#[test]
fn merge_and_unmerge_lora_llama() {
    merge_roundtrip("llama", "llama_lora-plus", Method::LoraPlus);
}

#[test]
fn merge_and_unmerge_dora() {
    merge_roundtrip("llama", "llama_dora", Method::Dora);
    merge_roundtrip("gpt2", "gpt2_dora", Method::Dora);
}

#[test]
fn merge_and_unmerge_vera() {
    merge_roundtrip("llama", "llama_vera", Method::Vera);
    merge_roundtrip("gpt2", "gpt2_vera", Method::Vera);
}

#[test]
fn saved_adapters_read_back_identically() {
    let Some(ctx) = context() else { return };
    let cases = [
        ("gpt2", "gpt2_lora", Method::Lora),
        ("llama", "llama_vera", Method::Vera),
        ("gpt2", "gpt2_dora", Method::Dora),
    ];
    for (arch, dir, method) in cases {
        let w = load_model(fixture(&format!("tiny_{arch}"))).unwrap();
        let file = PeftFile::read(&fixture(&format!("adapters/{dir}/init"))).unwrap();
        let cfg = file.adapter_config(method, &AdapterConfig::new(method)).unwrap();
        let mut model = model_with(&ctx, &w, &cfg, 1, 4);
        file.load_into(&ctx, model.adapter_mut().unwrap(), &w.config).unwrap();
        let out = std::env::temp_dir().join(format!("portalora-roundtrip-{arch}-{}", std::process::id()));
        peft::save(&ctx, model.adapter().unwrap(), arch == "gpt2", Some("tiny"), &out).unwrap();
        let back = PeftFile::read(&out).unwrap();
        assert_eq!(back.tensors, file.tensors, "{arch}: tensors changed in a save/read round trip");
        assert_eq!(back.rank, file.rank);
        assert_eq!(back.alpha, file.alpha);
        assert_eq!(back.config["fan_in_fan_out"], file.config["fan_in_fan_out"]);
        let names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{arch}: left {names:?}");
        // safetensors metadata {"format": "pt"}, as PEFT writes it.
        let bytes = std::fs::read(out.join(peft::WEIGHTS_FILE)).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn lora_fa_keeps_only_z_for_backward() {
    let Some(ctx) = context() else { return };
    let w = load_model(fixture("tiny_llama")).unwrap();
    let c = &w.config;
    let (b, t) = (2usize, 9usize);
    let n = b * t;
    let targets: Vec<String> =
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec();
    let trainer = |method: Method, recompute_mlp: bool| {
        let mut cfg = AdapterConfig::new(method);
        cfg.rank = 4;
        cfg.targets = targets.clone();
        let tc = portalora::train::TrainConfig { recompute_mlp, ..Default::default() };
        portalora::train::Trainer::new(&ctx, &w, b, t, &cfg, &tc, None).unwrap()
    };
    let kept = |method: Method| trainer(method, false).kept_bytes();
    let (h, q, kv, f) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    // What the frozen LLaMA layer's backward reads: rstd1, v, att, lse (with each token's
    // document start after it), x_mid, rstd2, gate, q_rot, k_rot, up; plus the residual streams;
    // plus z = x·Aᵀ (N, r) per adapted projection.
    let base = c.num_layers
        * (n + n * kv + n * q + b * c.num_heads * t + n + n * h + n + n * f + n * q + n * kv + n * f)
        + (c.num_layers + 1) * n * h;
    let z = c.num_layers * 7 * n * 4;
    assert_eq!(kept(Method::LoraFa), ((base + z) * 4) as u64);
    // LoRA also keeps each projection's full-width input (h1, h2 and act; att is kept anyway).
    assert_eq!(kept(Method::Lora), ((base + z + c.num_layers * n * (2 * h + f)) * 4) as u64);
    // Recomputing the MLP in backward drops gate and up (N, F) per layer from both.
    let mlp = c.num_layers * 2 * n * f;
    for (method, extra) in [(Method::LoraFa, 0), (Method::Lora, c.num_layers * n * (2 * h + f))] {
        let (plain, recomputed) = (trainer(method, false), trainer(method, true));
        assert_eq!(recomputed.kept_bytes(), ((base - mlp + z + extra) * 4) as u64, "{method:?}");
        // The planner shares buffers between tensors that are never live together: never more
        // than one buffer per tensor, and recomputation's savings show in what it allocates.
        for tr in [&plain, &recomputed] {
            let a = &tr.model.acts;
            assert!(a.planned_bytes < a.unshared_bytes, "{method:?}: {} vs {}", a.planned_bytes, a.unshared_bytes);
        }
        assert!(recomputed.model.acts.planned_bytes < plain.model.acts.planned_bytes, "{method:?}");
    }
}

#[test]
fn bad_targets_and_ranks_are_named() {
    let w = load_model(fixture("tiny_gpt2")).unwrap();
    let err = adapter::sites(&w.config, &["q_proj".into()]).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, AdapterError::UnknownTarget { .. }) && msg.contains("c_attn") && msg.contains("q_proj"),
        "{msg}"
    );
    let sites = adapter::sites(&w.config, &["c_proj".into()]).unwrap();
    assert_eq!(sites.len(), 2 * w.config.num_layers, "c_proj selects attn.c_proj and mlp.c_proj");
    let cfg = AdapterConfig { rank: 25, ..AdapterConfig::new(Method::Lora) };
    let err = adapter::check_rank(&cfg, &sites).unwrap_err().to_string();
    assert!(err.contains("rank 25") && err.contains("c_proj") && err.contains("1 ≤ r ≤ 24"), "{err}");
    assert!(adapter::sites(&w.config, &[]).unwrap_err().to_string().contains("c_fc"));
}

#[test]
fn adapter_for_another_model_is_refused() {
    let Some(ctx) = context() else { return };
    let w = load_model(fixture("tiny_llama")).unwrap();
    let file = PeftFile::read(&fixture("adapters/gpt2_lora/init")).unwrap();
    let mut cfg = file.adapter_config(Method::Lora, &AdapterConfig::new(Method::Lora)).unwrap();
    cfg.targets = vec!["q_proj".into()];
    let mut model = model_with(&ctx, &w, &cfg, 1, 4);
    let err = file.load_into(&ctx, model.adapter_mut().unwrap(), &w.config).unwrap_err().to_string();
    assert!(err.contains("adapter_model.safetensors") && err.contains("transformer.h.0"), "{err}");
}

/// Fresh adapters start exactly at the base model (B = 0, λ_b = 0), with A drawn as PEFT draws it:
/// kaiming-uniform within ±1/sqrt(in), or gaussian with std 1/r.
#[test]
fn fresh_adapters_start_at_the_base() {
    let Some(ctx) = context() else { return };
    let w = load_model(fixture("tiny_llama")).unwrap();
    let ids = rows(w.config.vocab_size, 2, 9, 3);
    let base = GpuModel::new(&ctx, &w, 2, 9).unwrap().loss_sum(&ctx, &ids).unwrap().0;
    let cases =
        [(Method::Lora, "kaiming"), (Method::Lora, "gaussian"), (Method::Vera, "kaiming"), (Method::Dora, "kaiming")];
    for (method, init) in cases {
        let mut cfg = AdapterConfig::new(method);
        cfg.rank = 5;
        cfg.init = init.parse().unwrap();
        cfg.targets = vec!["q_proj".into(), "up_proj".into(), "down_proj".into()];
        let model = model_with(&ctx, &w, &cfg, 2, 9);
        let (with, _) = model.loss_sum(&ctx, &ids).unwrap();
        assert_eq!(with, base, "{method} {init}: a fresh adapter must not change the model");
        if method == Method::Vera {
            continue;
        }
        let a = model.adapter().unwrap();
        for slot in a.slots() {
            let v: Vec<f32> = slot.parts.iter().flat_map(|p| ctx.read_f32(p).unwrap()).collect();
            if slot.key.contains("lora_B") {
                assert!(v.iter().all(|&x| x == 0.0), "{}: B starts at 0", slot.key);
            } else if let Some(module) = slot.key.strip_suffix(".lora_magnitude_vector") {
                // DoRA's magnitudes start at the rows' norms of W0 (PEFT's init), here from f64.
                let w0 = &w.tensors[&format!("{}.weight", module.trim_start_matches("base_model.model."))];
                let cols = w0.shape[1];
                let norms: Vec<f64> =
                    w0.data.chunks(cols).map(|r| r.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()).collect();
                let err = max_rel_error(&v, &norms);
                assert!(err < 1e-6, "{}: magnitudes vs the norms of W0: {err:e}", slot.key);
            } else if init == "kaiming" {
                let bound = 1.0 / (slot.shape[1] as f32).sqrt();
                assert!(v.iter().all(|x| x.abs() <= bound), "{}: outside ±1/sqrt(in)", slot.key);
                let spread = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(spread > 0.8 * bound, "{}: max |A| {spread} far below the bound {bound}", slot.key);
            } else {
                let std = (v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64).sqrt();
                assert!((std - 0.2).abs() < 0.03, "{}: std {std}, want 1/r = 0.2", slot.key);
            }
        }
    }
}

/// Generation with an adapter's branch beside the frozen weights (unmerged, in chunks no larger
/// than the adapter's rows) gives the logits of the merged model at every position: LoRA (GPT-2's
/// fused c_attn included) and VeRA, from PEFT-written adapters whose B is non-zero.
#[test]
fn generation_with_an_unmerged_adapter_equals_the_merged_model() {
    use portalora::model::generate::Generator;
    let Some(ctx) = context() else { return };
    for (arch, method) in [("llama", "lora"), ("gpt2", "lora"), ("llama", "vera"), ("qwen3", "lora-plus")] {
        let w = load_model(fixture(&format!("tiny_{arch}"))).unwrap();
        let dir = fixture(&format!("adapters/{arch}_{method}/init"));
        let ids = rows(w.config.vocab_size, 1, 11, 8).remove(0);
        let mut merged = portalora::train::model_with_adapter(&ctx, &w, 1, 2, &dir).unwrap();
        merged.merge(&ctx).unwrap();
        let mut want = Generator::new(&ctx, &w.config, &merged.params, 11).unwrap();
        // The adapter planned for 3 rows: the 5-token prompt goes through in two chunks.
        let params = portalora::model::gpu::ParameterTensors::upload(&ctx, &w).unwrap();
        let adapter = portalora::train::adapter_from(&ctx, &w, &dir, 3).unwrap();
        let mut got = Generator::new(&ctx, &w.config, &params, 11).unwrap().with_adapter(adapter.as_ref()).unwrap();
        let (a, b) = (got.feed(&ctx, &ids[..5]).unwrap(), want.feed(&ctx, &ids[..5]).unwrap());
        assert!(max_rel_error(&a, &b.iter().map(|&x| x as f64).collect::<Vec<_>>()) < 1e-4, "{arch} {method}: prefill");
        for (t, &id) in ids.iter().enumerate().skip(5) {
            let (a, b) = (got.feed(&ctx, &[id]).unwrap(), want.feed(&ctx, &[id]).unwrap());
            let err = max_rel_error(&a, &b.iter().map(|&x| x as f64).collect::<Vec<_>>());
            assert!(err < 1e-4, "{arch} {method}: position {t}: relative error {err:e}");
        }
    }
}
