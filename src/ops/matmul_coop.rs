//! The matmul's cooperative-matrix path (shaders/matmul_coop.wgsl): the product on the matrix
//! units (tensor cores, simdgroup matrices), f16 operands rounded as they are staged, f32
//! accumulation, through wgpu's experimental `EXPERIMENTAL_COOPERATIVE_MATRIX`.
//!
//! Which products take it: those whose caller says A's values fit f16 ([`Matmul::coop`]: the
//! forward pass's frozen projections and the LM head, whose inputs are normed activations),
//! not transposed A, one batch, an f32 or packed B, on a device with a square f16 → f32
//! cooperative matrix ([`crate::gpu::Features::coop_size`]). Gradients stay on the f32 paths:
//! they are far below f16's normal range (a loss averaged over 512 tokens gives logit gradients
//! near 1e-6). `PORTALORA_COOP` decides ([`CoopMode`]): `auto` (the default) takes the path
//! where the autotune found it correct (against the subgroup kernel, within f16's rounding) and
//! faster on this adapter, `on` wherever it fits, `off` never.

use std::fmt::Write as _;

use super::{uniform, Matmul, Params, OP};
use crate::gpu::{kernel_sources, Arg, Context, CoopMode, DType, KernelSpec, Result, Step, Tensor};

/// A workgroup's tile for matrices of side `t`: (rows, columns, K step).
fn tile(t: u32) -> (u32, u32, u32) {
    if t >= 16 {
        (64, 64, 32)
    } else {
        (32, 32, 32)
    }
}

/// Lanes per workgroup: one subgroup, the adapter's widest (a workgroup narrower than the
/// subgroup would leave lanes of a cooperative operation idle).
fn lanes(ctx: &Context) -> u32 {
    ctx.info().subgroup_max_size.clamp(4, 128)
}

/// Workgroup memory of one workgroup's tiles, in bytes.
fn workgroup_bytes(t: u32) -> u32 {
    let (bm, bn, bk) = tile(t);
    2 * (bm * bk + bk * bn) + 4 * bm * bn
}

/// The kernel for cooperative matrices of side `t`, `s` lanes, B stored (N, K) with `trans_b`,
/// and B stored as `b` (F32, or packed as the subgroup kernel reads it). Public so that the WGSL
/// validation test expands it.
pub fn coop_kernel(t: u32, s: u32, trans_b: bool, b: DType) -> KernelSpec {
    let (bm, bn, bk) = tile(t);
    let packed = b != DType::F32;
    let (acc, mma, store) = coop_bodies(t, trans_b);
    KernelSpec::new(&kernel_sources::MATMUL_COOP, "matmul_coop_forward")
        .flag("TRANS_B", trans_b)
        .flag("QB", packed)
        .var("QLOAD", if packed { crate::ops::quant::load4_wgsl(b, "qload4", "b", "p.qoff") } else { String::new() })
        .var("S", s)
        .var("BM", bm)
        .var("BN", bn)
        .var("BK", bk)
        .var("SA", bm * bk)
        .var("SB", bk * bn)
        .var("SC", bm * bn)
        .var("ACC", acc)
        .var("MMA", mma)
        .var("STORE", store)
}

/// The generated parts of the kernel: the accumulators `acc_I_J` (tile row I, column J), the
/// multiply-adds of one staged K step, and the stores into workgroup memory. WGSL has no arrays
/// of cooperative matrices, hence one named variable each.
fn coop_bodies(t: u32, trans_b: bool) -> (String, String, String) {
    let (bm, bn, bk) = tile(t);
    let (wm, wn) = (bm / t, bn / t);
    let mat = |role: &str, ty: &str| format!("coop_mat{t}x{t}<{ty}, {role}>");
    let (mut acc, mut mma, mut store) = (String::new(), String::new(), String::new());
    for i in 0..wm {
        for j in 0..wn {
            let _ = writeln!(acc, "    var acc_{i}_{j} = {}();", mat("C", "f32"));
        }
    }
    for kt in 0..bk / t {
        let _ = writeln!(mma, "        {{");
        for i in 0..wm {
            let _ = writeln!(
                mma,
                "            let a_{i} = coopLoadT<{}>(&sa[{}u], BK);",
                mat("A", "f16"),
                i * t * bk + kt * t
            );
        }
        for j in 0..wn {
            // op(B)'s tile is row-major (BK, BN), or with TRANS_B column-major (stride BK).
            let (load, at, stride) = if trans_b {
                ("coopLoad", j * t * bk + kt * t, "BK")
            } else {
                ("coopLoadT", kt * t * bn + j * t, "BN")
            };
            let _ = writeln!(mma, "            let b_{j} = {load}<{}>(&sb[{at}u], {stride});", mat("B", "f16"));
        }
        for i in 0..wm {
            for j in 0..wn {
                let _ = writeln!(mma, "            acc_{i}_{j} = coopMultiplyAdd(a_{i}, b_{j}, acc_{i}_{j});");
            }
        }
        let _ = writeln!(mma, "        }}");
    }
    for i in 0..wm {
        for j in 0..wn {
            // Named first: naga 30's SPIR-V writer does not emit a cooperative store's operands
            // itself ("Expression [..] is not cached").
            let _ = writeln!(store, "    {{\n        let r = acc_{i}_{j};\n        let at = {}u;", i * t * bn + j * t);
            let _ = writeln!(store, "        coopStoreT(r, &sc[at], BN);\n    }}");
        }
    }
    (acc, mma, store)
}

/// The side of the cooperative matrices this product would run on, if it fits the path (see
/// the module's doc), before the mode and the autotune have their say.
fn fits(ctx: &Context, b: &Tensor, opts: Matmul, p: &Params) -> Option<u32> {
    let t = ctx.features().coop_size?;
    let packed = b.dtype() != DType::F32;
    let aligned = p.k.is_multiple_of(4) && p.n.is_multiple_of(4) && p.ldb.is_multiple_of(4);
    let ok = opts.coop
        && opts.path == super::MatmulPath::Auto
        && !opts.trans_a
        && p.batch == 1
        && (!packed || aligned)
        && workgroup_bytes(t) <= ctx.limits().max_workgroup_storage;
    ok.then_some(t)
}

/// Whether [`super::matmul`] records this product on cooperative matrices.
pub(super) fn takes(ctx: &Context, b: &Tensor, opts: Matmul, p: &Params) -> bool {
    let Some(t) = fits(ctx, b, opts, p) else { return false };
    match ctx.features().coop_mode {
        CoopMode::Off => false,
        CoopMode::On => true,
        CoopMode::Auto => wins(ctx, t),
    }
}

/// Records `C = alpha·A·op(B) (+ C)` on cooperative matrices of side `t`.
pub(super) fn record(
    ctx: &Context,
    step: &mut Step,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    p: &Params,
    trans_b: bool,
) -> Result<()> {
    let t = ctx.features().coop_size.expect("checked by takes");
    let (bm, bn, _) = tile(t);
    let spec = coop_kernel(t, lanes(ctx), trans_b, b.dtype());
    let args = [Arg::Uniform(uniform(OP, p)?), Arg::Read(a), Arg::Read(b), Arg::Write(c)];
    ctx.record(step, &spec, &args, [p.n.div_ceil(bn), p.m.div_ceil(bm), 1])
}

/// `auto`'s decision for this adapter, timed once and kept ([`Context::tuned`]): the path is
/// taken when its result on a 512×576×576 projection agrees with an f64 product of the same
/// f16-rounded operands within 1e-3 and with the subgroup kernel's within 1e-2 (f16's rounding;
/// both relative to the largest output: a driver that computes it wrongly never gets it) and it
/// runs at least 5% faster. The browser (which cannot wait for the GPU) and `PORTALORA_AUTOTUNE=0` never take it.
fn wins(ctx: &Context, t: u32) -> bool {
    #[cfg(target_arch = "wasm32")]
    {
        let _ = (ctx, t);
        false
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        if ctx.options().no_autotune {
            return false;
        }
        let version = super::tile::fnv1a(&format!("{}{:?}", kernel_sources::MATMUL_COOP.wgsl, tile(t)));
        ctx.tuned(&format!("matmul_coop_t{t}_{version:016x}"), || match race(ctx, 512, 576, 576) {
            Ok(r)
                if r.max_rel_error <= 1e-3
                    && r.max_rel_error_vs_f32 <= 1e-2
                    && r.coop_seconds < 0.95 * r.subgroup_seconds =>
            {
                1
            }
            _ => 0,
        }) == 1
    }
}

/// What [`race`] found: the two paths on one `x·Wᵀ` product of random values.
#[derive(Clone, Debug)]
pub struct CoopRace {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Largest |coop − f64| / max |f64|, the f64 product taken of the f16-rounded operands
    /// (so only the accumulation differs), on every 7th row.
    pub max_rel_error: f64,
    /// The same against the f32 subgroup kernel's result (what f16 operands cost).
    pub max_rel_error_vs_f32: f64,
    /// Median seconds of one product on each path.
    pub coop_seconds: f64,
    pub subgroup_seconds: f64,
}

/// Runs `x (m, k) · Wᵀ` with `W (n, k)` on both paths, checks the cooperative one and times
/// both (`portalora bench coop`, and `auto`'s decision).
#[cfg(not(target_arch = "wasm32"))]
pub fn race(ctx: &Context, m: usize, n: usize, k: usize) -> Result<CoopRace> {
    use super::check_shapes;
    use crate::io::half::{f16_to_f32, f32_to_f16};
    if ctx.features().coop_size.is_none() {
        return Err(crate::gpu::GpuError::MissingFeature {
            feature: "square f16 → f32 cooperative matrices (wgpu EXPERIMENTAL_COOPERATIVE_MATRIX)",
            adapter: ctx.info().name.clone(),
        });
    }
    let mut rng = crate::rng::Rng::new(3);
    let (xv, wv) = (rng.vec(m * k), rng.vec(n * k));
    let _kind = ctx.alloc_kind("other");
    let x = ctx.upload_f32("coop race x", &[m, k], &xv)?;
    let w = ctx.upload_f32("coop race W", &[n, k], &wv)?;
    let outs = [ctx.tensor("coop race C", &[m, n], DType::F32)?, ctx.tensor("coop race C f32", &[m, n], DType::F32)?];
    let p = check_shapes(ctx, &x, &w, &outs[0], Matmul::nt())?;
    let mut steps = [Step::new(), Step::new()];
    record(ctx, &mut steps[0], &x, &w, &outs[0], &p, true)?;
    super::matmul(ctx, &mut steps[1], &x, &w, &outs[1], Matmul::nt())?;
    let mut seconds = [0.0; 2];
    for (i, step) in steps.iter().enumerate() {
        ctx.fill_f32(&outs[i], f32::NAN)?;
        seconds[i] = super::median_seconds(ctx, step)?;
    }
    let (got, f32_path) = (ctx.read_f32(&outs[0])?, ctx.read_f32(&outs[1])?);
    let round = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| f16_to_f32(f32_to_f16(x)) as f64).collect() };
    let (xh, wh) = (round(&xv), round(&wv));
    let (mut worst, mut worst32, mut scale) = (0.0f64, 0.0f64, 0.0f64);
    let err = |g: f32, want: f64| if g.is_finite() { (g as f64 - want).abs() } else { f64::INFINITY };
    for i in (0..m).step_by(7) {
        for j in 0..n {
            let want: f64 = (0..k).map(|q| xh[i * k + q] * wh[j * k + q]).sum();
            scale = scale.max(want.abs());
            worst = worst.max(err(got[i * n + j], want));
            worst32 = worst32.max(err(got[i * n + j], f32_path[i * n + j] as f64));
        }
    }
    let scale = scale.max(f64::MIN_POSITIVE);
    Ok(CoopRace {
        m,
        n,
        k,
        max_rel_error: worst / scale,
        max_rel_error_vs_f32: worst32 / scale,
        coop_seconds: seconds[0],
        subgroup_seconds: seconds[1],
    })
}
