// act: activation functions, f32, one invocation per element.
//
// swiglu_forward: out = silu(gate) · up, silu(x) = x / (1 + exp(−x))   (LLaMA's MLP)
// swiglu_backward: dgate = dout · up · silu'(gate), dup = dout · silu(gate),
//   silu'(x) = σ(x) · (1 + x · (1 − σ(x))).
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
