// Cooperative-matrix product (NVIDIA tensor cores, Apple simdgroup matrices, VK_KHR_cooperative_matrix)
// through wgpu's experimental `wgpu_cooperative_matrix`: C (f32) = A (f16) · B (f16), all
// row-major, M, N and K multiples of 16. One subgroup of 32 lanes per 16×16 tile of C, walking K in
// steps of 16 with f32 accumulation. A probe for now (`portalora bench coop`): it tells whether an
// adapter compiles and runs it, and how fast, before the training path uses it.
enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f16>;
@group(0) @binding(2) var<storage, read> b: array<f16>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

@compute @workgroup_size(32)
fn matmul_coop_forward(@builtin(workgroup_id) wg: vec3<u32>) {
    let row0 = wg.y * 16u;
    let col0 = wg.x * 16u;
    var acc = coop_mat16x16<f32, C>();
    for (var k = 0u; k < p.k; k += 16u) {
        let ta = coopLoadT<coop_mat16x16<f16, A>>(&a[row0 * p.k + k], p.k);
        let tb = coopLoadT<coop_mat16x16<f16, B>>(&b[k * p.n + col0], p.n);
        acc = coopMultiplyAdd(ta, tb, acc);
    }
    // Everything the store uses is named first: naga 30's SPIR-V writer does not emit the
    // operands of a cooperative store itself (it panics: "Expression [..] is not cached").
    let result = acc;
    let ldc = p.n;
    let at = row0 * ldc + col0;
    coopStoreT(result, &c[at], ldc);
}
