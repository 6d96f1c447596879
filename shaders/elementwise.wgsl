// elementwise: f32 operations on n elements, one invocation per element.
//
// add_forward:   out = x + y
// scale_forward: out = alpha * x            (y is bound but unused)
// axpy_forward:  out = out + alpha * x      (y is bound but unused)
// copy_forward:  out[offset + i] = x[i]     (y is bound but unused; appends rows to a cache)
// bias_forward:  out[i] = out[i] + x[i % offset]  (adds a bias of `offset` values to every row)
// softcap_forward: v[i] = alpha · tanh(v[i] / alpha), in place (logit soft-capping; its gradient
//   is folded into xent_backward)
// The backward of each is itself elementwise (add: both inputs get the gradient; scale: alpha
// times it), so the same entry points serve both directions.
// Grids may be 2-D: workgroup (x, y) handles elements from (y * gx + x) * 256; this keeps every
// grid dimension under the 65535 limit for up to 2^32 elements.

struct Params {
    n: u32,
    gx: u32,     // workgroups along x in this dispatch
    alpha: f32,
    offset: u32, // copy_forward: the destination offset, in elements; bias_forward: the bias's length
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;          // (n,); bias_forward: the bias (offset,)
@group(0) @binding(2) var<storage, read> y: array<f32>;          // (n,)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;  // (n,); copy_forward: at least (offset + n,)

fn index(wg: vec3<u32>, t: u32) -> u32 {
    return (wg.y * p.gx + wg.x) * 256u + t;
}

@compute @workgroup_size(256, 1, 1)
fn add_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = index(wg, t);
    if (i < p.n) { out[i] = x[i] + y[i]; }
}

@compute @workgroup_size(256, 1, 1)
fn scale_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = index(wg, t);
    if (i < p.n) { out[i] = p.alpha * x[i]; }
}

@compute @workgroup_size(256, 1, 1)
fn axpy_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = index(wg, t);
    if (i < p.n) { out[i] = out[i] + p.alpha * x[i]; }
}

@compute @workgroup_size(256, 1, 1)
fn copy_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = index(wg, t);
    if (i < p.n) { out[p.offset + i] = x[i]; }
}

@compute @workgroup_size(256, 1, 1)
fn bias_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = index(wg, t);
    if (i < p.n) { out[i] = out[i] + x[i % p.offset]; }
}

@group(0) @binding(1) var<storage, read_write> inplace: array<f32>;  // (n,) softcap_forward

@compute @workgroup_size(256, 1, 1)
fn softcap_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = index(wg, t);
    // Clamped as act.wgsl's tanh_clamped (drivers whose tanh overflows past |u| ≈ 44).
    if (i < p.n) { inplace[i] = p.alpha * tanh(clamp(inplace[i] / p.alpha, -10.0, 10.0)); }
}
