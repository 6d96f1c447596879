// xent: cross-entropy of logits against target ids, f32.
//
// xent_forward: for each row r of logits (rows, vocab):
//   lse[r] = log(sum_j exp(logits[r, j])), loss[r] = lse[r] − logits[r, targets[r]],
//   or loss[r] = 0 when targets[r] is IGNORE (0xffffffff: positions that predict nothing).
// One workgroup of 256 per row; max and sum reduced with fixed trees (deterministic).
// xent_backward: the gradient of scale · sum_r loss[r] with respect to the logits, written over
// the logits in place (they are not needed afterwards):
//   dlogits[r, j] = scale · (exp(logits[r, j] − lse[r]) − [j = targets[r]]), 0 for ignored rows.
//   scale is read from a one-element tensor (1 / the batch's predicted positions, which the host
//   writes with the batch), so a recorded step serves batches with any number of masked targets.
//   With a final soft-cap (Gemma 2's logits = cap · tanh(raw / cap), applied in place before
//   xent_forward by elementwise's softcap_forward), the gradient is carried through it to the raw
//   logits: times 1 − (logits / cap)².

struct Params {
    rows: u32,
    vocab: u32,
    gx: u32,
    softcap: f32,  // xent_backward: the logits' soft-cap (0: none)
}

const IGNORE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;      // (rows, vocab)
@group(0) @binding(2) var<storage, read> targets: array<u32>;    // (rows,)
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;  // (rows,)
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;   // (rows,)

var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256, 1, 1)
fn xent_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let row = wg.y * p.gx + wg.x;
    let valid = row < p.rows;
    let base = row * p.vocab;
    var m = -3.0e38;
    if (valid) {
        for (var j = t; j < p.vocab; j += 256u) { m = max(m, logits[base + j]); }
    }
    red[t] = m;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w /= 2u) {
        if (t < w) { red[t] = max(red[t], red[t + w]); }
        workgroupBarrier();
    }
    let row_max = red[0];
    workgroupBarrier();
    var s = 0.0;
    if (valid) {
        for (var j = t; j < p.vocab; j += 256u) { s += exp(logits[base + j] - row_max); }
    }
    red[t] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w /= 2u) {
        if (t < w) { red[t] = red[t] + red[t + w]; }
        workgroupBarrier();
    }
    if (t == 0u && valid) {
        let l = row_max + log(red[0]);
        lse[row] = l;
        let tg = targets[row];
        if (tg == IGNORE) {
            loss[row] = 0.0;
        } else {
            loss[row] = l - logits[base + tg];
        }
    }
}

@group(0) @binding(1) var<storage, read_write> dlogits: array<f32>;  // (rows, vocab): logits in, gradient out
@group(0) @binding(2) var<storage, read> btargets: array<u32>;       // (rows,)
@group(0) @binding(3) var<storage, read> blse: array<f32>;           // (rows,)
@group(0) @binding(4) var<storage, read> bscale: array<f32>;         // (1,)

@compute @workgroup_size(256, 1, 1)
fn xent_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let row = wg.y * p.gx + wg.x;
    if (row >= p.rows) { return; }
    let base = row * p.vocab;
    let tg = btargets[row];
    let l = blse[row];
    let scale = bscale[0];
    for (var j = t; j < p.vocab; j += 256u) {
                var g = 0.0;
        let x = dlogits[base + j];
        if (tg != IGNORE) {
            g = exp(x - l);
            if (j == tg) { g -= 1.0; }
            g *= scale;
            if (p.softcap > 0.0) { g *= 1.0 - (x / p.softcap) * (x / p.softcap); }
        }
        dlogits[base + j] = g;
    }
}
