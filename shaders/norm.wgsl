// norm: RMSNorm (LLaMA), f32.
//
// rmsnorm_forward: out[r, :] = x[r, :] · rstd[r] · w,  rstd[r] = 1 / sqrt(mean(x[r, :]²) + eps).
// rstd is kept for the backward pass. One workgroup of 64 invocations per row: each sums the
// squares of a strided slice, then a fixed pairwise tree combines them (deterministic).
// Rows come from a 2-D grid: row = wg.y * gx + wg.x.

struct Params {
    rows: u32,
    dim: u32,
    gx: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;           // (rows, dim)
@group(0) @binding(2) var<storage, read> w: array<f32>;           // (dim,)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;   // (rows, dim)
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;  // (rows,)

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64, 1, 1)
fn rmsnorm_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let row = wg.y * p.gx + wg.x;
    let valid = row < p.rows;
    let base = row * p.dim;
    var s = 0.0;
    if (valid) {
        for (var i = t; i < p.dim; i += 64u) {
            let v = x[base + i];
            s += v * v;
        }
    }
    partial[t] = s;
    workgroupBarrier();
    for (var width = 32u; width > 0u; width /= 2u) {
        if (t < width) {
            partial[t] = partial[t] + partial[t + width];
        }
        workgroupBarrier();
    }
    if (!valid) { return; }
    let r = inverseSqrt(partial[0] / f32(p.dim) + p.eps);
    for (var i = t; i < p.dim; i += 64u) {
        out[base + i] = x[base + i] * r * w[i];
    }
    if (t == 0u) { rstd[row] = r; }
}
