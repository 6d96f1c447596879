//! The matmul's cooperative-matrix path (f16 operands rounded as they are staged, f32
//! accumulation). Runs where the adapter offers square f16 → f32 cooperative matrices: real
//! GPUs, and on machines without one Mesa's lavapipe ≥ 26.1, which `make test` sets up beside
//! the system's (`scripts/lavapipe-coop`) and runs this file against with
//! `PORTALORA_REQUIRE_COOP=1`, where an adapter without them fails instead of skipping.
//! References: the f64 product of the same f16-rounded operands (so only the accumulation
//! differs), and the f32 path of the same training run.

mod common;

use portalora::adapter::{AdapterConfig, Method};
use portalora::gpu::{Context, ContextOptions, CoopMode, DType, Step, Tensor};
use portalora::io::gguf::{dequantize, GgmlType};
use portalora::io::half::{f16_to_f32, f32_to_f16};
use portalora::model::load_model;
use portalora::ops::matmul::{matmul, Matmul, MatmulPath};
use portalora::ops::quant::{pack, quantize};
use portalora::rng::Rng;
use portalora::train::{TrainConfig, Trainer};

/// A context with `PORTALORA_COOP` set to `mode`; `None` (skipped, or failed under
/// `PORTALORA_REQUIRE_COOP=1`) where `on` finds no usable cooperative matrices.
fn context(mode: CoopMode) -> Option<Context> {
    common::context()?;
    let ctx =
        pollster::block_on(Context::with_options(ContextOptions { coop: mode, ..ContextOptions::from_env().unwrap() }))
            .expect("a context opened just before");
    if mode != CoopMode::Off && ctx.features().coop_size.is_none() {
        let offered = &ctx.info().cooperative_matrices;
        if std::env::var("PORTALORA_REQUIRE_COOP").is_ok_and(|v| v == "1") {
            panic!("PORTALORA_REQUIRE_COOP=1 but {:?} offers no square f16→f32 cooperative matrix ({offered:?}): run this under scripts/lavapipe-coop's run", ctx.info().name);
        }
        eprintln!("SKIPPED: {:?} offers no square f16→f32 cooperative matrix ({offered:?})", ctx.info().name);
        return None;
    }
    Some(ctx)
}

fn round_f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| f16_to_f32(f32_to_f16(x))).collect()
}

/// One product on the coop path against f64 of f16-rounded operands: `b_vals` are B's values as
/// stored (dequantized), `b` the tensor; A may be a column view, C is poisoned (or holds `prior`
/// when accumulating).
#[allow(clippy::too_many_arguments)]
fn check(
    ctx: &Context,
    what: &str,
    a: &Tensor,
    a_vals: &[f32],
    b: &Tensor,
    b_vals: &[f32],
    c: &Tensor,
    opts: Matmul,
    rng: &mut Rng,
) {
    let (m, n) = (c.shape()[0], c.shape()[1]);
    let k = a_vals.len() / m;
    let prior = rng.vec(m * n);
    ctx.write_f32(c, &if opts.accumulate { prior.clone() } else { vec![f32::NAN; m * n] }).unwrap();
    let mut s = Step::new();
    let path = matmul(ctx, &mut s, a, b, c, opts.coop(true)).unwrap();
    assert_eq!(path, MatmulPath::Coop, "{what}: took {path:?}");
    ctx.run(&s).unwrap();
    let got = ctx.read_f32(c).unwrap();
    let want = portalora::reference::matmul(&round_f16(a_vals), &round_f16(b_vals), m, k, n, false, opts.trans_b);
    let scale = want.iter().fold(0.0f64, |s, w| s.max(w.abs())) * opts.alpha.abs() as f64;
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let w = opts.alpha as f64 * w + if opts.accumulate { prior[i] as f64 } else { 0.0 };
        // f32 sums of exact f16 products: K roundings of at most 2^-24 of the running sum.
        let tol = 1e-6 * (k as f64).sqrt() * scale + 1e-6 * w.abs();
        assert!((g as f64 - w).abs() <= tol, "{what}: [{}, {}] {g} vs {w} (tol {tol:e})", i / n, i % n);
    }
}

#[test]
fn coop_matmul_matches_f64_of_its_f16_operands_at_awkward_shapes() {
    let Some(ctx) = context(CoopMode::On) else { return };
    let mut rng = Rng::new(17);
    // f32 B, both layouts, shapes off every tile edge, alpha and accumulation.
    for &(m, k, n) in &[(37usize, 70usize, 45usize), (1, 9, 3), (130, 33, 67), (64, 64, 64), (5, 200, 129)] {
        for trans_b in [true, false] {
            for (alpha, accumulate) in [(1.0f32, false), (-0.75, true)] {
                let av = rng.vec(m * k);
                let bv = rng.vec(k * n);
                let a = ctx.upload_f32("x", &[m, k], &av).unwrap();
                let shape = if trans_b { [n, k] } else { [k, n] };
                let b = ctx.upload_f32("W", &shape, &bv).unwrap();
                let c = ctx.tensor("y", &[m, n], DType::F32).unwrap();
                let opts = Matmul { trans_b, alpha, accumulate, ..Matmul::default() };
                check(
                    &ctx,
                    &format!("f32 {m}x{k}x{n} tb={trans_b} acc={accumulate}"),
                    &a,
                    &av,
                    &b,
                    &bv,
                    &c,
                    opts,
                    &mut rng,
                );
            }
        }
    }
    // A and C as column views of wider matrices (a fused projection's parts, the LM head's
    // vocabulary slices).
    let (m, k, n, wide) = (29, 48, 40, 128);
    let full = rng.vec(m * wide);
    let big_a = ctx.upload_f32("x wide", &[m, wide], &full).unwrap();
    let align = ctx.limits().storage_offset_alignment;
    let start = align as usize / 4;
    let a = big_a.cols(start, k, align).unwrap();
    let av: Vec<f32> = (0..m).flat_map(|r| full[r * wide + start..r * wide + start + k].to_vec()).collect();
    let bv = rng.vec(n * k);
    let b = ctx.upload_f32("W", &[n, k], &bv).unwrap();
    let big_c = ctx.tensor("y wide", &[m, wide], DType::F32).unwrap();
    let c = big_c.cols(start, n, align).unwrap();
    let c_contig = ctx.tensor("y", &[m, n], DType::F32).unwrap();
    check(&ctx, "column views", &a, &av, &b, &bv, &c_contig, Matmul::nt(), &mut rng);
    ctx.write_f32(&big_c, &vec![f32::NAN; m * wide]).unwrap();
    let mut s = Step::new();
    matmul(&ctx, &mut s, &a, &b, &c, Matmul::nt().coop(true)).unwrap();
    ctx.run(&s).unwrap();
    let (view, contig) = (ctx.read_f32(&big_c).unwrap(), ctx.read_f32(&c_contig).unwrap());
    for r in 0..m {
        for j in 0..wide {
            let v = view[r * wide + j];
            if (start..start + n).contains(&j) {
                assert_eq!(v.to_bits(), contig[r * n + j - start].to_bits(), "column view [{r}, {j}]");
            } else {
                assert!(v.is_nan(), "column view wrote outside its columns at [{r}, {j}]");
            }
        }
    }
    // Packed frozen weights (a GGUF base), dequantized as they are staged.
    let types = [
        (GgmlType::F16, DType::F16),
        (GgmlType::Q8_0, DType::Q8_0),
        (GgmlType::Q4_1, DType::Q4_1),
        (GgmlType::Q5_0, DType::Q5_0),
        (GgmlType::Q4_K, DType::Q4_K),
        (GgmlType::Q6_K, DType::Q6_K),
    ];
    for (ggml, dtype) in types {
        for &m in &[3usize, 37] {
            // Super-blocks of 256 for the K-quants, blocks of 32 otherwise.
            let (rows, cols) = (44usize, if dtype.block() == 256 { 512 } else { 96 });
            let raw = quantize(ggml, &rng.vec(rows * cols));
            let deq = dequantize(ggml, &raw);
            let b = ctx.upload_packed("W", dtype, &[rows, cols], &pack(ggml, &raw)).unwrap();
            let av = rng.vec(m * cols);
            let a = ctx.upload_f32("x", &[m, cols], &av).unwrap();
            let c = ctx.tensor("y", &[m, rows], DType::F32).unwrap();
            let opts = Matmul { trans_b: true, alpha: 0.5, ..Matmul::default() };
            check(&ctx, &format!("{dtype:?} m={m}"), &a, &av, &b, &deq, &c, opts, &mut rng);
        }
    }
}

/// Only products marked as f16-safe take the path, and only when it is on: gradients, a
/// transposed A, a batch and `PORTALORA_COOP=off` keep the f32 kernels.
#[test]
fn only_marked_products_take_cooperative_matrices_and_off_turns_them_off() {
    let Some(ctx) = context(CoopMode::On) else { return };
    let t = |shape: &[usize]| ctx.tensor("t", shape, DType::F32).unwrap();
    let (a, w, c) = (t(&[16, 32]), t(&[24, 32]), t(&[16, 24]));
    let path = |ctx: &Context, a: &Tensor, b: &Tensor, c: &Tensor, o: Matmul| {
        matmul(ctx, &mut Step::new(), a, b, c, o).unwrap()
    };
    assert_eq!(path(&ctx, &a, &w, &c, Matmul::nt().coop(true)), MatmulPath::Coop);
    assert_eq!(path(&ctx, &a, &w, &c, Matmul::nt()), MatmulPath::Subgroup, "an unmarked product");
    let at = t(&[32, 16]);
    assert_eq!(path(&ctx, &at, &t(&[32, 24]), &c, Matmul::tn().coop(true)), MatmulPath::Subgroup, "A transposed");
    let (a3, c3) = (t(&[2, 16, 32]), t(&[2, 16, 24]));
    assert_eq!(path(&ctx, &a3, &w, &c3, Matmul::nt().coop(true)), MatmulPath::Subgroup, "a batch");
    let off = context(CoopMode::Off).unwrap();
    assert!(!off.features().cooperative_matrix, "off opens the device without the experimental feature");
    let t = |shape: &[usize]| off.tensor("t", shape, DType::F32).unwrap();
    assert_eq!(path(&off, &t(&[16, 32]), &t(&[24, 32]), &t(&[16, 24]), Matmul::nt().coop(true)), MatmulPath::Subgroup);
    // What `bench coop` and `auto` measure: the path against f64 and the subgroup kernel.
    let r = portalora::ops::matmul::coop::race(&ctx, 96, 80, 72).unwrap();
    assert!(r.max_rel_error < 1e-5 && r.max_rel_error_vs_f32 < 1e-2, "{r:?}");
    assert!(r.coop_seconds > 0.0 && r.subgroup_seconds > 0.0, "{r:?}");
}

/// `auto` (the default) races the path against the subgroup kernel once per adapter and takes it
/// only where it is right and faster: on lavapipe, whose matrix units are its SIMD lanes, it is
/// about 9× slower, so a marked product stays on the subgroup kernel there.
#[test]
fn auto_takes_cooperative_matrices_only_where_they_win() {
    let Some(ctx) = context(CoopMode::Auto) else { return };
    let t = |shape: &[usize]| ctx.tensor("t", shape, DType::F32).unwrap();
    let path = matmul(&ctx, &mut Step::new(), &t(&[16, 32]), &t(&[24, 32]), &t(&[16, 24]), Matmul::nt().coop(true));
    let r = portalora::ops::matmul::coop::race(&ctx, 512, 576, 576).unwrap();
    eprintln!("auto took {path:?}; race: {r:?}");
    assert!(r.max_rel_error < 1e-5 && r.max_rel_error_vs_f32 < 1e-2, "{r:?}");
    if ctx.info().name.contains("llvmpipe") {
        assert_eq!(path.unwrap(), MatmulPath::Subgroup, "lavapipe's emulated matrices never win: {r:?}");
    }
}

/// `portalora train`'s step on SmolLM2 (its Q4_1 GGUF kept packed, LoRA on all seven
/// projections): 20 steps with the forward products on cooperative matrices stay within 1e-3
/// (relative) of the f32 path's losses, step by step.
#[test]
fn smollm2_lora_losses_on_cooperative_matrices_follow_the_f32_path() {
    let Some(coop) = context(CoopMode::On) else { return };
    let Some(path) = common::smollm2_path() else { return };
    let text_path = path.parent().unwrap().parent().unwrap().join("texts/hamlet_gut.txt");
    let text = std::fs::read_to_string(&text_path).unwrap_or_else(|e| panic!("{}: {e}", text_path.display()));
    let w = load_model(&path).unwrap();
    let tok = portalora::io::tokenizer::Tokenizer::for_model(&path).unwrap();
    let ids = tok.encode(&text[20_000..60_000]).unwrap();
    let (batch, seq, steps) = (2usize, 64usize, 20usize);
    let rows: Vec<Vec<u32>> = ids.chunks_exact(seq).take(batch * steps).map(|c| c.to_vec()).collect();
    let mut cfg = AdapterConfig::new(Method::Lora);
    cfg.targets = portalora::adapter::all_targets(w.config.arch);
    let tc = TrainConfig { lr: 1e-3, ..TrainConfig::default() };
    let run = |ctx: &Context| -> Vec<f64> {
        let mut tr = Trainer::new(ctx, &w, batch, seq, &cfg, &tc, None).unwrap();
        rows.chunks(batch).map(|b| tr.train_step(ctx, b).unwrap().loss).collect()
    };
    let on = run(&coop);
    let off = context(CoopMode::Off).unwrap();
    let f32_losses = run(&off);
    eprintln!("coop {on:?}\nf32  {f32_losses:?}");
    for (i, (a, b)) in on.iter().zip(&f32_losses).enumerate() {
        assert!((a - b).abs() <= 1e-3 * b.abs(), "step {i}: coop {a} vs f32 {b}");
    }
    // f16 operands move every loss a little (measured: up to 1.3e-4 relative; one step of 20 may
    // land on the same f32 value): the forward pass did take the path.
    let same = on.iter().zip(&f32_losses).filter(|(a, b)| a == b).count();
    assert!(same <= 2, "{same} of {steps} losses equal to the bit: did the forward pass take the path?");
}
