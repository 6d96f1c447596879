//! The cooperative-matrix product (shaders/matmul_coop.wgsl): `C = A·B` with f16 A and B and
//! f32 accumulation on the matrix units (tensor cores, simdgroup matrices), through wgpu's
//! experimental `EXPERIMENTAL_COOPERATIVE_MATRIX`. Not in training yet: [`coop_probe`] checks an
//! adapter compiles and runs it, against an f64 product of the same f16 values, and times it
//! (`portalora bench coop`).

use super::{shape_err, uniform};
use crate::gpu::{kernel_sources, Arg, Context, DType, GpuError, KernelSpec, Result, Step, Tensor};

const OP: &str = "matmul_coop";

#[derive(encase::ShaderType)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    pad: u32,
}

/// Records `C (M, N) f32 = A (M, K) f16 · B (K, N) f16`, every dimension a multiple of 16.
pub fn matmul_coop_forward(ctx: &Context, step: &mut Step, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<()> {
    if !ctx.features().cooperative_matrix {
        return Err(GpuError::MissingFeature {
            feature: "cooperative matrices (wgpu EXPERIMENTAL_COOPERATIVE_MATRIX)",
            adapter: ctx.info().name.clone(),
        });
    }
    let (&[m, k], &[k2, n], &[m2, n2]) = (a.shape(), b.shape(), c.shape()) else {
        return Err(shape_err(OP, "A, B and C must be 2-D".into()));
    };
    let fits = (a.dtype(), b.dtype(), c.dtype()) == (DType::F16, DType::F16, DType::F32)
        && (k, m, n) == (k2, m2, n2)
        && [m, n, k].iter().all(|d| d % 16 == 0 && *d > 0);
    if !fits {
        return Err(shape_err(
            OP,
            format!(
                "A {:?} {:?}, B {:?} {:?}, C {:?} {:?}: needs f16 A (M, K), f16 B (K, N), f32 C (M, N), each a \
                 multiple of 16",
                a.shape(),
                a.dtype(),
                b.shape(),
                b.dtype(),
                c.shape(),
                c.dtype()
            ),
        ));
    }
    let params = Params { m: m as u32, n: n as u32, k: k as u32, pad: 0 };
    let spec = KernelSpec::new(&kernel_sources::MATMUL_COOP, "matmul_coop_forward");
    let args = [Arg::Uniform(uniform(OP, &params)?), Arg::Read(a), Arg::Read(b), Arg::Write(c)];
    ctx.record(step, &spec, &args, [(n / 16) as u32, (m / 16) as u32, 1])
}

/// What [`coop_probe`] found.
#[derive(Clone, Debug)]
pub struct CoopProbe {
    pub size: usize,
    /// Largest |got − want| / max |want| against the f64 product of the same f16 values.
    pub max_rel_error: f64,
    /// Median GFLOP/s of the product, run `repeats` times per submission.
    pub gflops: f64,
}

/// Runs a `size`³ product (a multiple of 16) of random f16 matrices on the matrix units, checks
/// it and times it.
#[cfg(not(target_arch = "wasm32"))]
pub fn coop_probe(ctx: &Context, size: usize) -> Result<CoopProbe> {
    use crate::io::half::{f16_to_f32, f32_to_f16};
    let mut rng = crate::reference::Rng::new(3);
    let half =
        |n: usize, rng: &mut crate::reference::Rng| -> Vec<u16> { rng.vec(n).into_iter().map(f32_to_f16).collect() };
    let (ah, bh) = (half(size * size, &mut rng), half(size * size, &mut rng));
    let words = |h: &[u16]| -> Vec<u32> { h.chunks(2).map(|p| p[0] as u32 | (p[1] as u32) << 16).collect() };
    let a = ctx.upload_packed("coop A", DType::F16, &[size, size], &words(&ah))?;
    let b = ctx.upload_packed("coop B", DType::F16, &[size, size], &words(&bh))?;
    let c = ctx.tensor("coop C", &[size, size], DType::F32)?;
    ctx.fill_f32(&c, f32::NAN)?;
    let mut step = Step::new();
    matmul_coop_forward(ctx, &mut step, &a, &b, &c)?;
    ctx.run(&step)?;
    let got = ctx.read_f32(&c)?;
    let (af, bf): (Vec<f64>, Vec<f64>) =
        (ah.iter().map(|&x| f16_to_f32(x) as f64).collect(), bh.iter().map(|&x| f16_to_f32(x) as f64).collect());
    let mut worst: f64 = 0.0;
    let mut scale: f64 = 0.0;
    // Every 7th row is enough to catch a wrong layout or tile, and keeps the check quick.
    for i in (0..size).step_by(7) {
        for j in 0..size {
            let want: f64 = (0..size).map(|k| af[i * size + k] * bf[k * size + j]).sum();
            scale = scale.max(want.abs());
            let g = got[i * size + j] as f64;
            worst = worst.max(if g.is_finite() { (g - want).abs() } else { f64::INFINITY });
        }
    }
    let repeats = 20;
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = std::time::Instant::now();
        ctx.run_repeated(&step, repeats)?;
        ctx.wait_idle()?;
        times.push(t.elapsed().as_secs_f64() / repeats as f64);
    }
    times.sort_by(|x, y| x.total_cmp(y));
    let flops = 2.0 * (size as f64).powi(3);
    Ok(CoopProbe { size, max_rel_error: worst / scale.max(f64::MIN_POSITIVE), gflops: flops / times[2] / 1e9 })
}
