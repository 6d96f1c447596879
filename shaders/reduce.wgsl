// reduce: out[o, i] = scale * sum_d x[o, d, i], f32, deterministic.
//
// The input is viewed as (outer, D, inner), row-major; the output is (outer, inner).
// Determinism: every output is summed in a fixed order that depends only on the shapes, never
// on timing, so the same input gives bit-identical results run after run.
//
// reduce_forward: one workgroup per output. Its 256 invocations each sum a strided slice of D,
// then a pairwise tree in workgroup memory combines the 256 partial sums. Used when D is long.
// reduce_columns_forward: one invocation per output walks D in order. Used when D is short
// and there are many outputs (e.g. summing a batch of gradients).
// Grids may be 2-D: workgroup (x, y) handles linear index y * gx + x, so that more than 65535
// workgroups' worth of outputs fit (gx = number of workgroups in x).

struct Params {
    outer: u32,
    d: u32,
    inner: u32,
    gx: u32,      // workgroups along x in this dispatch
    scale: f32,   // 1 for a sum, 1/D for a mean
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;          // (outer, D, inner)
@group(0) @binding(2) var<storage, read_write> out: array<f32>;  // (outer, inner)

const WG: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256, 1, 1)
fn reduce_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let o_lin = wg.y * p.gx + wg.x;  // uniform across the workgroup
    let count = p.outer * p.inner;
    let valid = o_lin < count;
    let o = o_lin / max(p.inner, 1u);
    let i = o_lin % max(p.inner, 1u);
    var s = 0.0;
    if (valid) {
        let base = o * p.d * p.inner + i;
        for (var d = t; d < p.d; d += WG) {
            s += x[base + d * p.inner];
        }
    }
    partial[t] = s;
    workgroupBarrier();
    for (var width = WG / 2u; width > 0u; width /= 2u) {
        if (t < width) {
            partial[t] = partial[t] + partial[t + width];
        }
        workgroupBarrier();
    }
    if (t == 0u && valid) {
        out[o_lin] = partial[0] * p.scale;
    }
}

@compute @workgroup_size(64, 1, 1)
fn reduce_columns_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let o_lin = (wg.y * p.gx + wg.x) * 64u + t;
    if (o_lin >= p.outer * p.inner) { return; }
    let o = o_lin / p.inner;
    let i = o_lin % p.inner;
    let base = o * p.d * p.inner + i;
    var s = 0.0;
    for (var d = 0u; d < p.d; d++) {
        s += x[base + d * p.inner];
    }
    out[o_lin] = s * p.scale;
}
