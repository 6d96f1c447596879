// embed: token embedding lookup, f32.
//
// embed_forward: out[t, :] = table[ids[t] − first, :] for the ids in [first, last); rows of
// other ids are left alone. A table larger than one storage binding is stored as parts of
// consecutive rows, one dispatch per part, and every id falls in exactly one part.
// One invocation per output element. Ids are checked against the vocabulary on the host.

struct Params {
    tokens: u32,
    dim: u32,
    gx: u32,
    first: u32,
    last: u32,
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
    let id = ids[t];
    if (id >= p.first && id < p.last) {
        out[i] = table[(id - p.first) * p.dim + c];
    }
}
