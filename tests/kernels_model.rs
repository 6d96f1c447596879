//! The transformer-layer kernels (norm, rope, attention, act, embed, xent) against their f64 CPU
//! twins in `portalora::reference`, at awkward shapes, outputs poisoned with NaN before each run.

mod common;

use portalora::gpu::{Context, DType, Step, Tensor};
use portalora::ops::act::swiglu_forward;
use portalora::ops::attention::{attention_forward, AttentionShape};
use portalora::ops::embed::embed_forward;
use portalora::ops::norm::rmsnorm_forward;
use portalora::ops::rope::{rope_backward, rope_forward, RopeShape};
use portalora::ops::xent::{xent_forward, IGNORE};
use portalora::reference::{self, max_rel_error};
use portalora::rng::Rng;

const TOL: f64 = 1e-5;

fn poisoned(ctx: &Context, label: &str, shape: &[usize]) -> Tensor {
    let t = ctx.tensor(label, shape, DType::F32).unwrap();
    ctx.fill_f32(&t, f32::NAN).unwrap();
    t
}

fn run(ctx: &Context, step: Step) {
    ctx.run(&step).unwrap();
}

fn assert_close(ctx: &Context, what: &str, t: &Tensor, want: &[f64], tol: f64) {
    let got = ctx.read_f32(t).unwrap();
    let err = max_rel_error(&got, want);
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}

#[test]
fn rmsnorm_matches_reference() {
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(1);
    for (rows, dim) in [(1, 1), (7, 33), (33, 7), (129, 576), (3, 1000)] {
        let x = rng.vec(rows * dim);
        let w = rng.vec(dim);
        let (want, want_r) = reference::rmsnorm_forward(&x, &w, 1e-5);
        let (xt, wt) = (ctx.upload_f32("x", &[rows, dim], &x).unwrap(), ctx.upload_f32("w", &[dim], &w).unwrap());
        let (out, rstd) = (poisoned(&ctx, "out", &[rows, dim]), poisoned(&ctx, "rstd", &[rows]));
        let mut step = Step::new();
        rmsnorm_forward(&ctx, &mut step, &xt, &wt, 1e-5, &out, &rstd).unwrap();
        run(&ctx, step);
        assert_close(&ctx, &format!("rmsnorm out {rows}x{dim}"), &out, &want, TOL);
        assert_close(&ctx, &format!("rmsnorm rstd {rows}x{dim}"), &rstd, &want_r, TOL);
    }
}

#[test]
fn rope_matches_reference_and_backward_inverts_it() {
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(2);
    use portalora::model::arch::{Rope, RopeScaling};
    let llama3 =
        RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_positions: 16.0 };
    let ropes = [
        Rope::plain(10000.0),
        Rope::plain(10000.0),
        Rope { theta: 100000.0, scaling: Some(RopeScaling::Linear { factor: 3.5 }) },
        Rope { theta: 500.0, scaling: Some(llama3) },
    ];
    for ((batch, seq, heads, hd), rope) in
        [(1, 1, 1, 2), (2, 7, 3, 6), (3, 33, 5, 64), (1, 129, 1, 8)].into_iter().zip(ropes)
    {
        let n = batch * seq * heads * hd;
        let x = rng.vec(n);
        let inv_freq = rope.inv_freq(hd);
        let ft = ctx.upload_f32("inv_freq", &[hd / 2], &inv_freq).unwrap();
        let xt = ctx.upload_f32("x", &[batch * seq, heads, hd], &x).unwrap();
        let out = poisoned(&ctx, "out", &[batch * seq, heads, hd]);
        let back = poisoned(&ctx, "back", &[batch * seq, heads, hd]);
        let mut step = Step::new();
        let shape = RopeShape { seq, heads, head_dim: hd, pos_offset: 0 };
        rope_forward(&ctx, &mut step, shape, &ft, &xt, &out).unwrap();
        rope_backward(&ctx, &mut step, shape, &ft, &out, &back).unwrap();
        run(&ctx, step);
        // Angles up to 129 rad in f32 lose ~1e-5 of absolute precision, as in transformers.
        assert_close(
            &ctx,
            &format!("rope {batch}x{seq}x{heads}x{hd}"),
            &out,
            &reference::rope_forward(&x, seq, heads, hd, &inv_freq),
            2e-5,
        );
        // A rotation's transpose is its inverse: backward(forward(x)) = x.
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        assert_close(&ctx, "rope backward∘forward", &back, &xd, 2e-5);
    }
}

#[test]
fn attention_matches_reference() {
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(3);
    // (batch, seq, heads, kv heads, head dim, window, scale): head dims with and without the vec4
    // kernels; windows shorter than the sequence, across the 64-row blocks, and of 1.
    for (batch, seq, heads, kv_heads, d, window, scale) in [
        (1, 1, 1, 1, 1, 0, None),
        (2, 7, 5, 1, 6, 3, None),
        (1, 33, 9, 3, 64, 0, Some(0.3)),
        (3, 9, 4, 2, 7, 1, None),
        (1, 129, 2, 2, 16, 0, None),
        (1, 129, 2, 1, 16, 70, Some(0.21)),
        (2, 40, 3, 3, 5, 17, None),
        // Gemma 3's heads: head_dim 256, one KV head, a window.
        (1, 21, 4, 1, 256, 9, Some(0.0625)),
    ] {
        let q = rng.vec(batch * seq * heads * d);
        let k = rng.vec(batch * seq * kv_heads * d);
        let v = rng.vec(batch * seq * kv_heads * d);
        let s = shape(batch, seq, heads, kv_heads, d, window, scale);
        let (want, want_lse) =
            reference::attention_forward(&q, &k, &v, batch, seq, heads, kv_heads, d, window, s.scale as f64);
        let qt = ctx.upload_f32("q", &[batch, seq, heads, d], &q).unwrap();
        let kt = ctx.upload_f32("k", &[batch, seq, kv_heads, d], &k).unwrap();
        let vt = ctx.upload_f32("v", &[batch, seq, kv_heads, d], &v).unwrap();
        let out = poisoned(&ctx, "out", &[batch, seq, heads, d]);
        let lse = poisoned(&ctx, "lse", &[batch, heads, seq]);
        let mut step = Step::new();
        attention_forward(&ctx, &mut step, s, &qt, &kt, &vt, &out, &lse).unwrap();
        run(&ctx, step);
        assert_close(&ctx, &format!("attention {s:?}"), &out, &want, TOL);
        assert_close(&ctx, &format!("attention lse {s:?}"), &lse, &want_lse, TOL);
    }
}

/// An attention call's shape with a window (0: none) and a scale (None: 1/√d).
fn shape(
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    window: usize,
    scale: Option<f32>,
) -> AttentionShape {
    let s = AttentionShape::new(batch, seq, heads, kv_heads, d);
    AttentionShape { window, scale: scale.unwrap_or(s.scale), ..s }
}

/// The matmul path's scratch, poisoned.
fn attention_scratch(ctx: &Context, s: &AttentionShape, backward: bool) -> portalora::ops::attention::AttentionScratch {
    let hm = s.head_major_shape();
    portalora::ops::attention::AttentionScratch {
        q: poisoned(ctx, "qh", &hm),
        k: poisoned(ctx, "kh", &hm),
        v: poisoned(ctx, "vh", &hm),
        o: poisoned(ctx, "oh", &hm),
        scores: poisoned(ctx, "scores", &s.scores_shape()),
        dscores: backward.then(|| poisoned(ctx, "dscores", &s.scores_shape())),
        positions: None,
    }
}

/// Attention as batched matrix products (head-major copies, S = q·kᵀ, causal softmax, P·v)
/// against the same f64 reference.
#[test]
fn attention_as_matmuls_matches_reference() {
    use portalora::ops::attention::attention_forward_mm;
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(5);
    for (batch, seq, heads, kv_heads, d, window, scale) in [
        (1, 1, 1, 1, 4, 0, None),
        (2, 7, 6, 2, 8, 2, None),
        (1, 33, 9, 3, 64, 0, Some(0.3)),
        (3, 9, 4, 2, 12, 1, None),
        (1, 129, 2, 2, 16, 70, None),
        (1, 21, 4, 1, 256, 9, Some(0.0625)),
    ] {
        let s = shape(batch, seq, heads, kv_heads, d, window, scale);
        assert!(s.fits_matmul_path(&ctx, 1 << 30), "{s:?}");
        let q = rng.vec(batch * seq * heads * d);
        let k = rng.vec(batch * seq * kv_heads * d);
        let v = rng.vec(batch * seq * kv_heads * d);
        let (want, want_lse) =
            reference::attention_forward(&q, &k, &v, batch, seq, heads, kv_heads, d, window, s.scale as f64);
        let qt = ctx.upload_f32("q", &[batch, seq, heads, d], &q).unwrap();
        let kt = ctx.upload_f32("k", &[batch, seq, kv_heads, d], &k).unwrap();
        let vt = ctx.upload_f32("v", &[batch, seq, kv_heads, d], &v).unwrap();
        let out = poisoned(&ctx, "out", &[batch, seq, heads, d]);
        let lse = poisoned(&ctx, "lse", &[batch, heads, seq]);
        let scratch = attention_scratch(&ctx, &s, false);
        let mut step = Step::new();
        attention_forward_mm(&ctx, &mut step, s, &qt, &kt, &vt, &out, &lse, &scratch).unwrap();
        run(&ctx, step);
        assert_close(&ctx, &format!("attention (matmuls) {s:?}"), &out, &want, TOL);
        assert_close(&ctx, &format!("attention (matmuls) lse {s:?}"), &lse, &want_lse, TOL);
    }
}

/// Generation appends queries after a KV cache: rows q_offset.. of full causal attention.
#[test]
fn attention_after_a_kv_cache_matches_reference() {
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(31);
    for (q_offset, seq, heads, kv_heads, d, window) in [
        (0, 1, 1, 1, 4, 0),
        (6, 1, 5, 1, 6, 0),
        (5, 3, 9, 3, 64, 0),
        (32, 1, 4, 2, 8, 0),
        (32, 1, 4, 2, 8, 5),
        (9, 4, 3, 1, 6, 6),
    ] {
        let kv_seq = q_offset + seq;
        let q_full = rng.vec(kv_seq * heads * d);
        let k = rng.vec(kv_seq * kv_heads * d);
        let v = rng.vec(kv_seq * kv_heads * d);
        let scale = 1.0 / (d as f64).sqrt();
        let (full, full_lse) =
            reference::attention_forward(&q_full, &k, &v, 1, kv_seq, heads, kv_heads, d, window, scale);
        let want = &full[q_offset * heads * d..];
        let want_lse: Vec<f64> =
            (0..heads).flat_map(|h| full_lse[h * kv_seq + q_offset..(h + 1) * kv_seq].to_vec()).collect();
        let s = AttentionShape { q_offset, ..shape(1, seq, heads, kv_heads, d, window, None) };
        let qt = ctx.upload_f32("q", &[1, seq, heads, d], &q_full[q_offset * heads * d..]).unwrap();
        let kt = ctx.upload_f32("k", &[1, kv_seq, kv_heads, d], &k).unwrap();
        let vt = ctx.upload_f32("v", &[1, kv_seq, kv_heads, d], &v).unwrap();
        let out = poisoned(&ctx, "out", &[1, seq, heads, d]);
        let lse = poisoned(&ctx, "lse", &[1, heads, seq]);
        let mut step = Step::new();
        attention_forward(&ctx, &mut step, s, &qt, &kt, &vt, &out, &lse).unwrap();
        run(&ctx, step);
        assert_close(&ctx, &format!("cached attention {s:?}"), &out, want, TOL);
        assert_close(&ctx, &format!("cached attention lse {s:?}"), &lse, &want_lse, TOL);
    }
}

#[test]
fn copy_appends_rows_at_an_offset() {
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(32);
    let cache = ctx.upload_f32("cache", &[10, 6], &[0.5; 60]).unwrap();
    let rows = rng.vec(18);
    let x = ctx.upload_f32("x", &[3, 6], &rows).unwrap();
    let mut step = Step::new();
    portalora::ops::elementwise::copy_forward(&ctx, &mut step, &x, &cache, 7 * 6 - 6).unwrap();
    run(&ctx, step);
    let mut want = vec![0.5f64; 60];
    for (i, &v) in rows.iter().enumerate() {
        want[36 + i] = v as f64;
    }
    assert_close(&ctx, "copy into cache", &cache, &want, 0.0);
    let e = portalora::ops::elementwise::copy_forward(&ctx, &mut Step::new(), &x, &cache, 50).unwrap_err();
    assert!(e.to_string().contains("offset 50") && e.to_string().contains("\"cache\""), "{e}");
}

#[test]
fn swiglu_and_embed_match_reference() {
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(4);
    for n in [1, 7, 33, 129, 70_001] {
        let (g, u) = (rng.vec(n), rng.vec(n));
        let (gt, ut) = (ctx.upload_f32("g", &[n], &g).unwrap(), ctx.upload_f32("u", &[n], &u).unwrap());
        let out = poisoned(&ctx, "out", &[n]);
        let mut step = Step::new();
        swiglu_forward(&ctx, &mut step, &gt, &ut, &out).unwrap();
        run(&ctx, step);
        assert_close(&ctx, &format!("swiglu n={n}"), &out, &reference::swiglu_forward(&g, &u), TOL);
    }
    for (vocab, dim, tokens) in [(1, 1, 1), (61, 30, 7), (129, 33, 129)] {
        let table = rng.vec(vocab * dim);
        let ids: Vec<u32> = (0..tokens).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
        let tt = ctx.upload_f32("table", &[vocab, dim], &table).unwrap();
        let it = ctx.upload_u32("ids", &[tokens], &ids).unwrap();
        let out = poisoned(&ctx, "out", &[tokens, dim]);
        let mut step = Step::new();
        embed_forward(&ctx, &mut step, &it, &tt, &out).unwrap();
        run(&ctx, step);
        assert_close(&ctx, &format!("embed {vocab}x{dim}"), &out, &reference::embed_forward(&ids, &table, dim), 0.0);
    }
}

#[test]
fn xent_matches_reference() {
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(5);
    for (rows, vocab) in [(1, 1), (7, 33), (33, 7), (5, 49152), (129, 61)] {
        // Spread logits so that the max-subtraction matters.
        let logits: Vec<f32> = rng.vec(rows * vocab).into_iter().map(|v| v * 30.0).collect();
        let targets: Vec<u32> =
            (0..rows).map(|r| if r % 3 == 2 { IGNORE } else { (rng.next_u64() % vocab as u64) as u32 }).collect();
        let (want_loss, want_lse) = reference::xent_forward(&logits, &targets);
        let lt = ctx.upload_f32("logits", &[rows, vocab], &logits).unwrap();
        let tt = ctx.upload_u32("targets", &[rows], &targets).unwrap();
        let (loss, lse) = (poisoned(&ctx, "loss", &[rows]), poisoned(&ctx, "lse", &[rows]));
        let mut step = Step::new();
        xent_forward(&ctx, &mut step, &lt, &tt, &loss, &lse).unwrap();
        run(&ctx, step);
        assert_close(&ctx, &format!("xent loss {rows}x{vocab}"), &loss, &want_loss, TOL);
        assert_close(&ctx, &format!("xent lse {rows}x{vocab}"), &lse, &want_lse, TOL);
    }
}

/// Central finite differences of `loss` (an f64 function of f32 inputs) at `n` coordinates of
/// `x`, compared with the GPU gradient `grad`. Returns the largest error relative to max|grad|.
fn fd_error(x: &[f32], grad: &[f32], loss: &dyn Fn(&[f32]) -> f64, rng: &mut Rng, n: usize) -> f64 {
    let scale = grad.iter().fold(0.0f32, |m, g| m.max(g.abs())).max(1e-12) as f64;
    let mut worst = 0.0f64;
    for _ in 0..n {
        let i = (rng.next_u64() % x.len() as u64) as usize;
        let eps = 1e-2f32 * x[i].abs().max(0.1);
        let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
        xp[i] += eps;
        xm[i] -= eps;
        let fd = (loss(&xp) - loss(&xm)) / (xp[i] as f64 - xm[i] as f64);
        worst = worst.max((fd - grad[i] as f64).abs() / scale);
    }
    worst
}

fn dot(a: &[f64], c: &[f32]) -> f64 {
    a.iter().zip(c).map(|(a, &c)| a * c as f64).sum()
}

const FD_TOL: f64 = 2e-3;

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    use portalora::ops::norm::rmsnorm_backward;
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(41);
    for (rows, dim) in [(1, 1), (7, 33), (3, 129)] {
        let (x, w, c, r) = (rng.vec(rows * dim), rng.vec(dim), rng.vec(rows * dim), rng.vec(rows * dim));
        let (xt, wt, ct, rt) = (
            ctx.upload_f32("x", &[rows, dim], &x).unwrap(),
            ctx.upload_f32("w", &[dim], &w).unwrap(),
            ctx.upload_f32("dy", &[rows, dim], &c).unwrap(),
            ctx.upload_f32("dresid", &[rows, dim], &r).unwrap(),
        );
        let (out, rstd, dx) =
            (poisoned(&ctx, "out", &[rows, dim]), poisoned(&ctx, "rstd", &[rows]), poisoned(&ctx, "dx", &[rows, dim]));
        let mut step = Step::new();
        rmsnorm_forward(&ctx, &mut step, &xt, &wt, 1e-5, &out, &rstd).unwrap();
        rmsnorm_backward(&ctx, &mut step, &xt, &wt, &rstd, &ct, Some(&rt), &dx).unwrap();
        run(&ctx, step);
        let grad = ctx.read_f32(&dx).unwrap();
        // L(x) = c · rmsnorm(x) + r · x, so dL/dx = backward(c) + r.
        let loss = |x: &[f32]| {
            dot(&reference::rmsnorm_forward(x, &w, 1e-5).0, &c)
                + dot(&x.iter().map(|&v| v as f64).collect::<Vec<_>>(), &r)
        };
        let err = fd_error(&x, &grad, &loss, &mut rng, 40);
        assert!(err <= FD_TOL, "rmsnorm_backward {rows}x{dim}: {err:e}");
    }
}

/// Gemma's GeGLU: forward against the f64 reference, backward against finite differences.
#[test]
fn geglu_matches_reference_and_finite_differences() {
    use portalora::ops::act::{geglu_backward, geglu_forward};
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(45);
    for n in [1, 7, 129, 1000, 70_001] {
        let (g, u, c) = (rng.vec(n).iter().map(|v| v * 4.0).collect::<Vec<f32>>(), rng.vec(n), rng.vec(n));
        let up = |l: &str, d: &[f32]| ctx.upload_f32(l, &[n], d).unwrap();
        let (gt, ut, ct) = (up("g", &g), up("u", &u), up("c", &c));
        let (out, dg, du) = (poisoned(&ctx, "out", &[n]), poisoned(&ctx, "dg", &[n]), poisoned(&ctx, "du", &[n]));
        let mut step = Step::new();
        geglu_forward(&ctx, &mut step, &gt, &ut, &out).unwrap();
        geglu_backward(&ctx, &mut step, &gt, &ut, &ct, &dg, &du).unwrap();
        run(&ctx, step);
        assert_close(&ctx, &format!("geglu n={n}"), &out, &reference::geglu_forward(&g, &u), TOL);
        if n > 1000 {
            continue; // finite differences on the smaller sizes
        }
        let (dgv, duv) = (ctx.read_f32(&dg).unwrap(), ctx.read_f32(&du).unwrap());
        let err_g = fd_error(&g, &dgv, &|g| dot(&reference::geglu_forward(g, &u), &c), &mut rng, 30);
        let err_u = fd_error(&u, &duv, &|u| dot(&reference::geglu_forward(&g, u), &c), &mut rng, 30);
        assert!(err_g <= FD_TOL && err_u <= FD_TOL, "geglu_backward n={n}: {err_g:e} {err_u:e}");
    }
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    use portalora::ops::act::swiglu_backward;
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(42);
    for n in [1, 7, 129, 1000] {
        let (g, u, c) = (rng.vec(n).iter().map(|v| v * 4.0).collect::<Vec<f32>>(), rng.vec(n), rng.vec(n));
        let (gt, ut, ct) = (
            ctx.upload_f32("g", &[n], &g).unwrap(),
            ctx.upload_f32("u", &[n], &u).unwrap(),
            ctx.upload_f32("c", &[n], &c).unwrap(),
        );
        let (dg, du) = (poisoned(&ctx, "dg", &[n]), poisoned(&ctx, "du", &[n]));
        let mut step = Step::new();
        swiglu_backward(&ctx, &mut step, &gt, &ut, &ct, &dg, &du).unwrap();
        run(&ctx, step);
        let (dgv, duv) = (ctx.read_f32(&dg).unwrap(), ctx.read_f32(&du).unwrap());
        let err_g = fd_error(&g, &dgv, &|g| dot(&reference::swiglu_forward(g, &u), &c), &mut rng, 30);
        let err_u = fd_error(&u, &duv, &|u| dot(&reference::swiglu_forward(&g, u), &c), &mut rng, 30);
        assert!(err_g <= FD_TOL && err_u <= FD_TOL, "swiglu_backward n={n}: {err_g:e} {err_u:e}");
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    let shapes = [
        (1, 1, 1, 1, 2, 0),
        (2, 7, 5, 1, 6, 0),
        (1, 9, 4, 2, 8, 3),
        (1, 33, 3, 3, 5, 0),
        (2, 70, 4, 2, 4, 0),
        (2, 70, 4, 2, 4, 9),
        (1, 65, 3, 1, 12, 64),
        (1, 20, 2, 1, 7, 1),
        (1, 11, 2, 1, 256, 4),
    ];
    check_attention_backward(false, 43, &shapes);
}

#[test]
fn attention_backward_as_matmuls_matches_finite_differences() {
    let shapes = [
        (1, 1, 1, 1, 4, 0),
        (2, 7, 6, 2, 8, 0),
        (1, 9, 4, 2, 8, 2),
        (1, 33, 3, 3, 12, 0),
        (2, 70, 4, 2, 4, 0),
        (2, 70, 4, 2, 4, 9),
        (1, 129, 3, 1, 16, 65),
        (1, 11, 2, 1, 256, 4),
    ];
    check_attention_backward(true, 47, &shapes);
}

/// Forward then backward (fused kernels, or batched matmuls with `matmuls`) against finite
/// differences of the f64 reference, for (batch, seq, heads, kv_heads, head_dim, window) shapes;
/// every other shape with a scale other than 1/√d.
fn check_attention_backward(matmuls: bool, seed: u64, shapes: &[(usize, usize, usize, usize, usize, usize)]) {
    use portalora::ops::attention::{attention_backward, attention_backward_mm, attention_forward_mm};
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(seed);
    for (i, &(batch, seq, heads, kv_heads, d, window)) in shapes.iter().enumerate() {
        let s = shape(batch, seq, heads, kv_heads, d, window, (i % 2 == 1).then_some(0.37));
        let (nq, nk, nl) = (batch * seq * heads * d, batch * seq * kv_heads * d, batch * heads * seq);
        let (q, k, v, c) = (rng.vec(nq), rng.vec(nk), rng.vec(nk), rng.vec(nq));
        let up = |l: &str, data: &[f32], n: usize| ctx.upload_f32(l, &[n], data).unwrap();
        let (qt, kt, vt, ct) = (up("q", &q, nq), up("k", &k, nk), up("v", &v, nk), up("dout", &c, nq));
        let (out, lse, dsum) =
            (poisoned(&ctx, "out", &[nq]), poisoned(&ctx, "lse", &[nl]), poisoned(&ctx, "dsum", &[nl]));
        let (dq, dk, dv) = (poisoned(&ctx, "dq", &[nq]), poisoned(&ctx, "dk", &[nk]), poisoned(&ctx, "dv", &[nk]));
        let mut step = Step::new();
        if matmuls {
            let scratch = attention_scratch(&ctx, &s, true);
            attention_forward_mm(&ctx, &mut step, s, &qt, &kt, &vt, &out, &lse, &scratch).unwrap();
            attention_backward_mm(&ctx, &mut step, s, &qt, &kt, &vt, &lse, &ct, &dq, &dk, &dv, &scratch).unwrap();
        } else {
            attention_forward(&ctx, &mut step, s, &qt, &kt, &vt, &out, &lse).unwrap();
            attention_backward(&ctx, &mut step, s, &qt, &kt, &vt, &out, &lse, &ct, &dq, &dk, &dv, &dsum).unwrap();
        }
        run(&ctx, step);
        let f = |q: &[f32], k: &[f32], v: &[f32]| {
            dot(&reference::attention_forward(q, k, v, batch, seq, heads, kv_heads, d, window, s.scale as f64).0, &c)
        };
        let e_q = fd_error(&q, &ctx.read_f32(&dq).unwrap(), &|x| f(x, &k, &v), &mut rng, 25);
        let e_k = fd_error(&k, &ctx.read_f32(&dk).unwrap(), &|x| f(&q, x, &v), &mut rng, 25);
        let e_v = fd_error(&v, &ctx.read_f32(&dv).unwrap(), &|x| f(&q, &k, x), &mut rng, 25);
        assert!(
            e_q <= FD_TOL && e_k <= FD_TOL && e_v <= FD_TOL,
            "attention backward (matmuls: {matmuls}) {s:?}: dq {e_q:e} dk {e_k:e} dv {e_v:e}"
        );
    }
}

/// Cross-entropy's backward, plain and through a final logit soft-cap (Gemma 2's
/// `cap · tanh(x / cap)`, in place before the loss), against finite differences of the f64 loss.
#[test]
fn xent_backward_matches_finite_differences() {
    use portalora::ops::elementwise::softcap_forward;
    use portalora::ops::xent::xent_backward;
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(44);
    for (rows, vocab, cap) in
        [(1, 2, None), (7, 33, None), (5, 1000, None), (7, 33, Some(3.0f32)), (5, 1000, Some(7.5))]
    {
        let logits: Vec<f32> = rng.vec(rows * vocab).iter().map(|v| v * 5.0).collect();
        let targets: Vec<u32> =
            (0..rows).map(|r| if r == 2 { IGNORE } else { (rng.next_u64() % vocab as u64) as u32 }).collect();
        let scale = 1.0 / rows as f32;
        let lt = ctx.upload_f32("logits", &[rows, vocab], &logits).unwrap();
        let tt = ctx.upload_u32("targets", &[rows], &targets).unwrap();
        let (loss, lse) = (poisoned(&ctx, "loss", &[rows]), poisoned(&ctx, "lse", &[rows]));
        let mut step = Step::new();
        if let Some(c) = cap {
            softcap_forward(&ctx, &mut step, c, &lt).unwrap();
        }
        xent_forward(&ctx, &mut step, &lt, &tt, &loss, &lse).unwrap();
        let st = ctx.upload_f32("scale", &[1], &[scale]).unwrap();
        xent_backward(&ctx, &mut step, &lt, &tt, &lse, &st, cap.unwrap_or(0.0)).unwrap();
        run(&ctx, step);
        let grad = ctx.read_f32(&lt).unwrap();
        let capped = |x: &[f32]| -> Vec<f32> {
            match cap {
                Some(c) => x.iter().map(|&v| ((c as f64) * (v as f64 / c as f64).tanh()) as f32).collect(),
                None => x.to_vec(),
            }
        };
        assert_close(
            &ctx,
            &format!("xent loss {rows}x{vocab} cap {cap:?}"),
            &loss,
            &reference::xent_forward(&capped(&logits), &targets).0,
            TOL,
        );
        let f = |x: &[f32]| reference::xent_forward(&capped(x), &targets).0.iter().sum::<f64>() * scale as f64;
        let err = fd_error(&logits, &grad, &f, &mut rng, 40);
        assert!(err <= FD_TOL, "xent_backward {rows}x{vocab} cap {cap:?}: {err:e}");
    }
}

#[test]
fn layernorm_forward_and_backward() {
    use portalora::ops::norm::{layernorm_backward, layernorm_forward};
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(51);
    for (rows, dim) in [(1, 2), (7, 33), (3, 129), (2, 768)] {
        let (x, w, b, c, r) =
            (rng.vec(rows * dim), rng.vec(dim), rng.vec(dim), rng.vec(rows * dim), rng.vec(rows * dim));
        let up = |l: &str, d: &[f32]| ctx.upload_f32(l, &[d.len()], d).unwrap();
        let (xt, wt, bt, ct, rt) = (up("x", &x), up("w", &w), up("b", &b), up("dy", &c), up("dresid", &r));
        let (out, mean, rstd, dx) = (
            poisoned(&ctx, "out", &[rows * dim]),
            poisoned(&ctx, "mean", &[rows]),
            poisoned(&ctx, "rstd", &[rows]),
            poisoned(&ctx, "dx", &[rows * dim]),
        );
        let mut step = Step::new();
        layernorm_forward(&ctx, &mut step, &xt, &wt, &bt, 1e-5, &out, &mean, &rstd).unwrap();
        layernorm_backward(&ctx, &mut step, &xt, &wt, &mean, &rstd, &ct, Some(&rt), &dx).unwrap();
        run(&ctx, step);
        assert_close(
            &ctx,
            &format!("layernorm {rows}x{dim}"),
            &out,
            &reference::layernorm_forward(&x, &w, &b, 1e-5),
            TOL,
        );
        let loss = |x: &[f32]| {
            dot(&reference::layernorm_forward(x, &w, &b, 1e-5), &c)
                + x.iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
        };
        let err = fd_error(&x, &ctx.read_f32(&dx).unwrap(), &loss, &mut rng, 40);
        assert!(err <= FD_TOL, "layernorm_backward {rows}x{dim}: {err:e}");
    }
}

#[test]
fn gelu_forward_and_backward_and_bias() {
    use portalora::ops::act::{gelu_backward, gelu_forward};
    use portalora::ops::elementwise::bias_forward;
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(52);
    for n in [1, 7, 129, 5000] {
        let (x, c) = (rng.vec(n).iter().map(|v| v * 4.0).collect::<Vec<f32>>(), rng.vec(n));
        let (xt, ct) = (ctx.upload_f32("x", &[n], &x).unwrap(), ctx.upload_f32("c", &[n], &c).unwrap());
        let (out, dx) = (poisoned(&ctx, "out", &[n]), poisoned(&ctx, "dx", &[n]));
        let mut step = Step::new();
        gelu_forward(&ctx, &mut step, &xt, &out).unwrap();
        gelu_backward(&ctx, &mut step, &xt, &ct, &dx).unwrap();
        run(&ctx, step);
        assert_close(&ctx, &format!("gelu n={n}"), &out, &reference::gelu_forward(&x), TOL);
        let err = fd_error(&x, &ctx.read_f32(&dx).unwrap(), &|x| dot(&reference::gelu_forward(x), &c), &mut rng, 30);
        assert!(err <= FD_TOL, "gelu_backward n={n}: {err:e}");
    }
    for (rows, dim) in [(1, 1), (7, 33), (129, 3)] {
        let (m, b) = (rng.vec(rows * dim), rng.vec(dim));
        let (mt, bt) = (ctx.upload_f32("m", &[rows, dim], &m).unwrap(), ctx.upload_f32("b", &[dim], &b).unwrap());
        let mut step = Step::new();
        bias_forward(&ctx, &mut step, &bt, &mt).unwrap();
        run(&ctx, step);
        let want: Vec<f64> = m.iter().enumerate().map(|(i, &v)| v as f64 + b[i % dim] as f64).collect();
        assert_close(&ctx, &format!("bias {rows}x{dim}"), &mt, &want, TOL);
    }
}

/// Documents packed into rows: each query sees only its own document's keys (and the window).
/// Reference: the f64 attention of each document alone, placed at its rows; both the fused
/// kernels (scalar and vec4 head dims) and the matmul path, outputs and lse poisoned first.
#[test]
fn attention_within_packed_documents_matches_reference() {
    use portalora::ops::attention::{attention_forward_in_docs, attention_forward_mm};
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(53);
    for (batch, seq, heads, kv_heads, d, window) in
        [(1, 1, 1, 1, 4, 0), (2, 17, 6, 2, 8, 3), (1, 33, 9, 3, 6, 0), (3, 23, 4, 1, 12, 0), (1, 40, 2, 2, 16, 7)]
    {
        let s = AttentionShape { docs: true, ..shape(batch, seq, heads, kv_heads, d, window, None) };
        let (q, k, v) = (
            rng.vec(batch * seq * heads * d),
            rng.vec(batch * seq * kv_heads * d),
            rng.vec(batch * seq * kv_heads * d),
        );
        // Random document boundaries in each row.
        let mut pos = Vec::new();
        for _ in 0..batch {
            let mut p = 0u32;
            for t in 0..seq {
                p = if t == 0 || rng.next_u64().is_multiple_of(5) { 0 } else { p + 1 };
                pos.push(p);
            }
        }
        let (mut want, mut want_lse) = (vec![0.0; q.len()], vec![0.0; batch * heads * seq]);
        for b in 0..batch {
            let mut start = 0;
            while start < seq {
                let end = (start + 1..seq).find(|&t| pos[b * seq + t] == 0).unwrap_or(seq);
                let n = end - start;
                let rows = |x: &[f32], w: usize| x[(b * seq + start) * w..(b * seq + end) * w].to_vec();
                let (o, l) = reference::attention_forward(
                    &rows(&q, heads * d),
                    &rows(&k, kv_heads * d),
                    &rows(&v, kv_heads * d),
                    1,
                    n,
                    heads,
                    kv_heads,
                    d,
                    window,
                    s.scale as f64,
                );
                want[(b * seq + start) * heads * d..(b * seq + end) * heads * d].copy_from_slice(&o);
                for h in 0..heads {
                    for t in 0..n {
                        want_lse[(b * heads + h) * seq + start + t] = l[h * n + t];
                    }
                }
                start = end;
            }
        }
        let qt = ctx.upload_f32("q", &[batch, seq, heads, d], &q).unwrap();
        let kt = ctx.upload_f32("k", &[batch, seq, kv_heads, d], &k).unwrap();
        let vt = ctx.upload_f32("v", &[batch, seq, kv_heads, d], &v).unwrap();
        let pt = ctx.upload_u32("positions", &[batch * seq], &pos).unwrap();
        let n_lse = batch * heads * seq;
        let check = |what: &str, out: &Tensor, lse: &Tensor| {
            assert_close(&ctx, &format!("{what} {s:?}"), out, &want, TOL);
            let got = ctx.read_f32(lse).unwrap();
            let err = max_rel_error(&got[..n_lse], &want_lse);
            assert!(err <= TOL, "{what} lse {s:?}: relative error {err:e}");
        };
        let (out, lse) =
            (poisoned(&ctx, "out", &[batch, seq, heads, d]), poisoned(&ctx, "lse", &[n_lse + batch * seq]));
        let mut step = Step::new();
        attention_forward_in_docs(&ctx, &mut step, s, &qt, &kt, &vt, &out, &lse, Some(&pt)).unwrap();
        run(&ctx, step);
        check("fused attention in documents", &out, &lse);
        if s.fits_matmul_path(&ctx, 1 << 30) {
            let (out, lse) = (poisoned(&ctx, "out", &[batch, seq, heads, d]), poisoned(&ctx, "lse", &[n_lse]));
            let scratch = portalora::ops::attention::AttentionScratch {
                positions: Some(pt.clone()),
                ..attention_scratch(&ctx, &s, false)
            };
            let mut step = Step::new();
            attention_forward_mm(&ctx, &mut step, s, &qt, &kt, &vt, &out, &lse, &scratch).unwrap();
            run(&ctx, step);
            check("attention (matmuls) in documents", &out, &lse);
        }
    }
}
