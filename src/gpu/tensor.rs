//! GPU tensors: a shape and a dtype over a region of a buffer, with upload and readback.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};

use super::context::Context;
use super::{GpuError, Result};

/// Element types stored on the GPU.
///
/// The block-quantized types hold GGUF's blocks of consecutive elements of a row (see
/// `ops::quant`). Q8_0, Q4_0 and Q4_1 (blocks of 32) are split into two parts so that every
/// load is 4-byte aligned: first the packed quants of all blocks, then their scales. The others
/// keep GGUF's bytes as they are, read byte-wise: Q5_0 and Q5_1 in blocks of 32, the K-quants in
/// super-blocks of 256. Bytes per block are GGUF's.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    /// IEEE half floats, two per 32-bit word (element 2i in the low half).
    F16,
    U32,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl DType {
    /// Bytes per element of the unquantized types (quantized ones: see [`DType::bytes`]).
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 => 2,
            _ => 1,
        }
    }
    /// Whether elements come in blocks with scales.
    pub fn is_block_quantized(self) -> bool {
        self.block() > 1
    }
    /// (elements, bytes) of one block: GGUF's.
    fn block_layout(self) -> (usize, usize) {
        match self {
            DType::F32 | DType::U32 => (1, 4),
            DType::F16 => (1, 2),
            DType::Q8_0 => (32, 34),
            DType::Q4_0 => (32, 18),
            DType::Q4_1 => (32, 20),
            DType::Q5_0 => (32, 22),
            DType::Q5_1 => (32, 24),
            DType::Q2_K => (256, 84),
            DType::Q3_K => (256, 110),
            DType::Q4_K => (256, 144),
            DType::Q5_K => (256, 176),
            DType::Q6_K => (256, 210),
        }
    }
    /// Elements per block (1 for the unquantized types).
    pub fn block(self) -> usize {
        self.block_layout().0
    }
    /// Bytes of one block as GGUF stores it.
    pub fn block_bytes(self) -> usize {
        self.block_layout().1
    }
    /// 32-bit words of packed quants before the scales begin, for `numel` elements (the types
    /// kept as GGUF's bytes have no separate scales: all their words).
    pub fn quant_words(self, numel: usize) -> usize {
        let blocks = numel / 32;
        match self {
            DType::Q8_0 => blocks * 8,
            DType::Q4_0 | DType::Q4_1 => blocks * 4,
            DType::F16 => numel.div_ceil(2),
            DType::F32 | DType::U32 => numel,
            _ => self.bytes(numel) / 4,
        }
    }
    /// Bytes that `numel` elements take on the GPU (packed types: rounded up to whole words).
    pub fn bytes(self, numel: usize) -> usize {
        match self {
            DType::F16 => (numel * 2).next_multiple_of(4),
            DType::F32 | DType::U32 => numel * 4,
            _ => (numel / self.block() * self.block_bytes()).next_multiple_of(4),
        }
    }
}

/// A GPU buffer, counted in its context's live bytes while it exists.
pub(super) struct GpuMemory {
    buffer: wgpu::Buffer,
    _ticket: super::context::AllocTicket,
}

impl std::fmt::Debug for GpuMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.buffer)
    }
}

/// Where a tensor's bytes live.
#[derive(Clone, Debug)]
enum Backing {
    Gpu(Arc<GpuMemory>),
    /// Nowhere yet: a stand-in that a memory plan's trace records (see [`super::plan`]); only a
    /// [`super::Step::trace`] accepts it.
    StandIn(u64),
}

/// Ids of buffers and tenants, unique in the process.
fn fresh_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A dense row-major tensor living in (a region of) a GPU buffer. Cloning shares the buffer.
#[derive(Clone, Debug)]
pub struct Tensor {
    backing: Backing,
    /// Which tensor this is, as the memory planner sees it: views of it (rows, columns,
    /// reshapes) keep it; the planner's tensors sharing one buffer each have their own.
    tenant: u64,
    /// Byte offset of element 0 in `buffer`; a multiple of the storage offset alignment.
    offset: u64,
    shape: Vec<usize>,
    dtype: DType,
    label: Arc<str>,
    /// Elements from one row to the next for a 2-D column view ([`Tensor::cols`]); `None` for a
    /// contiguous tensor. Only ops that say so accept strided views (matmul); the others, and
    /// uploads and readbacks, refuse them.
    row_stride: Option<usize>,
}

impl Tensor {
    /// Elements from one row to the next (the last dimension when contiguous).
    pub fn row_stride(&self) -> usize {
        self.row_stride.unwrap_or_else(|| *self.shape.last().unwrap_or(&1))
    }
    pub fn is_contiguous(&self) -> bool {
        self.row_stride.is_none()
    }
    /// Packed tensors (F16 pairs, quantized blocks with their scales after) have no views.
    fn check_unpacked(&self, op: &'static str) -> Result<()> {
        if matches!(self.dtype, DType::F16) || self.dtype.is_block_quantized() {
            return Err(GpuError::Shape {
                op,
                message: format!("tensor {:?} is stored packed as {:?}; views need f32 or u32", self.label, self.dtype),
            });
        }
        Ok(())
    }

    /// Columns `start..start + count` of a contiguous 2-D tensor, as a strided view sharing the
    /// memory. The byte offset of column `start` must meet `alignment`.
    pub fn cols(&self, start: usize, count: usize, alignment: u32) -> Result<Tensor> {
        let [rows, width] = self.shape[..] else {
            return Err(GpuError::Shape {
                op: "cols",
                message: format!("tensor {:?} {:?} is not 2-D", self.label, self.shape),
            });
        };
        self.check_unpacked("cols")?;
        let offset = self.offset + (start * self.dtype.size()) as u64;
        if !self.is_contiguous() || start + count > width || count == 0 || !offset.is_multiple_of(alignment as u64) {
            return Err(GpuError::Shape {
                op: "cols",
                message: format!(
                    "columns {start}..{} of tensor {:?} {:?}: out of range, already strided, or not {alignment}-byte aligned",
                    start + count,
                    self.label,
                    self.shape
                ),
            });
        }
        Ok(Tensor { offset, shape: vec![rows, count], row_stride: Some(width), ..self.clone() })
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn label(&self) -> &str {
        &self.label
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes from the first element to one past the last (gaps between strided rows included).
    pub fn byte_len(&self) -> u64 {
        let elems = match (self.row_stride, &self.shape[..]) {
            (Some(stride), &[rows, cols]) if rows > 0 => (rows - 1) * stride + cols,
            _ => self.numel(),
        };
        self.dtype.bytes(elems) as u64
    }
    pub(super) fn buffer(&self) -> Result<&wgpu::Buffer> {
        match &self.backing {
            Backing::Gpu(m) => Ok(&m.buffer),
            Backing::StandIn(_) => Err(GpuError::Shape {
                op: "bind",
                message: format!("tensor {:?} stands in for a memory plan's trace and has no memory", self.label),
            }),
        }
    }
    /// The memory behind this tensor (none for a stand-in): a recorded step holds it, so that
    /// the memory stays counted and its identity ([`Tensor::memory_key`]) is not reused while a
    /// step can still run on it.
    pub(super) fn memory(&self) -> Option<Arc<GpuMemory>> {
        match &self.backing {
            Backing::Gpu(m) => Some(m.clone()),
            Backing::StandIn(_) => None,
        }
    }
    /// The buffer's identity (stand-ins have their own, with the top bit set).
    pub(super) fn memory_key(&self) -> u64 {
        match &self.backing {
            Backing::Gpu(b) => Arc::as_ptr(b) as usize as u64,
            Backing::StandIn(id) => id | 1 << 63,
        }
    }
    /// The planner's identity of this tensor (shared by its views).
    pub fn tenant(&self) -> u64 {
        self.tenant
    }
    /// A whole contiguous tensor over `backing`, a tenant of its own.
    fn whole(backing: Backing, label: &str, shape: &[usize], dtype: DType) -> Tensor {
        let (shape, label) = (shape.to_vec(), label.into());
        Tensor { backing, tenant: fresh_id(), offset: 0, shape, dtype, label, row_stride: None }
    }
    /// A tensor with no memory for a memory plan's trace.
    pub(super) fn stand_in(label: &str, shape: &[usize], dtype: DType) -> Tensor {
        Tensor::whole(Backing::StandIn(fresh_id()), label, shape, dtype)
    }
    pub(super) fn byte_offset(&self) -> u64 {
        self.offset
    }
    /// Whether two tensors share any byte of GPU memory (the same buffer, overlapping ranges).
    pub fn overlaps(&self, other: &Tensor) -> bool {
        self.memory_key() == other.memory_key()
            && self.offset < other.offset + other.byte_len()
            && other.offset < self.offset + self.byte_len()
    }
    /// Rows `start..start + count` of a tensor viewed as (rows, row_len), as a tensor of shape
    /// `(count, row_len)` sharing the memory (a 1-D tensor's rows are its elements, and the
    /// view stays 1-D). The byte offset must meet the device's storage
    /// offset alignment (256 almost everywhere): choose `start` accordingly.
    pub fn rows(&self, start: usize, count: usize, alignment: u32) -> Result<Tensor> {
        self.check_unpacked("rows")?;
        if !self.is_contiguous() {
            return Err(GpuError::Shape { op: "rows", message: format!("tensor {:?} is a strided view", self.label) });
        }
        let row_len = if self.shape.len() < 2 { 1 } else { *self.shape.last().unwrap_or(&1) };
        let total = self.numel() / row_len.max(1);
        let offset = self.offset + (start * row_len * self.dtype.size()) as u64;
        if start + count > total || !offset.is_multiple_of(alignment as u64) {
            return Err(GpuError::Shape {
                op: "rows",
                message: format!(
                    "rows {start}..{} of tensor {:?} {:?}: out of range or not {alignment}-byte aligned",
                    start + count,
                    self.label,
                    self.shape
                ),
            });
        }
        let shape = if self.shape.len() < 2 { vec![count] } else { vec![count, row_len] };
        Ok(Tensor { offset, shape, ..self.clone() })
    }

    /// A contiguous tensor of `shape` over the first bytes of this tensor's buffer: how the
    /// memory planner ([`super::plan`]) lets tensors that are never live together share memory.
    pub(super) fn view(&self, label: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = dtype.bytes(shape.iter().product()) as u64;
        if self.offset != 0 || bytes > self.buffer()?.size() {
            return Err(GpuError::Shape {
                op: "view",
                message: format!("{label:?} {shape:?} ({bytes} bytes) does not fit buffer {:?}", self.label),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            label: label.into(),
            row_stride: None,
            tenant: fresh_id(),
            ..self.clone()
        })
    }

    /// The same memory seen with another shape of the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() || !self.is_contiguous() {
            return Err(GpuError::Shape {
                op: "reshape",
                message: format!("tensor {:?} of shape {:?} cannot be viewed as {shape:?}", self.label, self.shape),
            });
        }
        Ok(Tensor { shape: shape.to_vec(), ..self.clone() })
    }
}

impl Context {
    /// Allocates a zero-filled tensor.
    pub fn tensor(&self, label: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        let bytes = dtype.bytes(numel) as u64;
        if bytes > self.limits().max_buffer {
            return Err(GpuError::TooLarge {
                label: label.into(),
                bytes,
                limit: self.limits().max_buffer,
                what: "buffer size",
            });
        }
        // Buffers are padded to 16 bytes so that a kernel may view them as vec4 arrays.
        let size = bytes.max(4).next_multiple_of(16);
        let buffer = self.scoped(&format!("allocating tensor {label:?} ({bytes} bytes)"), || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        let memory = GpuMemory { buffer, _ticket: self.count_alloc(size) };
        // (On wasm, wgpu's handles are neither Send nor Sync; the Arc only shares them.)
        #[allow(clippy::arc_with_non_send_sync)]
        let backing = Backing::Gpu(Arc::new(memory));
        Ok(Tensor::whole(backing, label, shape, dtype))
    }

    /// Allocates a tensor of `dtype` (F16 or block-quantized) over the packed 32-bit `words`
    /// that `ops::quant` laid out.
    pub fn upload_packed(&self, label: &str, dtype: DType, shape: &[usize], words: &[u32]) -> Result<Tensor> {
        let t = self.tensor(label, shape, dtype)?;
        let bytes: &[u8] = bytemuck::cast_slice(words);
        if bytes.len() as u64 > t.buffer()?.size() {
            return Err(GpuError::Shape {
                op: "upload_packed",
                message: format!("{} bytes for tensor {label:?} {dtype:?} {shape:?}", bytes.len()),
            });
        }
        self.queue.write_buffer(t.buffer()?, 0, bytes);
        self.check(&format!("uploading tensor {label:?}"))?;
        Ok(t)
    }

    /// Allocates a tensor and fills it with `data` (row-major).
    pub fn upload_f32(&self, label: &str, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let t = self.tensor(label, shape, DType::F32)?;
        self.write_f32(&t, data)?;
        Ok(t)
    }

    /// Overwrites a tensor's contents. The write is ordered before any later submission.
    pub fn write_f32(&self, t: &Tensor, data: &[f32]) -> Result<()> {
        if t.dtype != DType::F32 || data.len() != t.numel() || !t.is_contiguous() {
            return Err(GpuError::Shape {
                op: "write_f32",
                message: format!(
                    "tensor {:?} is {:?} {:?} ({} elements) but {} f32 values were given",
                    t.label,
                    t.dtype,
                    t.shape,
                    t.numel(),
                    data.len()
                ),
            });
        }
        if !data.is_empty() {
            self.queue.write_buffer(t.buffer()?, t.offset, bytemuck::cast_slice(data));
        }
        self.check(&format!("writing tensor {:?}", t.label))
    }

    /// Allocates a u32 tensor (token ids, targets) and fills it.
    pub fn upload_u32(&self, label: &str, shape: &[usize], data: &[u32]) -> Result<Tensor> {
        let t = self.tensor(label, shape, DType::U32)?;
        self.write_u32(&t, data)?;
        Ok(t)
    }

    /// Overwrites a u32 tensor's contents.
    pub fn write_u32(&self, t: &Tensor, data: &[u32]) -> Result<()> {
        if t.dtype != DType::U32 || data.len() != t.numel() || !t.is_contiguous() {
            return Err(GpuError::Shape {
                op: "write_u32",
                message: format!(
                    "tensor {:?} is {:?} {:?} but {} u32 values were given",
                    t.label,
                    t.dtype,
                    t.shape,
                    data.len()
                ),
            });
        }
        if !data.is_empty() {
            self.queue.write_buffer(t.buffer()?, t.offset, bytemuck::cast_slice(data));
        }
        self.check(&format!("writing tensor {:?}", t.label))
    }

    /// Fills an f32 tensor with one value (tests poison outputs with NaN this way).
    pub fn fill_f32(&self, t: &Tensor, value: f32) -> Result<()> {
        self.write_f32(t, &vec![value; t.numel()])
    }

    /// Starts copying a tensor back to the CPU and returns at once. Work submitted afterwards
    /// is not held up; await (or [`Readback::wait`]) the result when it is needed.
    pub fn read(&self, t: &Tensor) -> Result<Readback> {
        if !t.is_contiguous() {
            return Err(GpuError::Readback {
                label: t.label.to_string(),
                message: "strided views cannot be read back".into(),
            });
        }
        let bytes = t.byte_len().max(4).next_multiple_of(4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("readback") });
        enc.copy_buffer_to_buffer(t.buffer()?, t.offset, &staging, 0, bytes);
        let submission = self.queue.submit([enc.finish()]);
        let state: Arc<Mutex<MapState>> = Arc::default();
        let cb_state = state.clone();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let mut s = cb_state.lock().unwrap_or_else(|p| p.into_inner());
            s.result = Some(r);
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        });
        self.check(&format!("reading tensor {:?}", t.label))?;
        Ok(Readback {
            staging,
            state,
            device: self.device.clone(),
            submission,
            label: t.label.to_string(),
            len: t.byte_len() as usize,
            dtype: t.dtype,
        })
    }

    /// Reads an f32 tensor back (native: blocks until the copy is done).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        self.read(t)?.wait()
    }
}

#[derive(Default)]
struct MapState {
    result: Option<std::result::Result<(), wgpu::BufferAsyncError>>,
    waker: Option<Waker>,
}

/// A copy of a tensor on its way to the CPU.
pub struct Readback {
    staging: wgpu::Buffer,
    state: Arc<Mutex<MapState>>,
    // Native waits on the submission with `device.poll`; browsers drive mapping themselves.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    device: wgpu::Device,
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    submission: wgpu::SubmissionIndex,
    label: String,
    len: usize,
    dtype: DType,
}

impl Readback {
    fn finish(&self) -> Result<Vec<f32>> {
        let data = {
            let view = self
                .staging
                .slice(..)
                .get_mapped_range()
                .map_err(|source| GpuError::MapRange { label: self.label.clone(), source })?;
            if self.dtype != DType::F32 {
                let message = format!("only f32 tensors can be read back, this one is {:?}", self.dtype);
                return Err(GpuError::Readback { label: self.label.clone(), message });
            }
            bytemuck::pod_collect_to_vec::<u8, f32>(&view[..self.len])
        };
        self.staging.unmap();
        Ok(data)
    }

    /// Blocks until the data is on the CPU (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn wait(self) -> Result<Vec<f32>> {
        self.device
            .poll(wgpu::PollType::Wait { submission_index: Some(self.submission.clone()), timeout: None })
            .map_err(|source| GpuError::Poll { source })?;
        let r = self.state.lock().unwrap_or_else(|p| p.into_inner()).result.take();
        match r {
            Some(Ok(())) => self.finish(),
            Some(Err(source)) => Err(GpuError::Map { label: self.label.clone(), source }),
            None => Err(GpuError::Readback { label: self.label.clone(), message: "the map callback never ran".into() }),
        }
    }
}

/// Awaiting a readback works on every platform; natively its poll waits for the GPU.
impl Future for Readback {
    type Output = Result<Vec<f32>>;
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        // Natively nothing else would drive the device: wait for the submission right here (a
        // GPU readback is a wait in any case), so that `block_on` never spins.
        #[cfg(not(target_arch = "wasm32"))]
        if let Err(e) =
            self.device.poll(wgpu::PollType::Wait { submission_index: Some(self.submission.clone()), timeout: None })
        {
            return Poll::Ready(Err(GpuError::Poll { source: e }));
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.result.take() {
            Some(Ok(())) => {
                drop(s);
                Poll::Ready(self.finish())
            }
            Some(Err(source)) => Poll::Ready(Err(GpuError::Map { label: self.label.clone(), source })),
            None => {
                s.waker = Some(cx.waker().clone());
                #[cfg(not(target_arch = "wasm32"))]
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}
