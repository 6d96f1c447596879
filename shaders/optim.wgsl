// optim: optimizer steps, f32, one invocation per parameter, in place.
//
// Per-step values (learning rate, bias corrections) change every step, so they are read from a
// small storage tensor `hyper` that the host rewrites before each submission, instead of baked
// into the recorded uniforms; `clip` holds the gradient scale from global-norm clipping,
// computed on the GPU (1 when clipping is off), so no step needs a CPU round trip.
//
// adamw_step (PyTorch's AdamW, decoupled weight decay), with g = grad · clip:
//   p ← p · (1 − lr · wd);  m ← β1 m + (1 − β1) g;  v ← β2 v + (1 − β2) g²
//   p ← p − (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps),  bc_k = 1 − β_k^t
//   hyper = [lr, β1, β2, eps, wd, bc1, bc2, unused]
// sgd_step (PyTorch's SGD with momentum, coupled weight decay, no dampening or Nesterov):
//   g ← g + wd · p;  buf ← g on the first step, else μ · buf + g;  p ← p − lr · buf
//   hyper = [lr, μ, wd, first (1 or 0), unused...]

struct Params {
    n: u32,
    gx: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> hyper: array<f32>;        // (8,)
@group(0) @binding(2) var<storage, read> clip: array<f32>;         // (1,)
@group(0) @binding(3) var<storage, read> grad: array<f32>;         // (n,)
@group(0) @binding(4) var<storage, read_write> param: array<f32>;  // (n,)
@group(0) @binding(5) var<storage, read_write> m: array<f32>;      // (n,) first moment / momentum buffer
@group(0) @binding(6) var<storage, read_write> v: array<f32>;      // (n,) second moment (AdamW)

fn index(wg: vec3<u32>, t: u32) -> u32 {
    return (wg.y * p.gx + wg.x) * 256u + t;
}

@compute @workgroup_size(256, 1, 1)
fn adamw_step(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = index(wg, t);
    if (i >= p.n) { return; }
    let lr = hyper[0];
    let b1 = hyper[1];
    let b2 = hyper[2];
    let eps = hyper[3];
    let wd = hyper[4];
    let g = grad[i] * clip[0];
    var w = param[i] * (1.0 - lr * wd);
    let mi = b1 * m[i] + (1.0 - b1) * g;
    let vi = b2 * v[i] + (1.0 - b2) * g * g;
    m[i] = mi;
    v[i] = vi;
    w -= (lr / hyper[5]) * mi / (sqrt(vi) / sqrt(hyper[6]) + eps);
    param[i] = w;
}

@compute @workgroup_size(256, 1, 1)
fn sgd_step(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = index(wg, t);
    if (i >= p.n) { return; }
    let lr = hyper[0];
    let mu = hyper[1];
    let wd = hyper[2];
    let g = grad[i] * clip[0] + wd * param[i];
    var buf = g;
    if (hyper[3] == 0.0) { buf = mu * m[i] + g; }
    m[i] = buf;
    param[i] = param[i] - lr * buf;
}
