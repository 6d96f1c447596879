//! Matrix products (shaders/matmul.wgsl and shaders/matmul_subgroup.wgsl).
//!
//! `C = alpha · op(A) · op(B)`, or `C += ...` with `accumulate`, for f32 row-major matrices of
//! any shape, optionally batched. The three products of a linear layer `y = x Wᵀ`:
//! forward `y = x·Wᵀ` (trans_b), input gradient `dx = g·W`, weight gradient `dW = gᵀ·x` (trans_a).
//!
//! Three code paths: the subgroup kernel (register-blocked, rows of A shared across lanes with
//! `subgroupBroadcast`), used where the adapter has subgroup operations, a portable
//! shared-memory tiled kernel everywhere else, and, for products marked [`Matmul::coop`], the
//! cooperative-matrix kernel where the adapter has matrix units (see [`coop`]).

use super::{check_f32, shape_err, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, DType, GpuError, KernelSpec, Result, Step, Tensor};

/// Which kernel computes the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    /// The subgroup kernel where the adapter supports it, else the portable one.
    Auto,
    /// Shared-memory tiling; runs on every adapter.
    Portable,
    /// Register blocking with `subgroupBroadcast`; needs subgroup operations.
    Subgroup,
    /// Cooperative matrices (returned by [`matmul`] only: a product takes them from `Auto`
    /// with [`Matmul::coop`]).
    Coop,
}

/// Options of one product. `Matmul::default()` is `C = A·B`.
#[derive(Clone, Copy, Debug)]
pub struct Matmul {
    /// A is stored (K, M) and read transposed.
    pub trans_a: bool,
    /// B is stored (N, K) and read transposed.
    pub trans_b: bool,
    pub alpha: f32,
    /// `C += alpha·op(A)·op(B)` instead of `C = ...`.
    pub accumulate: bool,
    pub path: MatmulPath,
    /// Read an f16 B with shader-f16's native loads where the adapter has the feature (else,
    /// and when false, f16 pairs are unpacked from u32 words; the values are the same).
    pub native_f16: bool,
    /// A's values fit f16's range (activations, not gradients): the product may run on
    /// cooperative matrices with f16 operands (see [`coop`]).
    pub coop: bool,
}

impl Default for Matmul {
    fn default() -> Self {
        Matmul {
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            accumulate: false,
            path: MatmulPath::Auto,
            native_f16: true,
            coop: false,
        }
    }
}

impl Matmul {
    /// `C = A·B`.
    pub fn nn() -> Self {
        Self::default()
    }
    /// `C = A·Bᵀ` (a linear layer's forward).
    pub fn nt() -> Self {
        Matmul { trans_b: true, ..Self::default() }
    }
    /// `C = Aᵀ·B` (a linear layer's weight gradient).
    pub fn tn() -> Self {
        Matmul { trans_a: true, ..Self::default() }
    }
    pub fn alpha(self, alpha: f32) -> Self {
        Matmul { alpha, ..self }
    }
    pub fn accumulate(self, accumulate: bool) -> Self {
        Matmul { accumulate, ..self }
    }
    pub fn path(self, path: MatmulPath) -> Self {
        Matmul { path, ..self }
    }
    pub fn native_f16(self, native_f16: bool) -> Self {
        Matmul { native_f16, ..self }
    }
    pub fn coop(self, coop: bool) -> Self {
        Matmul { coop, ..self }
    }
}

/// Whether this product reads its f16 B natively (see [`Matmul::native_f16`]).
fn f16_native(ctx: &Context, b: &Tensor, opts: Matmul) -> bool {
    opts.native_f16 && b.dtype() == DType::F16 && ctx.features().shader_f16
}

wgsl_struct! {
    pub(crate) struct Params for [("matmul.wgsl", "Params"), ("matmul_subgroup.wgsl", "Params"), ("matmul_coop.wgsl", "Params")] {
        m: u32,
        n: u32,
        k: u32,
        batch: u32,
        stride_a: u32,
        stride_b: u32,
        stride_c: u32,
        accumulate: u32,
        alpha: f32,
        lda: u32,
        ldb: u32,
        ldc: u32,
        qoff: u32,
        side_n: u32,
        side_ld: u32,
    }
}

/// (batch, rows, cols) of a 2-D or 3-D tensor.
fn dims3(t: &Tensor) -> Result<(usize, usize, usize)> {
    match *t.shape() {
        [r, c] => Ok((1, r, c)),
        [b, r, c] => Ok((b, r, c)),
        ref s => Err(shape_err(OP, format!("tensor {:?} has shape {s:?}; expected 2 or 3 dimensions", t.label()))),
    }
}

/// Records `C = alpha·op(A)·op(B) (+ C)` into `step` and returns the path used.
///
/// Shapes: op(A) is (M, K), op(B) is (K, N), C is (M, N); each may carry a leading batch
/// dimension. A 2-D operand is shared by every batch of a 3-D C.
pub fn matmul(ctx: &Context, step: &mut Step, a: &Tensor, b: &Tensor, c: &Tensor, opts: Matmul) -> Result<MatmulPath> {
    let params = check_shapes(ctx, a, b, c, opts)?;
    if coop::takes(ctx, b, opts, &params) {
        coop::record(ctx, step, a, b, c, &params, opts.trans_b)?;
        return Ok(MatmulPath::Coop);
    }
    let sg = ctx.subgroup_size().filter(|s| (4..=128).contains(s));
    if b.dtype() != DType::F32 && (sg.is_none() || opts.path == MatmulPath::Portable) {
        return Err(GpuError::MissingFeature {
            feature: "subgroup operations (a packed f16 or quantized base is read by the subgroup matmul only; use an f32 base)",
            adapter: ctx.info().name.clone(),
        });
    }
    match (opts.path, sg) {
        (MatmulPath::Auto | MatmulPath::Subgroup | MatmulPath::Coop, Some(s)) => {
            record_subgroup(ctx, step, a, b, c, &params, opts, s, tile_for(ctx, s, &params))?;
            Ok(MatmulPath::Subgroup)
        }
        (MatmulPath::Subgroup, None) => Err(GpuError::MissingFeature {
            feature: "subgroup operations (4 to 128 lanes)",
            adapter: ctx.info().name.clone(),
        }),
        (MatmulPath::Portable, _) | (MatmulPath::Auto | MatmulPath::Coop, None) => {
            let spec = KernelSpec::new(&kernel_sources::MATMUL, "matmul")
                .constant("TRANS_A", opts.trans_a as u32 as f64)
                .constant("TRANS_B", opts.trans_b as u32 as f64);
            let groups = [params.n.div_ceil(64), params.m.div_ceil(64), params.batch];
            let args = [Arg::Uniform(uniform(OP, &params)?), Arg::Read(a), Arg::Read(b), Arg::Write(c)];
            ctx.record(step, &spec, &args, groups)?;
            Ok(MatmulPath::Portable)
        }
    }
}

/// `C = A·B` (f32, neither transposed, no batch) as `splits` products over slices of K into
/// `partials` `(splits, M, N)`, then their sum into C: a product with few outputs and a long K
/// (an LM head's input gradient, K = the vocabulary) gets `splits` times the workgroups, which
/// a large GPU needs to be busy. Sums in another order than [`matmul`] (each slice, then the
/// slices). Needs the subgroup path, K a multiple of `4 · splits`, contiguous `partials`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_split_k(
    ctx: &Context,
    step: &mut Step,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    partials: &Tensor,
    splits: usize,
) -> Result<()> {
    let mut p = check_shapes(ctx, a, b, c, Matmul::nn())?;
    let Some(s) = ctx.subgroup_size().filter(|s| (4..=128).contains(s)) else {
        return Err(GpuError::MissingFeature {
            feature: "subgroup operations (split-K products)",
            adapter: ctx.info().name.clone(),
        });
    };
    let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
    let fits = b.dtype() == DType::F32
        && p.batch == 1
        && splits > 0
        && k.is_multiple_of(4 * splits)
        && partials.is_contiguous()
        && partials.shape() == [splits, m, n]
        && c.is_contiguous();
    if !fits {
        return Err(shape_err(
            OP,
            format!(
                "split-K of A {:?}, B {:?} {:?}, C {:?} into {splits} slices with partials {:?}: needs an f32 B, no \
                 batch, K a multiple of {}, contiguous C and partials (splits, M, N)",
                a.shape(),
                b.shape(),
                b.dtype(),
                c.shape(),
                partials.shape(),
                4 * splits
            ),
        ));
    }
    // Slice z of K: A's columns z·K/S.. (an offset within each row), B's rows z·K/S.., output z.
    let kk = (k / splits) as u32;
    p.k = kk;
    p.batch = splits as u32;
    p.stride_a = kk;
    p.stride_b = kk * p.ldb;
    p.stride_c = (m * n) as u32;
    p.ldc = n as u32;
    record_subgroup(ctx, step, a, b, partials, &p, Matmul::nn(), s, tile_for(ctx, s, &p))?;
    let flat = partials.reshape(&[splits, m * n])?;
    crate::ops::reduce::reduce_forward(ctx, step, &flat, 0, false, c)
}

/// A second product fused into a matmul: `C2 = op(A)·A2ᵀ` with A2 `(r, K)` and C2 `(M, r)`,
/// written (`=`, no alpha). The LoRA branch's `z = x·Aᵀ` rides along with the frozen product
/// `y = x·Wᵀ`, so x is read once for both.
#[derive(Clone, Copy)]
pub struct Side<'a> {
    pub a2: &'a Tensor,
    pub c2: &'a Tensor,
}

/// Whether [`matmul_side`] can fuse `side` into this product on this adapter: the subgroup
/// path with vec4 operands, A not transposed, no batch, a contiguous A2 with at most S rows.
pub fn can_fuse_side(ctx: &Context, a: &Tensor, b: &Tensor, c: &Tensor, opts: Matmul, side: Side) -> bool {
    let Some(s) = ctx.subgroup_size().filter(|s| (4..=128).contains(s)) else { return false };
    let Ok(p) = check_shapes(ctx, a, b, c, opts) else { return false };
    let (r, k) = match *side.a2.shape() {
        [r, k] => (r, k),
        _ => return false,
    };
    let vec = p.lda % 4 == 0 && p.ldb % 4 == 0 && p.ldc % 4 == 0 && p.k % 4 == 0 && p.n % 4 == 0;
    opts.path != MatmulPath::Portable
        && !coop::takes(ctx, b, opts, &p)
        && !opts.trans_a
        && p.batch == 1
        && vec
        && side.a2.is_contiguous()
        && side.c2.is_contiguous()
        && side.a2.dtype() == DType::F32
        && side.c2.dtype() == DType::F32
        && k == p.k as usize
        && r >= 1
        && r <= s as usize
        && side.c2.shape() == [p.m as usize, r]
        && !side.c2.overlaps(a)
        && !side.c2.overlaps(c)
}

/// `C = alpha·op(A)·op(B) (+ C)` and, in the same dispatch, `C2 = op(A)·A2ᵀ` (see [`Side`]).
/// Errors where [`can_fuse_side`] says no: callers check first and otherwise record the two
/// products apart.
pub fn matmul_side(
    ctx: &Context,
    step: &mut Step,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    opts: Matmul,
    side: Side,
) -> Result<()> {
    if !can_fuse_side(ctx, a, b, c, opts, side) {
        return Err(shape_err(
            OP,
            format!("side product {:?} {:?} cannot be fused into this matmul", side.a2.label(), side.a2.shape()),
        ));
    }
    let s = ctx.subgroup_size().expect("checked");
    let mut params = check_shapes(ctx, a, b, c, opts)?;
    params.side_n = side.a2.shape()[0] as u32;
    params.side_ld = side.a2.row_stride() as u32;
    let tile = tile_for(ctx, s, &params);
    let f16 = f16_native(ctx, b, opts);
    let (spec, groups) = subgroup_spec(s, tile, &params, false, opts.trans_b, b.dtype(), f16, true)?;
    let args = [
        Arg::Uniform(uniform(OP, &params)?),
        Arg::Read(a),
        Arg::Read(b),
        Arg::Write(c),
        Arg::Read(side.a2),
        Arg::Write(side.c2),
    ];
    ctx.record(step, &spec, &args, groups)
}

/// Records the subgroup kernel generated for subgroup size `s`, which may be smaller than the
/// adapter's, with the given tile (tests check every size from 4 up, and every tile the
/// autotune may pick; [`tuned_tile`] gives the one [`matmul`] starts from).
#[allow(clippy::too_many_arguments)]
pub fn matmul_with_tile(
    ctx: &Context,
    step: &mut Step,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    opts: Matmul,
    s: u32,
    tile: Tile,
) -> Result<()> {
    let params = check_shapes(ctx, a, b, c, opts)?;
    if !ctx.features().subgroups {
        return Err(GpuError::MissingFeature { feature: "subgroup operations", adapter: ctx.info().name.clone() });
    }
    record_subgroup(ctx, step, a, b, c, &params, opts, s, tile)
}

const OP: &str = "matmul";

/// Median seconds of one run of `step`, after an untimed first run: five timings of four runs
/// each (the autotunes time their candidates with it).
#[cfg(not(target_arch = "wasm32"))]
fn median_seconds(ctx: &Context, step: &Step) -> Result<f64> {
    ctx.run(step)?;
    ctx.wait_idle()?;
    let mut times = Vec::with_capacity(5);
    for _ in 0..5 {
        let t0 = std::time::Instant::now();
        ctx.run_repeated(step, 4)?;
        ctx.wait_idle()?;
        times.push(t0.elapsed().as_secs_f64() / 4.0);
    }
    times.sort_by(|x, y| x.total_cmp(y));
    Ok(times[2])
}

#[path = "matmul_coop.rs"]
pub mod coop;
#[path = "matmul_subgroup.rs"]
mod subgroup;
#[path = "matmul_tile.rs"]
mod tile;
use subgroup::{record_subgroup, sg_tnv, subgroup_spec, SG_TM};
pub use subgroup::{subgroup_kernel, subgroup_kernel_full};
use tile::tile_for;
pub use tile::{tile_candidates, tuned_tile, Tile};

/// Checks the operands and derives the kernel parameters.
fn check_shapes(ctx: &Context, a: &Tensor, b: &Tensor, c: &Tensor, opts: Matmul) -> Result<Params> {
    let packed_b = b.dtype() != DType::F32;
    check_operands(a, b, c, packed_b)?;
    let (ba, ar, ac) = dims3(a)?;
    let (bb, br, bc) = dims3(b)?;
    let (batch, m, n) = dims3(c)?;
    let (am, k) = if opts.trans_a { (ac, ar) } else { (ar, ac) };
    let (bk, bn) = if opts.trans_b { (bc, br) } else { (br, bc) };
    let describe = || {
        let t = |x: bool| if x { " (transposed)" } else { "" };
        format!(
            "A {:?} {:?}{}, B {:?} {:?}{}, C {:?} {:?}",
            a.label(),
            a.shape(),
            t(opts.trans_a),
            b.label(),
            b.shape(),
            t(opts.trans_b),
            c.label(),
            c.shape()
        )
    };
    if am != m || bn != n || bk != k {
        return Err(shape_err(
            OP,
            format!("shapes do not chain: {}; need op(A) (M, K), op(B) (K, N), C (M, N)", describe()),
        ));
    }
    if [ba, bb].iter().any(|&tb| tb != 1 && tb != batch) {
        return Err(shape_err(OP, format!("batch sizes differ: {}", describe())));
    }
    if batch > ctx.limits().max_workgroups_per_dimension as usize {
        return Err(shape_err(OP, format!("batch {batch} exceeds the device's grid limit: {}", describe())));
    }
    if a.overlaps(c) || b.overlaps(c) {
        return Err(shape_err(OP, format!("an input overlaps the output: {}", describe())));
    }
    let per = |t: &Tensor, tb: usize| {
        if tb == batch && batch > 1 {
            (t.numel() / tb) as u32
        } else {
            0
        }
    };
    Ok(Params {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        batch: batch as u32,
        stride_a: per(a, ba),
        stride_b: per(b, bb),
        stride_c: if batch > 1 { (m * n) as u32 } else { 0 },
        accumulate: opts.accumulate as u32,
        alpha: opts.alpha,
        lda: a.row_stride() as u32,
        ldb: b.row_stride() as u32,
        ldc: c.row_stride() as u32,
        qoff: if packed_b { b.dtype().quant_words(b.numel()) as u32 } else { 0 },
        side_n: 0,
        side_ld: 0,
    })
}

/// The operands' storage: f32 (contiguous or 2-D column views), B perhaps a whole packed weight.
fn check_operands(a: &Tensor, b: &Tensor, c: &Tensor, packed_b: bool) -> Result<()> {
    if packed_b && !(crate::ops::quant::fits(b.dtype(), b.shape()) && b.is_contiguous()) {
        return Err(shape_err(
            OP,
            format!(
                "B {:?} {:?} is {:?}: a packed B must be a whole 2-D weight whose rows are whole blocks",
                b.label(),
                b.shape(),
                b.dtype()
            ),
        ));
    }
    for t in [a, b, c].into_iter().filter(|t| !(packed_b && std::ptr::eq(*t, b))) {
        // Column views (strided rows) are fine here, as long as they are 2-D.
        if t.is_contiguous() {
            check_f32(OP, t)?;
        } else if t.dtype() != crate::gpu::DType::F32 || t.shape().len() != 2 || t.numel() == 0 {
            return Err(shape_err(
                OP,
                format!("strided view {:?} {:?} must be a non-empty 2-D f32 matrix", t.label(), t.shape()),
            ));
        }
    }
    Ok(())
}
