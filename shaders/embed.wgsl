// embed: token embedding lookup, f32.
//
// embed_forward: out[t, :] = table[ids[t], :]. One invocation per output element. Ids are
// checked against the vocabulary on the host before they are uploaded.

struct Params {
    tokens: u32,
    dim: u32,
    gx: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;         // (tokens,)
@group(0) @binding(2) var<storage, read> table: array<f32>;       // (vocab, dim)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;   // (tokens, dim)

@compute @workgroup_size(256, 1, 1)
fn embed_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = (wg.y * p.gx + wg.x) * 256u + li;
    if (i >= p.tokens * p.dim) { return; }
    let t = i / p.dim;
    let c = i % p.dim;
    out[i] = table[ids[t] * p.dim + c];
}
