// act: activation functions, f32, one invocation per element.
//
// swiglu_forward: out = silu(gate) · up, silu(x) = x / (1 + exp(−x))   (LLaMA's MLP)
// swiglu_backward: dgate = dout · up · silu'(gate), dup = dout · silu(gate),
//   silu'(x) = σ(x) · (1 + x · (1 − σ(x))).
// geglu_forward: out = gelu(gate) · up, gelu as below   (Gemma's MLP)
// geglu_backward: dgate = dout · up · gelu'(gate), dup = dout · gelu(gate).
// gelu_forward: out = 0.5 · x · (1 + tanh(u)), u = √(2/π) · (x + 0.044715 x³)   (GPT-2's gelu_new)
// gelu_backward: dx = dout · (0.5 (1 + tanh u) + 0.5 x (1 − tanh² u) · √(2/π) (1 + 3 · 0.044715 x²))
// Grids may be 2-D: element = ((wg.y * gx + wg.x) * 256 + local index).

struct Params {
    n: u32,
    gx: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate: array<f32>;       // (n,)
@group(0) @binding(2) var<storage, read> up: array<f32>;         // (n,)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;  // (n,)

@compute @workgroup_size(256, 1, 1)
fn swiglu_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = (wg.y * p.gx + wg.x) * 256u + t;
    if (i >= p.n) { return; }
    let g = gate[i];
    out[i] = g / (1.0 + exp(-g)) * up[i];
}

@group(0) @binding(1) var<storage, read> bgate: array<f32>;        // (n,)
@group(0) @binding(2) var<storage, read> bup: array<f32>;          // (n,)
@group(0) @binding(3) var<storage, read> dout: array<f32>;         // (n,)
@group(0) @binding(4) var<storage, read_write> dgate: array<f32>;  // (n,)
@group(0) @binding(5) var<storage, read_write> dup: array<f32>;    // (n,)

@compute @workgroup_size(256, 1, 1)
fn swiglu_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = (wg.y * p.gx + wg.x) * 256u + t;
    if (i >= p.n) { return; }
    let g = bgate[i];
    let sg = 1.0 / (1.0 + exp(-g));
    let d = dout[i];
    dup[i] = d * g * sg;
    dgate[i] = d * bup[i] * sg * (1.0 + g * (1.0 - sg));
}

const GELU_C: f32 = 0.7978845608028654;  // √(2/π)

// tanh with its argument clamped: some drivers compute tanh from exp and return NaN past
// |u| ≈ 44 (SwiftShader, under browsers' WebGPU; Gemma's gate activations reach it); tanh(±10)
// is ±1 in f32, so the clamp changes no result.
fn tanh_clamped(u: f32) -> f32 {
    return tanh(clamp(u, -10.0, 10.0));
}

fn gelu(x: f32) -> f32 {
    return 0.5 * x * (1.0 + tanh_clamped(GELU_C * (x + 0.044715 * x * x * x)));
}

fn gelu_grad(x: f32) -> f32 {
    let th = tanh_clamped(GELU_C * (x + 0.044715 * x * x * x));
    let du = GELU_C * (1.0 + 3.0 * 0.044715 * x * x);
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du;
}

@compute @workgroup_size(256, 1, 1)
fn geglu_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = (wg.y * p.gx + wg.x) * 256u + t;
    if (i >= p.n) { return; }
    out[i] = gelu(gate[i]) * up[i];
}

@compute @workgroup_size(256, 1, 1)
fn geglu_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = (wg.y * p.gx + wg.x) * 256u + t;
    if (i >= p.n) { return; }
    let g = bgate[i];
    let d = dout[i];
    dup[i] = d * gelu(g);
    dgate[i] = d * bup[i] * gelu_grad(g);
}

@group(0) @binding(1) var<storage, read> gx_in: array<f32>;       // (n,)
@group(0) @binding(2) var<storage, read_write> gout: array<f32>;  // (n,)

@compute @workgroup_size(256, 1, 1)
fn gelu_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = (wg.y * p.gx + wg.x) * 256u + t;
    if (i >= p.n) { return; }
    gout[i] = gelu(gx_in[i]);
}

@group(0) @binding(2) var<storage, read> gdout: array<f32>;       // (n,)
@group(0) @binding(3) var<storage, read_write> gdx: array<f32>;   // (n,)

@compute @workgroup_size(256, 1, 1)
fn gelu_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = (wg.y * p.gx + wg.x) * 256u + t;
    if (i >= p.n) { return; }
    gdx[i] = gdout[i] * gelu_grad(gx_in[i]);
}
