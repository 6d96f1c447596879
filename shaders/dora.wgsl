// dora: DoRA's non-matmul pieces (Liu et al. 2024, PEFT's use_dora). A site's output o is
// scaled by g_o = m_o / n_o, the trained magnitude over the norm of row o of W0 + s·B·A (taken
// over the input dimension, and treated as a constant in backward, as PEFT and the paper do).
//
// dora_norm:     n_o = sqrt(c_o + Σ_j B[o, j] · U[j, o]),  g_o = m_o / n_o        (one per o)
//   where c_o = ‖W0_o‖² (dora_sumsq, once) and U = 2s·A·W0ᵀ + s²·(A·Aᵀ)·Bᵀ (two matmuls), so
//   that ‖W0_o + s·(B·A)_o‖² is reduced without materialising W0 + s·B·A.
// dora_forward:  y[t, o] = g_o · y[t, o]          (has_u = 0: y holds W0·x + s·B·A·x)
//                y[t, o] += g_o · u[t, o]         (has_u = 1: dropout; u = W0·x' + s·B·A·x')
// dora_backward: dm_o = k_o · Σ_t dy[t, o] · v[t, o]; dyg[t, o] = g_o · dy[t, o];
//                h[t, o] = (g_o − 1) · dy[t, o]                                   (one per o)
//   without dropout v = y − bias and k_o = 1 / m_o (y = g ⊙ (W0·x + s·B·A·x) + bias), with
//   dropout v = u and k_o = 1 / n_o. One invocation walks one column in row order, so the sum
//   is bit-reproducible.
// dora_sumsq:    c_o = Σ_k W[o, k]²  (flag = 1: W is (out, in)) or Σ_k W[k, o]² ((in, out))
// dora_weight:   W's row (or column) o times g_o (invert = 0) or divided by it (invert = 1):
//   merging (W ← g ⊙ (W0 + s·B·A)) and unmerging.
// Grids may be 2-D: workgroup (x, y) covers items from (y * gx + x) * 256.

struct Params {
    rows: u32,   // tokens (dora_forward, dora_backward) or the stored matrix's rows
    cols: u32,   // outputs o (the stored matrix's columns)
    r: u32,      // dora_norm: the rank
    gx: u32,
    flag: u32,   // dora_forward: has_u; dora_backward: dropout (v = u); dora_sumsq / dora_weight: per row
    flag2: u32,  // dora_backward: has a bias; dora_weight: invert
}

@group(0) @binding(0) var<uniform> p: Params;

fn index(wg: vec3<u32>, t: u32) -> u32 {
    return (wg.y * p.gx + wg.x) * 256u + t;
}

@group(0) @binding(1) var<storage, read> n_c: array<f32>;          // (out,) c
@group(0) @binding(2) var<storage, read> n_b: array<f32>;          // (out, r) B
@group(0) @binding(3) var<storage, read> n_u: array<f32>;          // (r, out) U
@group(0) @binding(4) var<storage, read> n_m: array<f32>;          // (out,) m
@group(0) @binding(5) var<storage, read_write> n_n: array<f32>;    // (out,) n
@group(0) @binding(6) var<storage, read_write> n_g: array<f32>;    // (out,) g

@compute @workgroup_size(256, 1, 1)
fn dora_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let o = index(wg, t);
    if (o >= p.cols) { return; }
    var sq = n_c[o];
    for (var j = 0u; j < p.r; j++) {
        sq += n_b[o * p.r + j] * n_u[j * p.cols + o];
    }
    // Rounding can take an exact zero a hair below it.
    let n = sqrt(max(sq, 0.0));
    n_n[o] = n;
    n_g[o] = n_m[o] / n;
}

@group(0) @binding(1) var<storage, read> f_g: array<f32>;          // (out,) g
@group(0) @binding(2) var<storage, read> f_u: array<f32>;          // (rows, out) u (or g again)
@group(0) @binding(3) var<storage, read_write> f_y: array<f32>;    // (rows, out) y

@compute @workgroup_size(256, 1, 1)
fn dora_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = index(wg, t);
    if (i >= p.rows * p.cols) { return; }
    let g = f_g[i % p.cols];
    if (p.flag == 1u) {
        f_y[i] = f_y[i] + g * f_u[i];
    } else {
        f_y[i] = g * f_y[i];
    }
}

@group(0) @binding(1) var<storage, read> b_dy: array<f32>;         // (rows, out)
@group(0) @binding(2) var<storage, read> b_v: array<f32>;          // (rows, out) y or u
@group(0) @binding(3) var<storage, read> b_bias: array<f32>;       // (out,) (anything without one)
@group(0) @binding(4) var<storage, read> b_m: array<f32>;          // (out,)
@group(0) @binding(5) var<storage, read> b_n: array<f32>;          // (out,)
@group(0) @binding(6) var<storage, read> b_g: array<f32>;          // (out,)
@group(0) @binding(7) var<storage, read_write> b_dm: array<f32>;   // (out,)
@group(0) @binding(8) var<storage, read_write> b_dyg: array<f32>;  // (rows, out)
@group(0) @binding(9) var<storage, read_write> b_h: array<f32>;    // (rows, out)

@compute @workgroup_size(256, 1, 1)
fn dora_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let o = index(wg, t);
    if (o >= p.cols) { return; }
    let g = b_g[o];
    var bias = 0.0;
    if (p.flag2 == 1u) { bias = b_bias[o]; }
    var sum = 0.0;
    for (var row = 0u; row < p.rows; row++) {
        let i = row * p.cols + o;
        let dy = b_dy[i];
        if (p.flag == 1u) {
            sum += dy * b_v[i];
        } else {
            sum += dy * (b_v[i] - bias);
        }
        b_dyg[i] = g * dy;
        b_h[i] = (g - 1.0) * dy;
    }
    if (p.flag == 1u) {
        b_dm[o] = sum / b_n[o];
    } else {
        b_dm[o] = sum / b_m[o];
    }
}

@group(0) @binding(1) var<storage, read> s_w: array<f32>;          // (rows, cols)
@group(0) @binding(2) var<storage, read_write> s_c: array<f32>;    // (out,)

@compute @workgroup_size(256, 1, 1)
fn dora_sumsq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let o = index(wg, t);
    var sum = 0.0;
    if (p.flag == 1u) {
        if (o >= p.rows) { return; }
        for (var k = 0u; k < p.cols; k++) {
            let v = s_w[o * p.cols + k];
            sum += v * v;
        }
    } else {
        if (o >= p.cols) { return; }
        for (var k = 0u; k < p.rows; k++) {
            let v = s_w[k * p.cols + o];
            sum += v * v;
        }
    }
    s_c[o] = sum;
}

@group(0) @binding(1) var<storage, read> w_g: array<f32>;          // (out,)
@group(0) @binding(2) var<storage, read_write> w_w: array<f32>;    // (rows, cols)

@compute @workgroup_size(256, 1, 1)
fn dora_weight(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = index(wg, t);
    if (i >= p.rows * p.cols) { return; }
    var o = i % p.cols;
    if (p.flag == 1u) { o = i / p.cols; }
    if (p.flag2 == 1u) {
        w_w[i] = w_w[i] / w_g[o];
    } else {
        w_w[i] = w_w[i] * w_g[o];
    }
}
