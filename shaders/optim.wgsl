// optim: optimizer steps, f32, one invocation per parameter, in place (a template: see below).
//
// Per-step values (learning rate, bias corrections) change every step, so they are read from a
// small storage tensor `hyper` (struct Hyper, src/ops/optim.rs) that the host rewrites before
// each submission, instead of baked into the recorded uniforms; `clip` = [gradient scale, global
// gradient norm] (and, when it has three elements, the first non-finite partial sum), computed on
// the GPU by sumsq_partial + clip_scale below (scale 1 when clipping is off), so no step needs a
// CPU round trip.
//
// adamw_step (PyTorch's AdamW, decoupled weight decay), with g = grad · clip:
//   p ← p · (1 − lr · wd);  m ← β1 m + (1 − β1) g;  v ← β2 v + (1 − β2) g²
//   p ← p − (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps),  bc_k = 1 − β_k^t
//   decay_after = 1 applies the decay after the update, p ← p − lr · wd · p, as transformers'
//   AdamW (which PEFT's LoRA-FA optimizer uses); its eps-outside-the-bias-correction form is the
//   same formula with eps' = eps / sqrt(bc2), which the host passes.
// sgd_step (PyTorch's SGD with momentum, coupled weight decay, no dampening or Nesterov):
//   g ← g + wd · p;  buf ← g on the first step, else μ · buf + g;  p ← p − lr · buf

// Several tensors per dispatch: adamw_step, sgd_step and sumsq_partial each take up to {{K}}
// tensors (as many as the adapter's storage bindings allow; the host passes the rest in further
// dispatches). `q.t[j]` describes tensor j: a workgroup finds its tensor, then does what the
// one-tensor kernel did at that tensor's offset, so the arithmetic, and every result, is the same
// however the tensors are grouped.

struct Params {
    n: u32,
    gx: u32,
    offset: u32,
    max_norm: f32,   // clip_scale: 0 or less disables clipping (the norm is still computed)
}

struct TensorRow {
    first_group: u32,  // its first workgroup in the dispatch's grid
    n: u32,            // its elements
    first_slot: u32,   // sumsq_partial: its first partial-sum slot
    pad: u32,
}

struct Multi {
    count: u32,
    gx: u32,
    pad0: u32,
    pad1: u32,
    t: array<TensorRow, {{K}}>,
}

// The optimizer's values for this step; each optimizer reads its own.
struct Hyper {
    lr: f32,
    beta1: f32,             // AdamW
    beta2: f32,
    eps: f32,
    weight_decay: f32,      // both
    bias_correction1: f32,  // AdamW: 1 − β1^t
    bias_correction2: f32,  // 1 − β2^t
    decay_after: f32,       // AdamW: 1 decays after the update
    momentum: f32,          // SGD: μ
    first: f32,             // SGD: 1 on the first step
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(0) var<uniform> q: Multi;
@group(0) @binding(1) var<storage, read> hyper: Hyper;
@group(0) @binding(2) var<storage, read> clip: array<f32>;         // (2,) [scale, norm] or (3,) with the non-finite flag
{{BINDINGS}}

// This workgroup's tensor (the last whose first workgroup is at or before it) and its block.
fn tensor_of(block: u32) -> u32 {
    var j = 0u;
    for (var k = 1u; k < q.count; k++) {
        if (block >= q.t[k].first_group) { j = k; }
    }
    return j;
}

// One AdamW update of a parameter w with moments m, v from its raw gradient: (w, m, v).
fn adamw_update(grad: f32, w0: f32, m0: f32, v0: f32) -> vec3<f32> {
    let lr = hyper.lr;
    let b1 = hyper.beta1;
    let b2 = hyper.beta2;
    let eps = hyper.eps;
    let wd = hyper.weight_decay;
    let g = grad * clip[0];
    let decay_after = hyper.decay_after != 0.0;
    var w = w0;
    if (!decay_after) { w = w * (1.0 - lr * wd); }
    let mi = b1 * m0 + (1.0 - b1) * g;
    let vi = b2 * v0 + (1.0 - b2) * g * g;
    w -= (lr / hyper.bias_correction1) * mi / (sqrt(vi) / sqrt(hyper.bias_correction2) + eps);
    if (decay_after) { w = w - lr * wd * w; }
    return vec3<f32>(w, mi, vi);
}

// One SGD update of a parameter w with momentum buffer m: (w, m).
fn sgd_update(grad: f32, w: f32, m0: f32) -> vec2<f32> {
    let lr = hyper.lr;
    let mu = hyper.momentum;
    let wd = hyper.weight_decay;
    let g = grad * clip[0] + wd * w;
    var buf = g;
    if (hyper.first == 0.0) { buf = mu * m0 + g; }
    return vec2<f32>(w - lr * buf, buf);
}

// adamw_step or sgd_step (STEP), each case updating tensor j with adamw_update or sgd_update.
@compute @workgroup_size(256, 1, 1)
fn {{STEP}}(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let block = wg.y * q.gx + wg.x;
    let j = tensor_of(block);
    let i = (block - q.t[j].first_group) * 256u + t;
    if (i >= q.t[j].n) { return; }
    switch j {
{{STEP_CASES}}
        default: {}
    }
}

// Global gradient-norm clipping, deterministic: sumsq_partial writes, for each block of 4096
// elements of each gradient, the sum of squares (a fixed tree per workgroup) into the partial
// slot of that block; clip_scale then sums all partials in a fixed order in a single workgroup
// and writes clip = [min(1, max_norm / (norm + 1e-6)), norm].
const BLOCK: u32 = 4096u;
var<workgroup> red: array<f32, 256>;

@group(0) @binding(1) var<storage, read_write> sq_out: array<f32>;     // (partials,)

// Element i of gradient j of this dispatch.
fn sq_load(j: u32, i: u32) -> f32 {
    switch j {
{{SUMSQ_CASES}}
        default: { return 0.0; }
    }
}

fn tree256(t: u32, v: f32) -> f32 {
    red[t] = v;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w /= 2u) {
        if (t < w) { red[t] = red[t] + red[t + w]; }
        workgroupBarrier();
    }
    return red[0];
}

@compute @workgroup_size(256, 1, 1)
fn sumsq_partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let block = wg.y * q.gx + wg.x;
    let j = tensor_of(block);
    let local = block - q.t[j].first_group;
    let n = q.t[j].n;
    let start = local * BLOCK;
    var s = 0.0;
    for (var i = start + t; i < min(start + BLOCK, n); i += 256u) {
        let g = sq_load(j, i);
        s += g * g;
    }
    let total = tree256(t, s);
    if (t == 0u && start < n) { sq_out[q.t[j].first_slot + local] = total; }
}

@group(0) @binding(1) var<storage, read> partials: array<f32>;         // (n,)
@group(0) @binding(2) var<storage, read_write> clip_out: array<f32>;   // (2,) or (3,)

var<workgroup> first_bad: array<u32, 256>;

// NaN or ±Inf, tested on the bits: shader compilers may assume floats are finite and fold
// `x != x` away.
fn not_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) == 0x7f800000u;
}

// clip_out = [scale, norm] and, when it has a third element, the index of the first partial
// sum that is not finite (-1 if none): the host maps it to the gradient tensor it belongs to,
// so a NaN is caught and named without any extra pass or sync.
@compute @workgroup_size(256, 1, 1)
fn clip_scale(@builtin(local_invocation_index) t: u32) {
    var s = 0.0;
    var bad = 0xffffffffu;
    for (var i = t; i < p.n; i += 256u) {
        let v = partials[i];
        s += v;
        if (bad == 0xffffffffu && not_finite(v)) { bad = i; }
    }
    let norm = sqrt(tree256(t, s));
    first_bad[t] = bad;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w /= 2u) {
        if (t < w) { first_bad[t] = min(first_bad[t], first_bad[t + w]); }
        workgroupBarrier();
    }
    if (t == 0u) {
        var scale = 1.0;
        if (p.max_norm > 0.0) { scale = min(1.0, p.max_norm / (norm + 1e-6)); }
        clip_out[0] = scale;
        clip_out[1] = norm;
        if (arrayLength(&clip_out) > 2u) {
            clip_out[2] = select(f32(first_bad[0]), -1.0, first_bad[0] == 0xffffffffu);
        }
    }
}
