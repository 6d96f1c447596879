// norm: RMSNorm (LLaMA) and LayerNorm (GPT-2), f32.
//
// rmsnorm_forward: out[r, :] = x[r, :] · rstd[r] · w,  rstd[r] = 1 / sqrt(mean(x[r, :]²) + eps).
// rstd is kept for the backward pass. One workgroup of 64 invocations per row: each sums the
// squares of a strided slice, then a fixed pairwise tree combines them (deterministic).
// rmsnorm_backward: given dy = dL/dout, writes dx = dresid + dL/dx where
//   dL/dx_i = rstd · w_i · dy_i − rstd³ / dim · x_i · sum_j (w_j · dy_j · x_j).
// dresid is the gradient arriving through the residual connection around the norm (the norm's
// input also feeds the residual add), so the sum costs no extra pass; has_resid = 0 skips it.
// Rows come from a 2-D grid: row = wg.y * gx + wg.x.

struct Params {
    rows: u32,
    dim: u32,
    gx: u32,
    eps: f32,
    has_resid: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;           // (rows, dim)
@group(0) @binding(2) var<storage, read> w: array<f32>;           // (dim,)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;   // (rows, dim)
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;  // (rows,)

var<workgroup> partial: array<f32, 64>;
var<workgroup> partial2: array<f32, 64>;

// Sums `a` (and `b`) over the workgroup with fixed trees; every invocation gets the totals.
fn tree_sum2(t: u32, a: f32, b: f32) -> vec2<f32> {
    partial[t] = a;
    partial2[t] = b;
    workgroupBarrier();
    for (var width = 32u; width > 0u; width /= 2u) {
        if (t < width) {
            partial[t] = partial[t] + partial[t + width];
            partial2[t] = partial2[t] + partial2[t + width];
        }
        workgroupBarrier();
    }
    let r = vec2<f32>(partial[0], partial2[0]);
    workgroupBarrier();
    return r;
}


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
    let r = inverseSqrt(tree_sum2(t, s, 0.0).x / f32(p.dim) + p.eps);
    if (!valid) { return; }
    for (var i = t; i < p.dim; i += 64u) {
        out[base + i] = x[base + i] * r * w[i];
    }
    if (t == 0u) { rstd[row] = r; }
}

// Backward bindings. They reuse binding numbers of the forward entry point: WGSL only requires
// bindings to be distinct among the resources one entry point uses.
@group(0) @binding(0) var<uniform> pb: Params;
@group(0) @binding(1) var<storage, read> bx: array<f32>;          // (rows, dim) forward input
@group(0) @binding(2) var<storage, read> bw: array<f32>;          // (dim,)
@group(0) @binding(3) var<storage, read> brstd: array<f32>;       // (rows,)
@group(0) @binding(4) var<storage, read> dy: array<f32>;          // (rows, dim)
@group(0) @binding(5) var<storage, read> dresid: array<f32>;      // (rows, dim), unused if has_resid = 0
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;    // (rows, dim)

@compute @workgroup_size(64, 1, 1)
fn rmsnorm_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let row = wg.y * pb.gx + wg.x;
    let valid = row < pb.rows;
    let base = row * pb.dim;
    var s = 0.0;
    if (valid) {
        for (var i = t; i < pb.dim; i += 64u) {
            s += bw[i] * dy[base + i] * bx[base + i];
        }
    }
    let c_sum = tree_sum2(t, s, 0.0).x;
    if (!valid) { return; }
    let r = brstd[row];
    let c = r * r * r / f32(pb.dim) * c_sum;
    for (var i = t; i < pb.dim; i += 64u) {
        var g = r * bw[i] * dy[base + i] - c * bx[base + i];
        if (pb.has_resid != 0u) { g += dresid[base + i]; }
        dx[base + i] = g;
    }
}

// layernorm_forward: out[r, :] = (x[r, :] − mean[r]) · rstd[r] · w + b, with the biased variance
// as PyTorch computes it; mean and rstd are kept for the backward pass.
// layernorm_backward: with x̂ = (x − mean) · rstd and g = w · dy,
//   dx = dresid + rstd · (g − mean(g) − x̂ · mean(g · x̂)).
@group(0) @binding(1) var<storage, read> lx: array<f32>;           // (rows, dim)
@group(0) @binding(2) var<storage, read> lw: array<f32>;           // (dim,)
@group(0) @binding(3) var<storage, read> lb: array<f32>;           // (dim,)
@group(0) @binding(4) var<storage, read_write> lout: array<f32>;   // (rows, dim)
@group(0) @binding(5) var<storage, read_write> lmean: array<f32>;  // (rows,)
@group(0) @binding(6) var<storage, read_write> lrstd: array<f32>;  // (rows,)

@compute @workgroup_size(64, 1, 1)
fn layernorm_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let row = wg.y * p.gx + wg.x;
    let valid = row < p.rows;
    let base = row * p.dim;
    let n = f32(p.dim);
    var s = 0.0;
    if (valid) {
        for (var i = t; i < p.dim; i += 64u) { s += lx[base + i]; }
    }
    let mean = tree_sum2(t, s, 0.0).x / n;
    var v = 0.0;
    if (valid) {
        for (var i = t; i < p.dim; i += 64u) {
            let d = lx[base + i] - mean;
            v += d * d;
        }
    }
    let r = inverseSqrt(tree_sum2(t, v, 0.0).x / n + p.eps);
    if (!valid) { return; }
    for (var i = t; i < p.dim; i += 64u) {
        lout[base + i] = (lx[base + i] - mean) * r * lw[i] + lb[i];
    }
    if (t == 0u) {
        lmean[row] = mean;
        lrstd[row] = r;
    }
}

@group(0) @binding(3) var<storage, read> gmean: array<f32>;        // (rows,)
@group(0) @binding(4) var<storage, read> grstd: array<f32>;        // (rows,)
@group(0) @binding(5) var<storage, read> gdy: array<f32>;          // (rows, dim)
@group(0) @binding(6) var<storage, read> gdresid: array<f32>;      // (rows, dim)
@group(0) @binding(7) var<storage, read_write> gdx: array<f32>;    // (rows, dim)

@compute @workgroup_size(64, 1, 1)
fn layernorm_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let row = wg.y * pb.gx + wg.x;
    let valid = row < pb.rows;
    let base = row * pb.dim;
    var mean = 0.0;
    var r = 0.0;
    if (valid) {
        mean = gmean[row];
        r = grstd[row];
    }
    var sg = 0.0;
    var sgx = 0.0;
    if (valid) {
        for (var i = t; i < pb.dim; i += 64u) {
            let g = lw[i] * gdy[base + i];
            sg += g;
            sgx += g * (lx[base + i] - mean) * r;
        }
    }
    let sums = tree_sum2(t, sg, sgx) / f32(pb.dim);
    if (!valid) { return; }
    for (var i = t; i < pb.dim; i += 64u) {
        let xh = (lx[base + i] - mean) * r;
        var d = r * (lw[i] * gdy[base + i] - sums.x - xh * sums.y);
        if (pb.has_resid != 0u) { d += gdresid[base + i]; }
        gdx[base + i] = d;
    }
}
