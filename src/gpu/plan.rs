//! A lifetime-based buffer planner: tensors that are never live at the same time share one GPU
//! buffer, and a checker that walks recorded steps for reads of overwritten memory.
//!
//! Lifetimes are not declared: they come from the steps themselves. The tensors a plan will
//! hold are first *stand-ins* without memory ([`Planner::stand_ins`]); the program records every
//! step that will use them as a [`Step::trace`], which keeps each dispatch's bindings and
//! nothing else; a tensor's *lifetime* in a step is then the span of dispatches from the first
//! that binds it to the last. Steps run one at a time (a training step, an evaluation), so a
//! tensor has one span per step that uses it, and two tensors may share memory when none of
//! their spans overlap. A tensor read after its step ends (a test's logits, kept gradients) is
//! an *output*, whose span runs to the end of that step.
//!
//! Sharing is by whole buffer: each request becomes a view of the start of one buffer, and the
//! tensors of a buffer have pairwise disjoint lifetimes. (Packing several live tensors into one
//! buffer at offsets would save more, but WebGPU forbids a dispatch from binding one buffer both
//! read-only and writable, which every kernel reading one planned tensor and writing another
//! would do.) Spans are closed intervals of dispatches: a tensor last read by dispatch d and one
//! first written by dispatch d never share, so no dispatch binds one buffer twice.
//!
//! Assignment is greedy by size (largest first; each request takes the smallest existing buffer
//! whose tensors are all dead during its lifetime, or a new buffer): simple, deterministic, never
//! worse than one buffer per tensor, and on a layered step it finds the sharing that matters (a
//! role's per-layer tensors in one buffer, gradients alternating between two).

use std::collections::{HashMap, HashSet};

use super::step::Access;
use super::{Context, DType, GpuError, Step, Tensor};

/// Dispatches `first..=last` during which a tensor holds a value someone will read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub first: usize,
    pub last: usize,
}

impl Lifetime {
    pub fn new(first: usize, last: usize) -> Self {
        Lifetime { first: first.min(last), last: first.max(last) }
    }
    fn overlaps(self, o: Lifetime) -> bool {
        self.first <= o.last && o.first <= self.last
    }
}

struct Request {
    label: String,
    shape: Vec<usize>,
    dtype: DType,
}

/// Collects tensor requests, hands out stand-ins for tracing the steps, then allocates shared
/// buffers for the lifetimes the traces show.
#[derive(Default)]
pub struct Planner {
    requests: Vec<Request>,
    /// The stand-ins' tenants, in request order (see [`Planner::stand_ins`]).
    tenants: Vec<u64>,
}

/// The planner's result: one tensor per request, in request order.
pub struct Planned {
    tensors: Vec<Tensor>,
    /// Each request's spans, in the dispatch numbering of the traces laid end to end.
    lives: Vec<Vec<Lifetime>>,
    /// Where each trace begins in that numbering.
    starts: Vec<usize>,
    /// Buffers allocated.
    pub buffers: usize,
    /// Bytes of the buffers allocated.
    pub bytes: u64,
    /// Bytes one buffer per request would have taken.
    pub unshared_bytes: u64,
}

impl Planned {
    /// The tensor of request `id` (as [`Planner::add`] returned it).
    pub fn get(&self, id: usize) -> Tensor {
        self.tensors[id].clone()
    }

    /// Bytes of the requests that trace `trace` keeps across its dispatch `at`: written before
    /// it and read at or after it (what a training step keeps from its forward pass for its
    /// backward pass, with `at` where the backward pass begins).
    pub fn bytes_live_across(&self, trace: usize, at: usize) -> u64 {
        let at = self.starts[trace] + at;
        let kept = |spans: &Vec<Lifetime>| spans.iter().any(|l| l.first < at && at <= l.last);
        self.lives.iter().zip(&self.tensors).filter(|(l, _)| kept(l)).map(|(_, t)| t.byte_len()).sum()
    }
}

impl Planner {
    pub fn new() -> Self {
        Planner::default()
    }

    /// Requests a tensor; returns its id for [`Planned::get`].
    pub fn add(&mut self, label: &str, shape: &[usize], dtype: DType) -> usize {
        self.requests.push(Request { label: label.into(), shape: shape.to_vec(), dtype });
        self.requests.len() - 1
    }

    /// The label and shape of request `id`.
    pub fn request(&self, id: usize) -> (&str, &[usize]) {
        let r = &self.requests[id];
        (&r.label, &r.shape)
    }

    /// The requests that `trace` (recorded over the latest [`Planner::stand_ins`]) binds both
    /// before its dispatch `at` and at or after it: what a training step keeps from its forward
    /// pass for its backward pass, with `at` where the backward pass begins.
    pub fn live_across(&self, trace: &Step, at: usize) -> HashSet<usize> {
        let of: HashMap<u64, usize> = self.tenants.iter().enumerate().map(|(i, &t)| (t, i)).collect();
        let (mut before, mut after) = (HashSet::new(), HashSet::new());
        for (d, (_, accesses)) in trace.accesses().enumerate() {
            let side = if d < at { &mut before } else { &mut after };
            side.extend(accesses.iter().filter_map(|a| of.get(&a.tenant).copied()));
        }
        before.intersection(&after).copied().collect()
    }

    /// One tensor without memory per request, in request order, for recording the traces that
    /// [`Planner::allocate`] reads. Requests larger than one buffer of `ctx` are refused here,
    /// naming the largest, before anything is recorded.
    pub fn stand_ins(&mut self, ctx: &Context) -> Result<Vec<Tensor>> {
        let limit = ctx.limits().max_buffer;
        if let Some((r, bytes)) = self
            .requests
            .iter()
            .map(|r| (r, r.dtype.bytes(r.shape.iter().product()) as u64))
            .filter(|(_, bytes)| *bytes > limit)
            .reduce(|best, r| if r.1 > best.1 { r } else { best })
        {
            return Err(GpuError::TooLarge { label: r.label.clone(), bytes, limit, what: "buffer size" });
        }
        let t: Vec<Tensor> = self.requests.iter().map(|r| Tensor::stand_in(&r.label, &r.shape, r.dtype)).collect();
        self.tenants = t.iter().map(Tensor::tenant).collect();
        Ok(t)
    }

    /// Allocates the buffers (zero-filled) for the lifetimes that `traces` (each recorded with
    /// the stand-ins, one per step that will run) show, and returns every request's tensor.
    /// `outputs` lists `(trace, request)` pairs read after that trace's step ends.
    pub fn allocate(self, ctx: &Context, traces: &[&Step], outputs: &[(usize, usize)]) -> Result<Planned, GpuError> {
        let (lives, starts) = self.lifetimes(traces, outputs)?;
        let sizes: Vec<u64> = self.requests.iter().map(|r| r.dtype.bytes(r.shape.iter().product()) as u64).collect();
        let (buffer_of, buffer_sizes) = assign(&sizes, &lives);
        // The largest request of each buffer names it (and sets its size).
        let mut owners = vec![usize::MAX; buffer_sizes.len()];
        for (i, &b) in buffer_of.iter().enumerate() {
            if owners[b] == usize::MAX || sizes[i] > sizes[owners[b]] {
                owners[b] = i;
            }
        }
        let mut buffers = Vec::with_capacity(owners.len());
        for &o in &owners {
            let r = &self.requests[o];
            buffers.push(ctx.tensor(&r.label, &r.shape, r.dtype)?);
        }
        let tensors = self
            .requests
            .iter()
            .zip(&buffer_of)
            .map(|(r, &b)| buffers[b].view(&r.label, &r.shape, r.dtype))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Planned {
            tensors,
            lives,
            starts,
            buffers: buffers.len(),
            bytes: buffer_sizes.iter().sum(),
            unshared_bytes: sizes.iter().sum(),
        })
    }

    /// Each request's spans in the traces laid end to end, and where each trace starts.
    fn lifetimes(&self, traces: &[&Step], outputs: &[(usize, usize)]) -> Result<(Vec<Vec<Lifetime>>, Vec<usize>)> {
        if self.tenants.len() != self.requests.len() {
            return Err(GpuError::Shape { op: "plan", message: "allocate needs the traces of the stand-ins".into() });
        }
        let of: HashMap<u64, usize> = self.tenants.iter().enumerate().map(|(i, &t)| (t, i)).collect();
        let mut lives = vec![Vec::new(); self.requests.len()];
        let mut starts = Vec::with_capacity(traces.len());
        let mut start = 0;
        for (k, trace) in traces.iter().enumerate() {
            if !trace.is_trace() {
                return Err(GpuError::Shape { op: "plan", message: "lifetimes come from trace steps".into() });
            }
            let mut span: HashMap<usize, Lifetime> = HashMap::new();
            for (d, (_, accesses)) in trace.accesses().enumerate() {
                for r in accesses.iter().filter_map(|a| of.get(&a.tenant)) {
                    let l = span.entry(*r).or_insert(Lifetime::new(start + d, start + d));
                    l.last = start + d;
                }
            }
            let end = start + trace.len().max(1) - 1;
            for &(_, r) in outputs.iter().filter(|(t, _)| *t == k) {
                span.entry(r).or_insert(Lifetime::new(end, end)).last = end;
            }
            for (r, l) in span {
                lives[r].push(l);
            }
            starts.push(start);
            start = end + 1;
        }
        Ok((lives, starts))
    }
}

type Result<T, E = GpuError> = std::result::Result<T, E>;

/// Assigns each request (size, lifetime spans) to a buffer: returns the buffer of every request
/// and every buffer's size. Buffers hold only requests whose spans are pairwise disjoint, and
/// each is as large as its largest request. A request with no spans is used by no step.
pub fn assign(sizes: &[u64], lives: &[Vec<Lifetime>]) -> (Vec<usize>, Vec<u64>) {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    let first = |i: usize| lives[i].iter().map(|l| l.first).min().unwrap_or(0);
    // Largest first; ties by first use, then request order, so the plan is deterministic.
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(first(a).cmp(&first(b))).then(a.cmp(&b)));
    let mut buffer_of = vec![0; sizes.len()];
    let mut buffer_sizes: Vec<u64> = Vec::new();
    let mut members: Vec<Vec<Lifetime>> = Vec::new();
    for i in order {
        // Every existing buffer is at least this large (largest first): take the smallest free one.
        let free = (0..buffer_sizes.len())
            .filter(|&b| members[b].iter().all(|l| lives[i].iter().all(|m| !l.overlaps(*m))))
            .min_by_key(|&b| (buffer_sizes[b], b));
        let b = match free {
            Some(b) => b,
            None => {
                buffer_sizes.push(sizes[i]);
                members.push(Vec::new());
                buffer_sizes.len() - 1
            }
        };
        members[b].extend(&lives[i]);
        buffer_of[i] = b;
    }
    (buffer_of, buffer_sizes)
}

/// Walks `steps` (named, in the order they run) as the GPU runs them, twice over (steps are
/// replayed), and fails on the first dispatch that reads bytes of a tensor which another tensor
/// sharing its buffer wrote since (a planner that let two live tensors share memory), or that
/// binds one buffer writable and under another tensor at once. A tensor bound writable counts
/// as read too once it was written in the same pass (kernels may accumulate into it).
pub fn check(steps: &[(&str, &Step)]) -> std::result::Result<(), String> {
    // Per buffer: disjoint byte ranges and who last wrote each, and where.
    let mut written: HashMap<u64, Vec<(u64, u64, u64, String)>> = HashMap::new();
    for pass in 0..2 {
        let mut wrote: HashSet<u64> = HashSet::new();
        for (name, step) in steps {
            for (d, (label, accesses)) in step.accesses().enumerate() {
                let at = format!("{name} dispatch {d} ({label}{})", if pass > 0 { ", replayed" } else { "" });
                check_dispatch(&at, accesses, &written, &wrote)?;
                for a in accesses.iter().filter(|a| a.write) {
                    wrote.insert(a.tenant);
                    let list = written.entry(a.memory).or_default();
                    let mut kept = Vec::with_capacity(list.len() + 2);
                    for w in list.drain(..) {
                        if w.1 <= a.start || a.end <= w.0 {
                            kept.push(w);
                            continue;
                        }
                        if w.0 < a.start {
                            kept.push((w.0, a.start, w.2, w.3.clone()));
                        }
                        if a.end < w.1 {
                            kept.push((a.end, w.1, w.2, w.3));
                        }
                    }
                    kept.push((a.start, a.end, a.tenant, format!("{:?} at {at}", a.label)));
                    *list = kept;
                }
            }
        }
    }
    Ok(())
}

fn check_dispatch(
    at: &str,
    accesses: &[Access],
    written: &HashMap<u64, Vec<(u64, u64, u64, String)>>,
    wrote: &HashSet<u64>,
) -> std::result::Result<(), String> {
    for a in accesses {
        if let Some(b) = accesses.iter().find(|b| b.tenant != a.tenant && b.memory == a.memory && (a.write || b.write))
        {
            return Err(format!(
                "{at} binds {:?} and {:?}, which share a buffer, with one of them writable",
                a.label, b.label
            ));
        }
        if a.write && !wrote.contains(&a.tenant) {
            continue;
        }
        let theirs = written.get(&a.memory).into_iter().flatten();
        if let Some(w) = theirs.into_iter().find(|w| w.2 != a.tenant && w.0 < a.end && a.start < w.1) {
            return Err(format!("{at} reads {:?}, but {}, which shares its memory, overwrote it", a.label, w.3));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (the crate's test RNG lives outside `gpu`).
    fn lcg(state: &mut u64) -> u64 {
        *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *state >> 33
    }

    #[test]
    fn no_buffer_holds_two_tensors_live_at_once_and_each_fits() {
        let mut seed = 7u64;
        for case in 0..500 {
            let n = 1 + (lcg(&mut seed) % 40) as usize;
            let sizes: Vec<u64> = (0..n).map(|_| 4 * (1 + lcg(&mut seed) % 64)).collect();
            let lives: Vec<Vec<Lifetime>> = (0..n)
                .map(|_| {
                    let a = (lcg(&mut seed) % 20) as usize;
                    vec![Lifetime::new(a, a + (lcg(&mut seed) % 6) as usize)]
                })
                .collect();
            let (of, bufs) = assign(&sizes, &lives);
            for i in 0..n {
                assert!(sizes[i] <= bufs[of[i]], "case {case}: request {i} does not fit its buffer");
                for j in 0..i {
                    if of[i] == of[j] {
                        assert!(!lives[i][0].overlaps(lives[j][0]), "case {case}: {i} and {j} share while both live");
                    }
                }
            }
            let total: u64 = bufs.iter().sum();
            assert!(total <= sizes.iter().sum::<u64>(), "case {case}: sharing never costs more");
            // A lower bound: at the busiest phase, everything live needs its own memory.
            let busiest = (0..30)
                .map(|p| {
                    (0..n).filter(|&i| lives[i][0].first <= p && p <= lives[i][0].last).map(|i| sizes[i]).sum::<u64>()
                })
                .max()
                .unwrap();
            assert!(total >= busiest, "case {case}: below the live peak");
        }
    }

    #[test]
    fn a_layered_step_reuses_buffers() {
        // Ten layers' gradients, each live from its layer's backward phase into the next one:
        // two buffers alternate.
        let lives: Vec<Vec<Lifetime>> = (0..10).map(|l| vec![Lifetime::new(l, l + 1)]).collect();
        let (of, bufs) = assign(&[64; 10], &lives);
        assert_eq!(bufs.len(), 2);
        assert!(of.iter().enumerate().all(|(l, &b)| b == l % 2));
        // A large short-lived tensor hosts later small ones.
        let one = |a, b| vec![Lifetime::new(a, b)];
        let (of, bufs) = assign(&[1000, 10, 10], &[one(0, 0), one(1, 2), one(1, 2)]);
        assert_eq!(bufs, vec![1000, 10]);
        assert_eq!(of[0], of[1]);
        // Two steps: a tensor of each may share although their spans in one numbering would not
        // allow a third that is live in both.
        let (of, bufs) = assign(&[8, 8, 8], &[one(0, 3), one(5, 9), vec![Lifetime::new(1, 1), Lifetime::new(6, 6)]]);
        assert_eq!((bufs.len(), of[0] == of[1]), (2, true));
    }
}
