// adapter: the small elementwise pieces of the adapter branches that are not matmuls.
//
// dropout_forward:  out[i] = x[i] · keep(i) / (1 − p)
// dropout_backward: dx[i] += g[i] · keep(i) / (1 − p)
//   keep(i) is a hash of (seed, salt, i): the mask is never stored. `seed` is a one-element
//   storage tensor the host rewrites before each step (a recorded step replays with a new mask);
//   `salt` tells the adapted layers apart. Backward regenerates exactly the forward's mask.
//   The CPU twin is reference::dropout_keep; keep the two in step.
// scale_forward:    out[i, j] (+)= a[i, j] · col[j] (· row[i] when has_rows)
//   VeRA's λ_b ⊙ (·) and λ_d ⊙ (·) on (rows, cols) activations, and its merged B.
// scale_backward:   out[j] (+)= Σ_i a[i, j] · b[i, j]
//   The gradient of a per-column scale vector; one invocation walks one column in row order,
//   so the sum is bit-reproducible.
// Grids may be 2-D: workgroup (x, y) handles elements from (y * gx + x) * 256.

struct Params {
    n: u32,          // elements (dropout, scale_forward) or columns (scale_backward)
    gx: u32,
    cols: u32,       // scale_*: columns of the (rows, cols) operands
    rows: u32,       // scale_backward: rows to sum over
    salt: u32,       // dropout: which adapted layer
    threshold: u32,  // dropout: drop when hash >> 8 < threshold (= p · 2^24)
    keep_scale: f32, // dropout: 1 / (1 − p)
    accumulate: u32, // scale_*: 1 adds into out
    has_rows: u32,   // scale_forward: 1 also scales by row[i]
}

@group(0) @binding(0) var<uniform> p: Params;

fn index(wg: vec3<u32>, t: u32) -> u32 {
    return (wg.y * p.gx + wg.x) * 256u + t;
}

// lowbias32 (Chris Wellons' integer hash): cheap, no state, good avalanche.
fn hash(v: u32) -> u32 {
    var h = v;
    h ^= h >> 16u;
    h *= 0x7feb352du;
    h ^= h >> 15u;
    h *= 0x846ca68bu;
    h ^= h >> 16u;
    return h;
}

fn keep(i: u32) -> f32 {
    let h = hash(i + hash(seed[0] ^ hash(p.salt)));
    return select(p.keep_scale, 0.0, (h >> 8u) < p.threshold);
}

@group(0) @binding(1) var<storage, read> seed: array<u32>;          // (1,)
@group(0) @binding(2) var<storage, read> x: array<f32>;             // (n,) input, or g in backward
@group(0) @binding(3) var<storage, read_write> out: array<f32>;     // (n,)

@compute @workgroup_size(256, 1, 1)
fn dropout_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = index(wg, t);
    if (i < p.n) { out[i] = x[i] * keep(i); }
}

@compute @workgroup_size(256, 1, 1)
fn dropout_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = index(wg, t);
    if (i < p.n) { out[i] = out[i] + x[i] * keep(i); }
}

@group(0) @binding(1) var<storage, read> sa: array<f32>;            // (rows, cols)
@group(0) @binding(2) var<storage, read> sb: array<f32>;            // forward: col (cols,); backward: b (rows, cols)
@group(0) @binding(3) var<storage, read> srow: array<f32>;          // forward: row (rows,) (read when has_rows)
@group(0) @binding(4) var<storage, read_write> sout: array<f32>;    // forward: (rows, cols); backward: (cols,)

@compute @workgroup_size(256, 1, 1)
fn scale_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = index(wg, t);
    if (i >= p.n) { return; }
    var v = sa[i] * sb[i % p.cols];
    if (p.has_rows != 0u) { v = v * srow[i / p.cols]; }
    if (p.accumulate != 0u) { v = v + sout[i]; }
    sout[i] = v;
}

@compute @workgroup_size(256, 1, 1)
fn scale_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let j = index(wg, t);
    if (j >= p.n) { return; }
    var acc = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        acc += sa[r * p.cols + j] * sb[r * p.cols + j];
    }
    if (p.accumulate != 0u) { acc = acc + sout[j]; }
    sout[j] = acc;
}
