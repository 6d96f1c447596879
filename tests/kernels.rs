//! Every kernel against its f64 CPU twin in `portalora::reference`, at awkward shapes, with the
//! output poisoned (NaN) before each run. Runs on whatever adapter the machine has (lavapipe in CI).

mod common;

use portalora::gpu::{Arg, Context, DType, GpuError, KernelSource, KernelSpec, Step};
use portalora::ops::elementwise::{add_forward, axpy_forward, scale_forward};
use portalora::ops::matmul::{matmul, matmul_with_tile, tile_candidates, tuned_tile, Matmul, MatmulPath, Tile};
use portalora::ops::reduce::reduce_forward;
use portalora::reference::{self, max_rel_error};
use portalora::rng::Rng;

const TOL: f64 = 1e-5;

/// Runs one (possibly batched) product on the GPU and checks it against the reference.
/// `subgroup_size` forces the subgroup kernel generated for that size.
#[allow(clippy::too_many_arguments)]
fn check_matmul(
    ctx: &Context,
    rng: &mut Rng,
    batch: usize,
    share_b: bool,
    m: usize,
    k: usize,
    n: usize,
    opts: Matmul,
    subgroup_size: Option<u32>,
    tile: Option<Tile>,
) {
    let (ar, ac) = if opts.trans_a { (k, m) } else { (m, k) };
    let (br, bc) = if opts.trans_b { (n, k) } else { (k, n) };
    let b_batch = if share_b { 1 } else { batch };
    let a_data = rng.vec(batch * m * k);
    let b_data = rng.vec(b_batch * k * n);
    let c0 = rng.vec(batch * m * n);
    let shape3 = |bt: usize, r: usize, c: usize| {
        if batch > 1 && bt > 1 {
            vec![bt, r, c]
        } else {
            vec![r, c]
        }
    };
    let a = ctx.upload_f32("A", &shape3(batch, ar, ac), &a_data).unwrap();
    let b = ctx.upload_f32("B", &shape3(b_batch, br, bc), &b_data).unwrap();
    let c = ctx.tensor("C", &shape3(batch, m, n), DType::F32).unwrap();
    if opts.accumulate {
        ctx.write_f32(&c, &c0).unwrap();
    } else {
        ctx.fill_f32(&c, f32::NAN).unwrap();
    }
    let mut step = Step::new();
    match (subgroup_size, tile) {
        (Some(s), Some(t)) => matmul_with_tile(ctx, &mut step, &a, &b, &c, opts, s, t).unwrap(),
        (Some(s), None) => matmul_with_tile(ctx, &mut step, &a, &b, &c, opts, s, tuned_tile(ctx, s)).unwrap(),
        (None, _) => {
            matmul(ctx, &mut step, &a, &b, &c, opts).unwrap();
        }
    }
    ctx.run(&step).unwrap();
    let got = ctx.read_f32(&c).unwrap();
    let mut want = Vec::with_capacity(batch * m * n);
    for bi in 0..batch {
        let bj = if share_b { 0 } else { bi };
        let prod = reference::matmul(
            &a_data[bi * m * k..(bi + 1) * m * k],
            &b_data[bj * k * n..(bj + 1) * k * n],
            m,
            k,
            n,
            opts.trans_a,
            opts.trans_b,
        );
        for (i, p) in prod.into_iter().enumerate() {
            let acc = if opts.accumulate { c0[bi * m * n + i] as f64 } else { 0.0 };
            want.push(acc + opts.alpha as f64 * p);
        }
    }
    let err = max_rel_error(&got, &want);
    assert!(
        err <= TOL,
        "matmul {opts:?} batch={batch} share_b={share_b} m={m} k={k} n={n} subgroup_size={subgroup_size:?} tile={tile:?}: relative error {err:e} > {TOL:e}"
    );
}

const AWKWARD: [usize; 4] = [1, 7, 33, 129];
const OPS: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

fn sweep(ctx: &Context, path: MatmulPath, subgroup_size: Option<u32>) {
    let mut rng = Rng::new(7);
    for (trans_a, trans_b) in OPS {
        let opts = Matmul { trans_a, trans_b, path, ..Matmul::default() };
        for &m in &AWKWARD {
            for &k in &AWKWARD {
                for &n in &AWKWARD {
                    check_matmul(ctx, &mut rng, 1, false, m, k, n, opts, subgroup_size, None);
                }
            }
        }
        // Multiples of 4 (the subgroup kernel's vec4 variant) and several tiles in each direction.
        for &(m, k, n) in &[(64, 32, 128), (132, 68, 36), (100, 4, 260), (4, 516, 8), (65, 64, 200)] {
            check_matmul(ctx, &mut rng, 1, false, m, k, n, opts, subgroup_size, None);
        }
        // alpha and accumulate, batched with and without a shared B.
        let acc = Matmul { alpha: -0.75, accumulate: true, ..opts };
        check_matmul(ctx, &mut rng, 1, false, 33, 7, 129, acc, subgroup_size, None);
        check_matmul(ctx, &mut rng, 1, false, 36, 16, 64, acc, subgroup_size, None);
        check_matmul(ctx, &mut rng, 3, false, 33, 7, 129, opts, subgroup_size, None);
        check_matmul(ctx, &mut rng, 5, true, 12, 8, 20, acc, subgroup_size, None);
        check_matmul(ctx, &mut rng, 2, false, 7, 33, 1, acc, subgroup_size, None);
    }
}

#[test]
fn matmul_portable_matches_reference() {
    let Some(ctx) = common::context() else { return };
    sweep(&ctx, MatmulPath::Portable, None);
}

#[test]
fn matmul_subgroup_matches_reference() {
    let Some(ctx) = common::context() else { return };
    if !ctx.features().subgroups {
        // Not a skip in disguise: the adapter lacks the feature, and the error path is checked.
        let mut step = Step::new();
        let t = ctx.tensor("t", &[4, 4], DType::F32).unwrap();
        let u = ctx.tensor("u", &[4, 4], DType::F32).unwrap();
        let v = ctx.tensor("v", &[4, 4], DType::F32).unwrap();
        let e = matmul(&ctx, &mut step, &t, &u, &v, Matmul::nn().path(MatmulPath::Subgroup)).unwrap_err();
        assert!(matches!(e, GpuError::MissingFeature { .. }), "{e}");
        eprintln!("adapter {} has no subgroups; only the portable path runs here", ctx.info().name);
        return;
    }
    sweep(&ctx, MatmulPath::Subgroup, None);
}

/// The subgroup kernel must be right for any subgroup size from 4 up. On an adapter whose
/// subgroups are S lanes, kernels generated for any size ≤ S run correctly (a workgroup of that
/// many lanes fits in one subgroup), so test every power of two up to the adapter's size.
#[test]
fn matmul_subgroup_sizes_match_reference() {
    let Some(ctx) = common::context() else { return };
    let Some(sg) = ctx.subgroup_size() else {
        return;
    };
    let mut rng = Rng::new(11);
    let mut s = 4;
    while s <= sg.min(128) {
        for (trans_a, trans_b) in OPS {
            let opts = Matmul { trans_a, trans_b, ..Matmul::default() };
            for &(m, k, n) in &[(33, 7, 129), (129, 33, 7), (64, 36, 132), (1, 1, 1)] {
                check_matmul(&ctx, &mut rng, 1, false, m, k, n, opts, Some(s), None);
            }
        }
        s *= 2;
    }
}

#[test]
fn matmul_auto_picks_subgroups_when_available() {
    let Some(ctx) = common::context() else { return };
    let a = ctx.tensor("a", &[8, 8], DType::F32).unwrap();
    let b = ctx.tensor("b", &[8, 8], DType::F32).unwrap();
    let c = ctx.tensor("c", &[8, 8], DType::F32).unwrap();
    let path = matmul(&ctx, &mut Step::new(), &a, &b, &c, Matmul::nn()).unwrap();
    let want = if ctx.features().subgroups { MatmulPath::Subgroup } else { MatmulPath::Portable };
    assert_eq!(path, want);
}

#[test]
fn matmul_rejects_bad_shapes() {
    let Some(ctx) = common::context() else { return };
    let a = ctx.tensor("x", &[7, 33], DType::F32).unwrap();
    let b = ctx.tensor("w", &[33, 5], DType::F32).unwrap();
    let c = ctx.tensor("y", &[7, 6], DType::F32).unwrap();
    let e = matmul(&ctx, &mut Step::new(), &a, &b, &c, Matmul::nn()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("\"w\"") && msg.contains("[33, 5]") && msg.contains("[7, 6]"), "{msg}");
    // Output aliasing an input.
    let sq = ctx.tensor("sq", &[4, 4], DType::F32).unwrap();
    let e = matmul(&ctx, &mut Step::new(), &sq, &sq.clone(), &sq, Matmul::nn()).unwrap_err();
    assert!(e.to_string().contains("overlaps"), "{e}");
}

#[test]
fn reduce_matches_reference() {
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(3);
    let shapes: &[&[usize]] =
        &[&[1], &[7], &[129], &[7, 33], &[33, 7], &[1, 129, 7], &[7, 1, 33], &[3, 5000], &[5000, 3], &[2, 300, 5]];
    for &shape in shapes {
        for dim in 0..shape.len() {
            for mean in [false, true] {
                let data = rng.vec(shape.iter().product());
                let x = ctx.upload_f32("x", shape, &data).unwrap();
                let out_shape: Vec<usize> =
                    shape.iter().enumerate().filter(|&(i, _)| i != dim).map(|(_, &s)| s).collect();
                let out_shape = if out_shape.is_empty() { vec![1] } else { out_shape };
                let out = ctx.tensor("out", &out_shape, DType::F32).unwrap();
                ctx.fill_f32(&out, f32::NAN).unwrap();
                let mut step = Step::new();
                reduce_forward(&ctx, &mut step, &x, dim, mean, &out).unwrap();
                ctx.run(&step).unwrap();
                let got = ctx.read_f32(&out).unwrap();
                let outer: usize = shape[..dim].iter().product();
                let inner: usize = shape[dim + 1..].iter().product();
                let want = reference::reduce(&data, outer, shape[dim], inner, mean);
                let err = max_rel_error(&got, &want);
                assert!(err <= TOL, "reduce {shape:?} dim={dim} mean={mean}: relative error {err:e}");
            }
        }
    }
}

#[test]
fn reduce_is_deterministic_and_handles_huge_grids() {
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(5);
    // 66000 outputs of 256 values each: more workgroups than one grid dimension allows.
    for shape in [[66_000usize, 256], [70_000, 3]] {
        let data = rng.vec(shape[0] * shape[1]);
        let x = ctx.upload_f32("x", &shape, &data).unwrap();
        let out = ctx.tensor("out", &[shape[0]], DType::F32).unwrap();
        let mut step = Step::new();
        reduce_forward(&ctx, &mut step, &x, 1, false, &out).unwrap();
        ctx.fill_f32(&out, f32::NAN).unwrap();
        ctx.run(&step).unwrap();
        let first = ctx.read_f32(&out).unwrap();
        let want = reference::reduce(&data, shape[0], shape[1], 1, false);
        assert!(max_rel_error(&first, &want) <= TOL, "shape {shape:?}");
        ctx.fill_f32(&out, f32::NAN).unwrap();
        ctx.run(&step).unwrap();
        let second = ctx.read_f32(&out).unwrap();
        assert!(first.iter().zip(&second).all(|(a, b)| a.to_bits() == b.to_bits()), "reduce is not bit-reproducible");
    }
}

#[test]
fn elementwise_matches_reference() {
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(9);
    for n in [1usize, 7, 33, 129, 256, 257, 100_003] {
        let xd = rng.vec(n);
        let yd = rng.vec(n);
        let od = rng.vec(n);
        let x = ctx.upload_f32("x", &[n], &xd).unwrap();
        let y = ctx.upload_f32("y", &[n], &yd).unwrap();
        let out = ctx.tensor("out", &[n], DType::F32).unwrap();
        let cases: [(&str, Vec<f64>); 3] = [
            ("add", reference::add(&xd, &yd)),
            ("scale", reference::scale(&xd, -1.5)),
            ("axpy", reference::axpy(0.25, &xd, &od)),
        ];
        for (name, want) in cases {
            let mut step = Step::new();
            match name {
                "add" => add_forward(&ctx, &mut step, &x, &y, &out).unwrap(),
                "scale" => scale_forward(&ctx, &mut step, &x, -1.5, &out).unwrap(),
                _ => axpy_forward(&ctx, &mut step, 0.25, &x, &out).unwrap(),
            }
            if name == "axpy" {
                ctx.write_f32(&out, &od).unwrap();
            } else {
                ctx.fill_f32(&out, f32::NAN).unwrap();
            }
            ctx.run(&step).unwrap();
            let err = max_rel_error(&ctx.read_f32(&out).unwrap(), &want);
            assert!(err <= TOL, "{name} n={n}: relative error {err:e}");
        }
    }
}

#[test]
fn elementwise_grid_beyond_65535_workgroups() {
    let Some(ctx) = common::context() else { return };
    let n = 65_535 * 256 + 1000;
    let xd: Vec<f32> = (0..n).map(|i| (i % 1024) as f32).collect();
    let x = ctx.upload_f32("x", &[n], &xd).unwrap();
    let out = ctx.tensor("out", &[n], DType::F32).unwrap();
    ctx.fill_f32(&out, f32::NAN).unwrap();
    let mut step = Step::new();
    scale_forward(&ctx, &mut step, &x, 2.0, &out).unwrap();
    ctx.run(&step).unwrap();
    let got = ctx.read_f32(&out).unwrap();
    let bad = got.iter().zip(&xd).position(|(g, x)| *g != 2.0 * x);
    assert_eq!(bad, None, "first wrong element");
}

/// `--activations f16`'s conversions against io::half (the CPU twin), bit for bit: every one of
/// the 65,536 halves widened, and f32 values (random at every scale, the rounding ties, the edges
/// of f16's range, subnormals, ±0, ±Inf, NaN) packed and widened again, at odd lengths.
#[test]
fn half_pack_and_unpack_match_the_cpu_twin() {
    use portalora::io::half::{f16_to_f32, f32_to_f16};
    use portalora::ops::half::{half_pack, half_unpack};
    let Some(ctx) = common::context() else { return };
    let same = |got: &[f32], want: &[f32], what: &str| {
        let bad = got.iter().zip(want).position(|(g, w)| g.to_bits() != w.to_bits());
        assert_eq!(bad, None, "{what}: first wrong element (got {:?})", bad.map(|i| (got[i], want[i])));
    };
    // Every half, widened.
    let words: Vec<u32> = (0..32768u32).map(|i| (2 * i) | ((2 * i + 1) << 16)).collect();
    let halves = ctx.upload_packed("all halves", DType::F16, &[65536], &words).unwrap();
    let out = ctx.tensor("widened", &[65536], DType::F32).unwrap();
    ctx.fill_f32(&out, f32::NAN).unwrap();
    let mut step = Step::new();
    half_unpack(&ctx, &mut step, &halves, &out).unwrap();
    ctx.run(&step).unwrap();
    let want: Vec<f32> = (0..65536u32).map(|h| f16_to_f32(h as u16)).collect();
    same(&ctx.read_f32(&out).unwrap(), &want, "unpack");
    // f32 values packed and widened.
    let mut rng = Rng::new(16);
    let mut special = vec![0.0f32, -0.0, 65504.0, -65504.0, 65519.0, 65520.0, 1e30, f32::INFINITY, -f32::INFINITY];
    special.extend([f32::NAN, 6.1e-5, 6.0e-8, 2.9e-8, 3.0e-8, -1e-7, 1e-40, 1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0]);
    for n in [1usize, 7, 18, 129, 1001, 70_001] {
        let mut x: Vec<f32> = rng.vec(n).iter().enumerate().map(|(i, v)| v * 10f32.powi((i % 13) as i32 - 8)).collect();
        for (i, v) in special.iter().enumerate().filter(|(i, _)| *i < n) {
            x[(i * 7919) % n] = *v;
        }
        let t = ctx.upload_f32("x", &[n], &x).unwrap();
        let half = ctx.tensor("x (f16)", &[n], DType::F16).unwrap();
        let back = ctx.tensor("x (widened)", &[n], DType::F32).unwrap();
        ctx.fill_f32(&back, f32::NAN).unwrap();
        let mut step = Step::new();
        half_pack(&ctx, &mut step, &t, &half).unwrap();
        half_unpack(&ctx, &mut step, &half, &back).unwrap();
        ctx.run(&step).unwrap();
        let want: Vec<f32> = x.iter().map(|&v| f16_to_f32(f32_to_f16(v))).collect();
        same(&ctx.read_f32(&back).unwrap(), &want, &format!("pack and unpack, n = {n}"));
    }
    // Shapes that do not pair up are refused, naming the tensors.
    let (a, b) = (ctx.tensor("a", &[10], DType::F32).unwrap(), ctx.tensor("b", &[12], DType::F16).unwrap());
    let e = half_pack(&ctx, &mut Step::new(), &a, &b).unwrap_err().to_string();
    assert!(e.contains("\"b\"") && e.contains("\"a\""), "{e}");
}

static BROKEN: KernelSource = KernelSource {
    file: "broken.wgsl",
    wgsl: "@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }",
    needs_subgroups: false,
    template: false,
};

#[test]
fn device_errors_become_rust_errors() {
    let Some(ctx) = common::context() else { return };
    // A shader that does not compile.
    let e = ctx.record(&mut Step::new(), &KernelSpec::new(&BROKEN, "main"), &[], [1, 1, 1]).unwrap_err();
    assert!(matches!(e, GpuError::Kernel { file: "broken.wgsl", .. }), "{e}");
    // Bindings that do not match the shader: a wgpu validation error.
    let x = ctx.tensor("x", &[4], DType::F32).unwrap();
    let spec = KernelSpec::new(&portalora::gpu::kernel_sources::ELEMENTWISE, "add_forward");
    let e = ctx.record(&mut Step::new(), &spec, &[Arg::Read(&x)], [1, 1, 1]).unwrap_err();
    assert!(matches!(e, GpuError::Kernel { .. } | GpuError::Validation { .. }), "{e}");
    // An entry point that does not exist.
    let spec = KernelSpec::new(&portalora::gpu::kernel_sources::ELEMENTWISE, "no_such_entry");
    let e = ctx.record(
        &mut Step::new(),
        &spec,
        &[Arg::Uniform(vec![0; 16]), Arg::Read(&x), Arg::Read(&x), Arg::Write(&x)],
        [1, 1, 1],
    );
    assert!(e.is_err());
    // A grid over the per-dimension limit.
    let spec = KernelSpec::new(&portalora::gpu::kernel_sources::ELEMENTWISE, "add_forward");
    let e = ctx.record(&mut Step::new(), &spec, &[], [70_000, 1, 1]).unwrap_err();
    assert!(matches!(e, GpuError::DispatchTooLarge { .. }), "{e}");
    // The context still works afterwards.
    let y = ctx.upload_f32("y", &[4], &[1., 2., 3., 4.]).unwrap();
    assert_eq!(ctx.read_f32(&y).unwrap(), vec![1., 2., 3., 4.]);
}

#[test]
fn step_replays_with_new_inputs() {
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(21);
    let (m, k, n) = (9, 17, 13);
    let a = ctx.tensor("a", &[m, k], DType::F32).unwrap();
    let b = ctx.upload_f32("b", &[k, n], &rng.vec(k * n)).unwrap();
    let c = ctx.tensor("c", &[m, n], DType::F32).unwrap();
    let s = ctx.tensor("s", &[m], DType::F32).unwrap();
    let mut step = Step::new();
    matmul(&ctx, &mut step, &a, &b, &c, Matmul::nn()).unwrap();
    reduce_forward(&ctx, &mut step, &c, 1, false, &s).unwrap();
    assert_eq!(step.len(), 2);
    let bd = ctx.read_f32(&b).unwrap();
    for _ in 0..3 {
        let ad = rng.vec(m * k);
        ctx.write_f32(&a, &ad).unwrap();
        ctx.fill_f32(&s, f32::NAN).unwrap();
        ctx.run(&step).unwrap();
        let prod = reference::matmul(&ad, &bd, m, k, n, false, false);
        let want: Vec<f64> = prod.chunks(n).map(|r| r.iter().sum()).collect();
        assert!(max_rel_error(&ctx.read_f32(&s).unwrap(), &want) <= TOL);
    }
}

#[test]
fn adapter_selection_errors_are_clear() {
    use portalora::gpu::ContextOptions;
    let Some(ctx) = common::context() else { return };
    let opts = ContextOptions { adapter_name: Some("no-such-gpu-xyz".into()), ..ContextOptions::default() };
    let e = pollster::block_on(Context::with_options(opts)).err().expect("a name matching nothing must fail");
    let msg = e.to_string();
    assert!(msg.contains("no-such-gpu-xyz") && msg.contains(&format!("{:?}", ctx.info().name)), "{msg}");
    // A substring of the real adapter's name selects it.
    let part: String = ctx.info().name.chars().take(4).collect();
    let opts = ContextOptions { adapter_name: Some(part.to_uppercase()), ..ContextOptions::default() };
    let again = pollster::block_on(Context::with_options(opts)).unwrap();
    assert_eq!(again.info().name, ctx.info().name);
    // Forcing the portable kernels.
    let opts = ContextOptions { disable_subgroups: true, ..ContextOptions::default() };
    let plain = pollster::block_on(Context::with_options(opts)).unwrap();
    assert!(!plain.features().subgroups && plain.subgroup_size().is_none());
    // A forced tile (PORTALORA_MATMUL_TILE) is the one the tile choice returns; with
    // PORTALORA_AUTOTUNE=0 it is the default candidate (which the autotune may also pick here).
    if let Some(s) = ctx.subgroup_size() {
        let opts = ContextOptions { matmul_tile: Some((12, 3)), ..ContextOptions::default() };
        let forced = pollster::block_on(Context::with_options(opts)).unwrap();
        assert_eq!(tuned_tile(&forced, s), Tile { tm: 12, tnv: 3 });
        let untimed = ContextOptions { no_autotune: true, ..ContextOptions::default() };
        let untimed = pollster::block_on(Context::with_options(untimed)).unwrap();
        assert_eq!(tuned_tile(&untimed, s), tile_candidates(s)[0]);
    }
}

#[cfg(target_os = "linux")]
#[test]
fn missing_backend_says_what_to_install() {
    use portalora::gpu::ContextOptions;
    // Linux has no Metal: asking only for it finds no adapter, and the error says what to do.
    let opts = ContextOptions { backends: Some("metal".into()), ..ContextOptions::default() };
    let e = pollster::block_on(Context::with_options(opts)).err().expect("no Metal adapter on Linux");
    let msg = e.to_string();
    assert!(
        msg.contains("no GPU adapter") && msg.contains("mesa-vulkan-drivers") && msg.contains("WGPU_BACKEND=metal"),
        "{msg}"
    );
}

/// Column views: op(A), op(B) and C may be blocks of columns of wider matrices (row strides
/// larger than their width). The columns of C outside the view must stay untouched.
#[test]
fn matmul_on_column_views() {
    let Some(ctx) = common::context() else { return };
    let align = ctx.limits().storage_offset_alignment as usize / 4;
    let mut rng = Rng::new(77);
    let mut paths = vec![MatmulPath::Portable];
    if ctx.features().subgroups {
        paths.push(MatmulPath::Subgroup);
    }
    for path in paths {
        for (trans_a, trans_b) in OPS {
            for &(m, k, n, extra) in &[(7usize, 33usize, 5usize, 3usize), (64, 32, 36, 4), (33, 8, 129, 7)] {
                // Each operand is the block of columns [align, align + width) of a matrix `extra`
                // columns wider than that block.
                let (ar, ac) = if trans_a { (k, m) } else { (m, k) };
                let (br, bc) = if trans_b { (n, k) } else { (k, n) };
                let wide = |rows: usize, cols: usize| (rows, align + cols + extra);
                let (aw, bw, cw) = (wide(ar, ac), wide(br, bc), wide(m, n));
                let a_full = rng.vec(aw.0 * aw.1);
                let b_full = rng.vec(bw.0 * bw.1);
                let c_full = ctx.upload_f32("C", &[cw.0, cw.1], &vec![7.0; cw.0 * cw.1]).unwrap();
                let at = ctx
                    .upload_f32("A", &[aw.0, aw.1], &a_full)
                    .unwrap()
                    .cols(align, ac, ctx.limits().storage_offset_alignment)
                    .unwrap();
                let bt = ctx
                    .upload_f32("B", &[bw.0, bw.1], &b_full)
                    .unwrap()
                    .cols(align, bc, ctx.limits().storage_offset_alignment)
                    .unwrap();
                let ct = c_full.cols(align, n, ctx.limits().storage_offset_alignment).unwrap();
                let opts = Matmul { trans_a, trans_b, path, alpha: 0.5, accumulate: true, ..Matmul::default() };
                let mut step = Step::new();
                matmul(&ctx, &mut step, &at, &bt, &ct, opts).unwrap();
                ctx.run(&step).unwrap();
                let pick = |full: &[f32], w: (usize, usize), cols: usize| -> Vec<f32> {
                    (0..w.0).flat_map(|r| full[r * w.1 + align..r * w.1 + align + cols].to_vec()).collect()
                };
                let prod = reference::matmul(&pick(&a_full, aw, ac), &pick(&b_full, bw, bc), m, k, n, trans_a, trans_b);
                let got = ctx.read_f32(&c_full).unwrap();
                for r in 0..m {
                    for col in 0..cw.1 {
                        let g = got[r * cw.1 + col] as f64;
                        let want =
                            if col >= align && col < align + n { 7.0 + 0.5 * prod[r * n + col - align] } else { 7.0 };
                        assert!(
                            (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "{path:?} ta={trans_a} tb={trans_b} {m}x{k}x{n}: C[{r}][{col}] = {g}, want {want}"
                        );
                    }
                }
            }
        }
    }
    // Other ops refuse strided views.
    let v = ctx.tensor("v", &[4, 64], DType::F32).unwrap().cols(0, 8, 4).unwrap();
    let out = ctx.tensor("o", &[4, 8], DType::F32).unwrap();
    let e = portalora::ops::elementwise::scale_forward(&ctx, &mut Step::new(), &v, 2.0, &out).unwrap_err();
    assert!(e.to_string().contains("strided"), "{e}");
    assert!(ctx.read_f32(&v).is_err());
}

/// Every tile the autotune may pick (for narrow subgroups and for wide GPU ones, whose tiles of
/// 4 and 8 rows are fewer rows than lanes), at subgroup sizes this adapter runs.
#[test]
fn matmul_every_tile_matches_reference() {
    let Some(ctx) = common::context() else { return };
    let Some(sg) = ctx.subgroup_size() else { return };
    let mut tiles: Vec<Tile> = tile_candidates(8).into_iter().chain(tile_candidates(32)).collect();
    tiles.dedup();
    let mut rng = Rng::new(11);
    for s in [4, 8].into_iter().filter(|s| *s <= sg) {
        for &tile in &tiles {
            for (trans_a, trans_b) in OPS {
                let opts = Matmul { trans_a, trans_b, ..Matmul::default() };
                for &(m, k, n) in &[(33, 7, 129), (7, 33, 1), (132, 68, 36), (4, 516, 8), (65, 64, 200)] {
                    check_matmul(&ctx, &mut rng, 1, false, m, k, n, opts, Some(s), Some(tile));
                }
                let acc = Matmul { alpha: -0.75, accumulate: true, ..opts };
                check_matmul(&ctx, &mut rng, 3, false, 36, 16, 64, acc, Some(s), Some(tile));
            }
        }
    }
}

/// Split-K (an LM head's input gradient: few outputs, a long K) against the reference, C and the
/// partial products poisoned first.
#[test]
fn matmul_split_k_matches_reference() {
    use portalora::ops::matmul::matmul_split_k;
    let Some(ctx) = common::context() else { return };
    if ctx.subgroup_size().is_none() {
        return;
    }
    let mut rng = Rng::new(13);
    for (m, k, n, splits) in [(33, 256, 20, 4), (64, 512, 36, 8), (5, 1024, 129, 16), (7, 96, 8, 1)] {
        let (a_data, b_data) = (rng.vec(m * k), rng.vec(k * n));
        let a = ctx.upload_f32("A", &[m, k], &a_data).unwrap();
        let b = ctx.upload_f32("B", &[k, n], &b_data).unwrap();
        let c = ctx.tensor("C", &[m, n], DType::F32).unwrap();
        let partials = ctx.tensor("partials", &[splits, m, n], DType::F32).unwrap();
        ctx.fill_f32(&c, f32::NAN).unwrap();
        ctx.fill_f32(&partials, f32::NAN).unwrap();
        let mut step = Step::new();
        matmul_split_k(&ctx, &mut step, &a, &b, &c, &partials, splits).unwrap();
        ctx.run(&step).unwrap();
        let want = reference::matmul(&a_data, &b_data, m, k, n, false, false);
        let err = max_rel_error(&ctx.read_f32(&c).unwrap(), &want);
        assert!(err <= TOL, "split-K m={m} k={k} n={n} splits={splits}: relative error {err:e}");
    }
    // K not a multiple of 4 · splits is refused, naming the shapes.
    let a = ctx.tensor("A", &[4, 36], DType::F32).unwrap();
    let b = ctx.tensor("B", &[36, 8], DType::F32).unwrap();
    let c = ctx.tensor("C", &[4, 8], DType::F32).unwrap();
    let p = ctx.tensor("P", &[4, 4, 8], DType::F32).unwrap();
    let e = matmul_split_k(&ctx, &mut Step::new(), &a, &b, &c, &p, 4).unwrap_err();
    assert!(e.to_string().contains("multiple of 16"), "{e}");
}
