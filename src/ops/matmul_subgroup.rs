//! The matmul's subgroup kernel (shaders/matmul_subgroup.wgsl): its specialisation for a
//! subgroup size and tile, and the unrolled inner loop generated for it. Kept apart from
//! matmul.rs, which chooses among the paths and checks the operands.

use std::fmt::Write as _;

use super::{f16_native, uniform, Matmul, Params, Tile, OP};
use crate::gpu::{kernel_sources, Arg, Context, DType, KernelSpec, Result, Step, Tensor};
use crate::ops::shape_err;

/// Rows of C per workgroup in the subgroup kernel.
pub(super) const SG_TM: u32 = 32;

/// vec4 columns of C per lane in the subgroup kernel: two where subgroups are narrow (CPUs,
/// Intel), one where they are wide, to bound register use.
pub(super) fn sg_tnv(s: u32) -> u32 {
    if s <= 16 {
        2
    } else {
        1
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn record_subgroup(
    ctx: &Context,
    step: &mut Step,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    params: &Params,
    opts: Matmul,
    s: u32,
    tile: Tile,
) -> Result<()> {
    let f16 = f16_native(ctx, b, opts);
    let (spec, groups) = subgroup_spec(s, tile, params, opts.trans_a, opts.trans_b, b.dtype(), f16, false)?;
    let args = [Arg::Uniform(uniform(OP, params)?), Arg::Read(a), Arg::Read(b), Arg::Write(c)];
    ctx.record(step, &spec, &args, groups)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn subgroup_spec(
    s: u32,
    tile: Tile,
    p: &Params,
    trans_a: bool,
    trans_b: bool,
    b: DType,
    f16: bool,
    side: bool,
) -> Result<(KernelSpec, [u32; 3])> {
    let vec = p.lda.is_multiple_of(4)
        && p.ldb.is_multiple_of(4)
        && p.ldc.is_multiple_of(4)
        && p.k.is_multiple_of(4)
        && p.n.is_multiple_of(4)
        && (!trans_a || p.m.is_multiple_of(4))
        && p.stride_a.is_multiple_of(4)
        && p.stride_b.is_multiple_of(4)
        && p.stride_c.is_multiple_of(4);
    // Narrow outputs (LoRA's rank-r products) waste most of a wide tile.
    let tnv = if p.n <= 4 * s { 1 } else { tile.tnv };
    if b != DType::F32 && !vec {
        return Err(shape_err(
            OP,
            format!("a packed B needs K = {}, N = {} and the row strides to be multiples of 4", p.k, p.n),
        ));
    }
    let spec = subgroup_kernel_full(s, tile.tm, tnv, trans_a, trans_b, vec, b, side).flag("F16", f16);
    let groups = [p.n.div_ceil(4 * s * tnv), p.m.div_ceil(tile.tm), p.batch];
    Ok((spec, groups))
}

/// The subgroup kernel specialised for subgroup size `s`, `tm` rows and `tnv` vec4 columns per
/// lane. Public so that the WGSL validation test can expand it for many sizes.
pub fn subgroup_kernel(s: u32, tm: u32, tnv: u32, trans_a: bool, trans_b: bool, vec: bool) -> KernelSpec {
    subgroup_kernel_full(s, tm, tnv, trans_a, trans_b, vec, DType::F32, false)
}

/// [`subgroup_kernel`] reading B stored as `b` (F32, or packed F16 / Q8_0 / Q4_0 / Q4_1 with
/// `vec`), optionally with the fused side product (see [`Side`]; needs `vec` and A not
/// transposed). Its `F16` flag is off: `.flag("F16", true)` reads an f16 B with native loads
/// (needs shader-f16).
#[allow(clippy::too_many_arguments)]
pub fn subgroup_kernel_full(
    s: u32,
    tm: u32,
    tnv: u32,
    trans_a: bool,
    trans_b: bool,
    vec: bool,
    b: DType,
    side: bool,
) -> KernelSpec {
    let packed = b != DType::F32;
    KernelSpec::new(&kernel_sources::MATMUL_SUBGROUP, "matmul")
        .flag("VEC", vec)
        .flag("QB", packed)
        .flag("SIDE", side)
        .flag("F16", false)
        .var("QLOAD", if packed { crate::ops::quant::load4_wgsl(b, "qload4", "b", "p.qoff") } else { String::new() })
        .var("S", s)
        .var("TM", tm)
        .var("TNV", tnv)
        .var("TILE_N", 4 * s * tnv)
        .var("BODY", subgroup_body(s, tm, tnv, trans_a, trans_b, side && !trans_a))
}

/// Generates the unrolled body of the subgroup kernel. Names: `acc_R_V` accumulates row
/// `row0 + R` at this lane's vec4 column block V (columns `nV..nV+4`); `aS` is this lane's share
/// of A (slot S); `bV` is the 4×4 block of op(B) at the current k (its column j is
/// op(B)[k + j][nV..nV+4]), so `bV * x` adds `sum_j x[j] · op(B)[k + j][nV..nV+4]`.
///
/// Measured on lavapipe (see docs/BENCHMARKS.md): 32 rows × 2 vec4 columns per lane
/// is the sweet spot; larger tiles, unrolling k by 8 and explicit `fma` were all slower or equal.
fn subgroup_body(s: u32, tm: u32, tnv: u32, trans_a: bool, trans_b: bool, side: bool) -> String {
    assert!(tm.is_multiple_of(4) && s >= 1);
    let mut w = String::new();
    let (ind, ind2) = ("    ", "        ");
    for r in 0..tm {
        for v in 0..tnv {
            let _ = writeln!(w, "{ind}var acc_{r}_{v} = vec4<f32>(0.0);");
        }
    }
    if side {
        // Lane l accumulates column l of the side product for every row of the tile; only the
        // first column tile's workgroups do it (a uniform branch).
        let _ = writeln!(w, "{ind}let side = wg.x == 0u && wg.z == 0u;");
        for r in 0..tm {
            let _ = writeln!(w, "{ind}var zacc_{r} = 0.0;");
        }
    }
    for v in 0..tnv {
        let _ = writeln!(w, "{ind}let n{v} = col0 + 4u * (lane + {}u);", s * v);
    }
    let _ = writeln!(w, "{ind}for (var k = 0u; k < p.k; k += 4u) {{");
    load_a_share(&mut w, s, tm, trans_a);
    for v in 0..tnv {
        let cols: Vec<String> = if !trans_b {
            (0..4).map(|j| format!("b_row4(base_b, k + {j}u, n{v})")).collect()
        } else {
            (0..4).map(|q| format!("b_col4(base_b, n{v} + {q}u, k)")).collect()
        };
        let m = format!("mat4x4<f32>({})", cols.join(", "));
        // Loaded by columns of B (rows of op(B)ᵀ): transposing is free on CPU drivers, where
        // each vector component is a separate SIMD register anyway.
        let m = if trans_b { format!("transpose({m})") } else { m };
        let _ = writeln!(w, "{ind2}let b{v} = {m};");
    }
    broadcast_and_accumulate(&mut w, s, tm, tnv, trans_a);
    if side {
        let _ = writeln!(w, "{ind2}if (side) {{");
        let _ = writeln!(w, "{ind2}    let a2v = a2_row4(lane, k);");
        for r in 0..tm {
            let _ = writeln!(w, "{ind2}    zacc_{r} += dot(x{r}, a2v);");
        }
        let _ = writeln!(w, "{ind2}}}");
    }
    let _ = writeln!(w, "{ind}}}");
    if side {
        let _ = writeln!(w, "{ind}if (side) {{");
        for r in 0..tm {
            let _ = writeln!(w, "{ind}    store_c2(row0 + {r}u, lane, zacc_{r});");
        }
        let _ = writeln!(w, "{ind}}}");
    }
    for r in 0..tm {
        for v in 0..tnv {
            let _ = writeln!(w, "{ind}store_c(base_c, row0 + {r}u, n{v}, acc_{r}_{v});");
        }
    }
    w
}

/// This lane's share of A at k: rows spread over the lanes, read once and broadcast.
fn load_a_share(w: &mut String, s: u32, tm: u32, trans_a: bool) {
    let ind2 = "        ";
    if !trans_a {
        // Row r of the tile is loaded by lane r % s into slot r / s.
        for slot in 0..tm.div_ceil(s) {
            let _ = writeln!(w, "{ind2}let a{slot} = a_row4(base_a, row0 + lane + {}u, k);", s * slot);
        }
    } else {
        // Rows 4g..4g+4 are loaded by lane g % s into slot g / s, as four vec4 over rows.
        for slot in 0..(tm / 4).div_ceil(s) {
            for j in 0..4 {
                let _ = writeln!(
                    w,
                    "{ind2}let a{slot}_{j} = a_col4(base_a, k + {j}u, row0 + 4u * (lane + {}u));",
                    s * slot
                );
            }
        }
    }
}

/// Each row `x{r}` of the tile's A at k, broadcast from the lane that loaded it, times each
/// vec4 column block of B into the accumulators.
fn broadcast_and_accumulate(w: &mut String, s: u32, tm: u32, tnv: u32, trans_a: bool) {
    let ind2 = "        ";
    for r in 0..tm {
        if !trans_a {
            let _ = writeln!(w, "{ind2}let x{r} = subgroupBroadcast(a{}, {}u);", r / s, r % s);
        } else {
            // Broadcast each group's four vec4 once, then assemble its four rows.
            let g = r / 4;
            if r % 4 == 0 {
                for j in 0..4 {
                    let _ = writeln!(w, "{ind2}let w{g}_{j} = subgroupBroadcast(a{}_{j}, {}u);", g / s, g % s);
                }
            }
            let c = ["x", "y", "z", "w"][(r % 4) as usize];
            let _ = writeln!(w, "{ind2}let x{r} = vec4<f32>(w{g}_0.{c}, w{g}_1.{c}, w{g}_2.{c}, w{g}_3.{c});");
        }
        for v in 0..tnv {
            let _ = writeln!(w, "{ind2}acc_{r}_{v} += b{v} * x{r};");
        }
    }
}
