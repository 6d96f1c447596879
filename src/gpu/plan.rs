//! A lifetime-based buffer planner: tensors that are never live at the same time share one GPU
//! buffer.
//!
//! A recorded step visits its tensors in a fixed order, so each tensor's *lifetime* is known
//! before anything runs: the first and last *phase* (a span of the step, e.g. one layer's forward
//! pass) that touches it. Two tensors whose lifetimes do not overlap can live in the same memory.
//!
//! Sharing is by whole buffer: each request becomes a view of the start of one buffer, and the
//! tensors of a buffer have pairwise disjoint lifetimes. (Packing several live tensors into one
//! buffer at offsets would save more, but WebGPU forbids a dispatch from binding one buffer both
//! read-only and writable, which every kernel reading one planned tensor and writing another
//! would do.) Lifetimes are closed intervals of phases: a tensor last read in phase p and one
//! first written in phase p never share, so a dispatch never reads and writes the same buffer
//! through two different tensors.
//!
//! Assignment is greedy by size (largest first; each request takes the smallest existing buffer
//! whose tensors are all dead during its lifetime, or a new buffer): simple, deterministic, never
//! worse than one buffer per tensor, and on a layered step it finds the sharing that matters (a
//! role's per-layer tensors in one buffer, gradients alternating between two).

use super::{Context, DType, GpuError, Tensor};

/// Phases `first..=last` of a step during which a tensor holds a value someone will read.
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
    life: Lifetime,
}

/// Collects tensor requests with their lifetimes, then allocates shared buffers for them.
#[derive(Default)]
pub struct Planner {
    requests: Vec<Request>,
}

/// The planner's result: one tensor per request, in request order.
pub struct Planned {
    tensors: Vec<Tensor>,
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
}

impl Planner {
    pub fn new() -> Self {
        Planner::default()
    }

    /// Requests a tensor live during `life`; returns its id for [`Planned::get`].
    pub fn add(&mut self, label: &str, shape: &[usize], dtype: DType, life: Lifetime) -> usize {
        self.requests.push(Request { label: label.into(), shape: shape.to_vec(), dtype, life });
        self.requests.len() - 1
    }

    /// Allocates the buffers (zero-filled) and returns every request's tensor.
    pub fn allocate(self, ctx: &Context) -> Result<Planned, GpuError> {
        let sizes: Vec<u64> = self.requests.iter().map(|r| r.dtype.bytes(r.shape.iter().product()) as u64).collect();
        let lives: Vec<Lifetime> = self.requests.iter().map(|r| r.life).collect();
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
            buffers: buffers.len(),
            bytes: buffer_sizes.iter().sum(),
            unshared_bytes: sizes.iter().sum(),
        })
    }
}

/// Assigns each request (size, lifetime) to a buffer: returns the buffer of every request and
/// every buffer's size. Buffers hold only requests with pairwise disjoint lifetimes, and each is
/// as large as its largest request.
pub fn assign(sizes: &[u64], lives: &[Lifetime]) -> (Vec<usize>, Vec<u64>) {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    // Largest first; ties by first phase, then request order, so the plan is deterministic.
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(lives[a].first.cmp(&lives[b].first)).then(a.cmp(&b)));
    let mut buffer_of = vec![0; sizes.len()];
    let mut buffer_sizes: Vec<u64> = Vec::new();
    let mut members: Vec<Vec<Lifetime>> = Vec::new();
    for i in order {
        // Every existing buffer is at least this large (largest first): take the smallest free one.
        let free = (0..buffer_sizes.len())
            .filter(|&b| members[b].iter().all(|l| !l.overlaps(lives[i])))
            .min_by_key(|&b| (buffer_sizes[b], b));
        let b = match free {
            Some(b) => b,
            None => {
                buffer_sizes.push(sizes[i]);
                members.push(Vec::new());
                buffer_sizes.len() - 1
            }
        };
        members[b].push(lives[i]);
        buffer_of[i] = b;
    }
    (buffer_of, buffer_sizes)
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
            let lives: Vec<Lifetime> = (0..n)
                .map(|_| {
                    let a = (lcg(&mut seed) % 20) as usize;
                    Lifetime::new(a, a + (lcg(&mut seed) % 6) as usize)
                })
                .collect();
            let (of, bufs) = assign(&sizes, &lives);
            for i in 0..n {
                assert!(sizes[i] <= bufs[of[i]], "case {case}: request {i} does not fit its buffer");
                for j in 0..i {
                    if of[i] == of[j] {
                        assert!(!lives[i].overlaps(lives[j]), "case {case}: {i} and {j} share while both live");
                    }
                }
            }
            let total: u64 = bufs.iter().sum();
            assert!(total <= sizes.iter().sum::<u64>(), "case {case}: sharing never costs more");
            // A lower bound: at the busiest phase, everything live needs its own memory.
            let busiest = (0..30)
                .map(|p| (0..n).filter(|&i| lives[i].first <= p && p <= lives[i].last).map(|i| sizes[i]).sum::<u64>())
                .max()
                .unwrap();
            assert!(total >= busiest, "case {case}: below the live peak");
        }
    }

    #[test]
    fn a_layered_step_reuses_buffers() {
        // Ten layers' gradients, each live from its layer's backward phase into the next one:
        // two buffers alternate.
        let lives: Vec<Lifetime> = (0..10).map(|l| Lifetime::new(l, l + 1)).collect();
        let (of, bufs) = assign(&[64; 10], &lives);
        assert_eq!(bufs.len(), 2);
        assert!(of.iter().enumerate().all(|(l, &b)| b == l % 2));
        // A large short-lived tensor hosts later small ones.
        let (of, bufs) = assign(&[1000, 10, 10], &[Lifetime::new(0, 0), Lifetime::new(1, 2), Lifetime::new(1, 2)]);
        assert_eq!(bufs, vec![1000, 10]);
        assert_eq!(of[0], of[1]);
    }
}
