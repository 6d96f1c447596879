// heads: attention's tensors between the token-major layout of the model's activations,
// (B, T, Hx, d), and the head-major layout (B, H, T, d) in which attention is a batch of B·H
// ordinary matrix products (ops::attention's matmul path). H = Hx · rep: with grouped-query
// attention, key and value heads are repeated `rep` times on the way in, and their gradients
// summed over the repeats on the way back, which makes heads_backward the exact adjoint of
// heads_forward.
//
// heads_forward:  y[b, h, t, :] = x[b, t, h / rep, :]
// heads_backward: x[b, t, g, :] = sum_{j < rep} y[b, g · rep + j, t, :]   (written, `=`)
//
// One invocation per vec4 of the output (head_dim is a multiple of 4 on this path); the grid
// names the head and batch entry, and the head size is a pipeline constant, so that no index
// needs a division by a runtime value (slow on CPU drivers).

struct Params {
    seq: u32,
    heads: u32,   // H (the head-major side)
    rep: u32,
}

override D4: u32 = 1u;  // head_dim / 4

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;        // (B, T, H / rep, d)
@group(0) @binding(2) var<storage, read_write> y: array<vec4<f32>>;  // (B, H, T, d)

// Grid: x = blocks of 64 vec4 of one head's (T, d) slice, y = H, z = B.
@compute @workgroup_size(64, 1, 1)
fn heads_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;  // t · D4 + e
    if (j >= p.seq * D4) { return; }
    let h = gid.y;
    let b = gid.z;
    let hx = p.heads / p.rep;
    let t = j / D4;
    let e = j % D4;
    y[(b * p.heads + h) * p.seq * D4 + j] = x[((b * p.seq + t) * hx + h / p.rep) * D4 + e];
}

@group(0) @binding(1) var<storage, read> by: array<vec4<f32>>;        // (B, H, T, d)
@group(0) @binding(2) var<storage, read_write> bx: array<vec4<f32>>;  // (B, T, H / rep, d)

// Grid: x = blocks of 64 vec4 of one token-major head's (T, d) slice, y = H / rep, z = B.
@compute @workgroup_size(64, 1, 1)
fn heads_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;  // t · D4 + e
    if (j >= p.seq * D4) { return; }
    let g = gid.y;
    let b = gid.z;
    let hx = p.heads / p.rep;
    let t = j / D4;
    let e = j % D4;
    var acc = vec4<f32>(0.0);
    for (var r = 0u; r < p.rep; r++) {
        acc += by[(b * p.heads + g * p.rep + r) * p.seq * D4 + j];
    }
    bx[((b * p.seq + t) * hx + g) * D4 + e] = acc;
}
