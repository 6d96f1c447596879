// act: activation functions, f32, one invocation per element.
//
// swiglu_forward: out = silu(gate) · up, silu(x) = x / (1 + exp(−x))   (LLaMA's MLP)
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
