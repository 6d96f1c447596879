// rope: rotary position embeddings as transformers applies them (rotate_half): within each head,
// dimension i pairs with i + head_dim/2, rotated by the angle pos · inv_freq[i]. The inverse
// frequencies (theta^(−2i/head_dim), rescaled as the model's rope scaling says) come from the host.
//
// rope_forward rotates by +angle; rope_backward by −angle (the transpose of a rotation), which
// maps the gradient of the output to the gradient of the input. One invocation per pair.
// x and out are (rows = batch · seq, heads, head_dim); pos = pos_offset + row % seq (the offset
// places new tokens after a KV cache during generation), or with `docs` set positions[row]: the
// token's position within its document when documents are packed into rows.

struct Params {
    rows: u32,
    seq: u32,
    heads: u32,
    head_dim: u32,
    gx: u32,         // workgroups along x
    pos_offset: u32,
    docs: u32,       // 1: positions[row] gives each row's position
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;          // (rows, heads, head_dim)
@group(0) @binding(2) var<storage, read_write> out: array<f32>;  // (rows, heads, head_dim)
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;   // (head_dim / 2,)
@group(0) @binding(4) var<storage, read> positions: array<u32>;  // (rows,), read when docs = 1

fn rotate(gid: u32, sign: f32) {
    let half = p.head_dim / 2u;
    let per_row = p.heads * half;
    if (gid >= p.rows * per_row) { return; }
    let row = gid / per_row;
    let rem = gid % per_row;
    let h = rem / half;
    let i = rem % half;
    var pos = f32(p.pos_offset + row % p.seq);
    if (p.docs == 1u) { pos = f32(positions[row]); }
    // Same f32 steps as transformers: pos · inv_freq.
    let angle = pos * inv_freq[i];
    let c = cos(angle);
    let s = sign * sin(angle);
    let base = (row * p.heads + h) * p.head_dim;
    let a = x[base + i];
    let b = x[base + i + half];
    out[base + i] = a * c - b * s;
    out[base + i + half] = b * c + a * s;
}

@compute @workgroup_size(64, 1, 1)
fn rope_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    rotate((wg.y * p.gx + wg.x) * 64u + t, 1.0);
}

@compute @workgroup_size(64, 1, 1)
fn rope_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    rotate((wg.y * p.gx + wg.x) * 64u + t, -1.0);
}
