//! The matmul's tile: rows per workgroup and vec4 columns per lane of the subgroup kernel, as
//! the autotune measures them per adapter, and as each product's size adjusts them.

use super::{sg_tnv, Params, SG_TM};
use crate::gpu::{kernel_sources, Context};

/// Rows per workgroup and vec4 columns per lane of the subgroup kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub tm: u32,
    pub tnv: u32,
}

/// Every tile the autotune may pick for subgroups of `s` lanes (for tests).
pub fn tile_candidates(s: u32) -> Vec<Tile> {
    candidates(s)
}

/// The tiles the autotune tries, the default first. Wide subgroups (GPUs) get one vec4 column
/// per lane to bound registers; narrow ones (CPU drivers) two.
fn candidates(s: u32) -> Vec<Tile> {
    let t = |tm, tnv| Tile { tm, tnv };
    if s <= 16 {
        // (24×2 and 40×2 won the short timing now and then but lost inside real steps.)
        vec![t(SG_TM, sg_tnv(s)), t(64, 1)]
    } else {
        // Few rows per workgroup give a large GPU enough workgroups (a workgroup is one subgroup):
        // an H200 ran SmolLM2's 512-row products on 160 subgroups with 16 rows each.
        vec![t(SG_TM, sg_tnv(s)), t(16, 1), t(64, 1), t(32, 2), t(8, 1), t(4, 1)]
    }
}

/// The tile this device runs fastest, measured once per adapter on a 512×576×576 product, a
/// projection of a small model at 512 tokens: each candidate is compiled and timed for a few
/// repeats, the median kept. The result is kept for the process and on disk
/// ([`Context::tuned`]), so later runs on the same adapter and driver skip the timing and use
/// the same tile. Every tile sums each output in the same order, so the choice changes speed
/// only, never results. `PORTALORA_MATMUL_TILE=TMxTNV` forces a tile; `PORTALORA_AUTOTUNE=0`
/// (and the browser, which cannot wait for the GPU) keeps the default.
pub fn tuned_tile(ctx: &Context, s: u32) -> Tile {
    if let Some(t) = untuned_tile(ctx, s) {
        return t;
    }
    // The key names what was timed (the kernel's source and the candidates), so that results
    // cached on disk by another version are not reused.
    let version = fnv1a(&format!("{}{:?}", kernel_sources::MATMUL_SUBGROUP.wgsl, candidates(s)));
    let code = ctx.tuned(&format!("matmul_tile_s{s}_{version:016x}"), || {
        let t = autotune(ctx, s).unwrap_or(candidates(s)[0]);
        t.tm * 1000 + t.tnv
    });
    Tile { tm: code / 1000, tnv: code % 1000 }
}

/// Rows per workgroup of a large product on a wide-subgroup GPU (see [`tile_for`]).
const BIG_GRID_ROWS: u32 = 16;
/// The workgroups a product must still have at [`BIG_GRID_ROWS`] rows each to take them.
const BIG_GRID: u32 = 300;

/// The tile of one product: the tuned one (timed on a 512×576×576 product, where a large GPU
/// wants few rows per workgroup to have workgroups enough), except on wide-subgroup GPUs for
/// products large enough to keep [`BIG_GRID`] workgroups busy with 16 rows each, where more rows
/// per workgroup reuse more of B. An H200 (tuned to 4 rows): SmolLM2's LM head 12.3 ms at 4
/// rows, 2.1 ms at 16; its MLP up-projections (384 workgroups at 16 rows) 14.5 ms against 12.1;
/// its 512×576 products (160 workgroups at 16 rows) 41.8 ms against 46.7. A forced tile
/// (`PORTALORA_MATMUL_TILE`) is kept as it is.
pub(super) fn tile_for(ctx: &Context, s: u32, p: &Params) -> Tile {
    let tuned = tuned_tile(ctx, s);
    match untuned_tile(ctx, s) {
        Some(_) => tuned,
        None => big_grid_tile(s, tuned, p.m, p.n, p.batch),
    }
}

/// [`tile_for`]'s rule for a product of `batch` × (m, n) outputs.
fn big_grid_tile(s: u32, tuned: Tile, m: u32, n: u32, batch: u32) -> Tile {
    if s < 32 || tuned.tm >= BIG_GRID_ROWS {
        return tuned;
    }
    let tnv = if n <= 4 * s { 1 } else { tuned.tnv };
    let groups = n.div_ceil(4 * s * tnv) * m.div_ceil(BIG_GRID_ROWS) * batch.max(1);
    if groups >= BIG_GRID {
        Tile { tm: BIG_GRID_ROWS, ..tuned }
    } else {
        tuned
    }
}

/// 64-bit FNV-1a: a stable hash (std's hasher may change between Rust releases).
pub(super) fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// The tile when nothing is timed: browsers (which cannot wait for the GPU), a tile forced by
/// `PORTALORA_MATMUL_TILE`, or `PORTALORA_AUTOTUNE=0` ([`ContextOptions`](crate::gpu::ContextOptions)).
/// Neither setting is cached.
fn untuned_tile(ctx: &Context, s: u32) -> Option<Tile> {
    let opts = ctx.options();
    if let Some((tm, tnv)) = opts.matmul_tile {
        return Some(Tile { tm, tnv });
    }
    (cfg!(target_arch = "wasm32") || opts.no_autotune).then(|| candidates(s)[0])
}

#[cfg(target_arch = "wasm32")]
fn autotune(_ctx: &Context, _s: u32) -> Option<Tile> {
    None
}

#[cfg(not(target_arch = "wasm32"))]
fn autotune(ctx: &Context, s: u32) -> Option<Tile> {
    use super::{check_shapes, subgroup_spec, uniform, Matmul, OP};
    use crate::gpu::{Arg, DType, Step};
    let (m, k, n) = (512usize, 576usize, 576usize);
    let _kind = ctx.alloc_kind("other");
    let a = ctx.tensor("autotune A", &[m, k], DType::F32).ok()?;
    let b = ctx.tensor("autotune B", &[n, k], DType::F32).ok()?;
    let c = ctx.tensor("autotune C", &[m, n], DType::F32).ok()?;
    let params = check_shapes(ctx, &a, &b, &c, Matmul::nt()).ok()?;
    let mut times_of: Vec<(f64, Tile)> = Vec::new();
    for tile in candidates(s) {
        let (spec, groups) = subgroup_spec(s, tile, &params, false, true, DType::F32, false, false).ok()?;
        let args = [Arg::Uniform(uniform(OP, &params).ok()?), Arg::Read(&a), Arg::Read(&b), Arg::Write(&c)];
        let mut step = Step::new();
        ctx.record(&mut step, &spec, &args, groups).ok()?;
        times_of.push((super::median_seconds(ctx, &step).ok()?, tile));
    }
    // Timings on a shared machine are noisy: another tile must beat the default by 5%.
    let (default_t, default_tile) = *times_of.first()?;
    let best = times_of.iter().copied().min_by(|a, b| a.0.total_cmp(&b.0))?;
    Some(if best.0 < 0.95 * default_t { best.1 } else { default_tile })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_products_on_wide_subgroups_take_more_rows_per_workgroup() {
        let four = Tile { tm: 4, tnv: 1 };
        let rows = |s, m, n| big_grid_tile(s, four, m, n, 1).tm;
        // An H200's SmolLM2 step (subgroups of 32, tuned to 4 rows): the LM head and the MLP
        // up-projections take 16 rows; the 512×576 products, the rank-8 ones and the head's
        // input gradient keep 4.
        assert_eq!((rows(32, 512, 49152), rows(32, 512, 1536)), (16, 16));
        assert_eq!((rows(32, 512, 576), rows(32, 512, 8), rows(32, 256, 640)), (4, 4, 4));
        // Narrow subgroups (CPU drivers) and tiles tuned to 16 rows or more keep the tuned tile.
        assert_eq!(rows(8, 512, 49152), 4);
        assert_eq!(big_grid_tile(32, Tile { tm: 32, tnv: 1 }, 512, 49152, 1).tm, 32);
    }
}
