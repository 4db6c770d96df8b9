//! NCCL collectives on CUDA tensors, loaded at run time.
//!
//! The library is opened with dlopen, so a binary built on a machine without CUDA runs
//! everywhere and only needs NCCL where a recipe asks for it. Search order:
//! `CATAPULT_NCCL_LIB`, then `nvidia/nccl/lib/libnccl.so.2` of the torch wheel whose
//! libtorch this process loaded (NCCL is a dependency of the wheel, not inside it), then
//! the loader path (`libnccl.so.2`, `libnccl.so`). cudarc's loader is not used: it looks
//! for `libnccl.so`, `libnccl.so.<cuda major>` and a few others, but not NCCL's soname
//! `libnccl.so.2`, which is all the torch wheel ships.
//!
//! Every operation is enqueued on the legacy default stream (the stream torch computes
//! on unless told otherwise), so it is ordered with the surrounding tensor ops. Sums are
//! deterministic as in `comm`: chunks move with grouped send/receive, each rank adds
//! its chunk's contributions in rank order, and the sums are gathered back. NCCL's own
//! reductions are never used.

use crate::comm::Comm;
use crate::error::NcclError;
use libloading::Library;
use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

type RawComm = *mut c_void;
type Stream = *mut c_void;

/// NCCL's 128-byte communicator id.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [u8; 128],
}

type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> c_int;
type CommDestroy = unsafe extern "C" fn(RawComm) -> c_int;
type Send = unsafe extern "C" fn(*const c_void, usize, c_int, c_int, RawComm, Stream) -> c_int;
type Recv = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, RawComm, Stream) -> c_int;
type Group = unsafe extern "C" fn() -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type Version = unsafe extern "C" fn(*mut c_int) -> c_int;

struct Api {
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    comm_destroy: CommDestroy,
    send: Send,
    recv: Recv,
    group_start: Group,
    group_end: Group,
    error_string: ErrorString,
    version: Version,
    /// Keeps the symbols above valid.
    _lib: Library,
}

/// Where the NCCL library may be, in the order tried.
fn candidates() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("CATAPULT_NCCL_LIB") {
        out.push(p);
    }
    // The directory of the libtorch this process mapped: .../site-packages/torch/lib.
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        if let Some(line) = maps.lines().find(|l| l.contains("libtorch_cpu.so")) {
            if let Some(path) = line.split_whitespace().last() {
                let lib = std::path::Path::new(path);
                if let Some(site) = lib
                    .parent()
                    .and_then(|d| d.parent())
                    .and_then(|d| d.parent())
                {
                    out.push(
                        site.join("nvidia/nccl/lib/libnccl.so.2")
                            .display()
                            .to_string(),
                    );
                }
            }
        }
    }
    out.push("libnccl.so.2".into());
    out.push("libnccl.so".into());
    out
}

impl Api {
    fn load() -> Result<Api, NcclError> {
        let tried = candidates();
        let lib = tried
            .iter()
            // SAFETY: loading NCCL runs its initializers, which have no preconditions.
            .find_map(|c| unsafe { Library::new(c) }.ok())
            .ok_or_else(|| NcclError::NotFound {
                tried: tried.clone(),
            })?;
        macro_rules! sym {
            ($name:literal, $ty:ty) => {
                // SAFETY: the types match NCCL's C declarations (nccl.h, 2.x).
                *unsafe { lib.get::<$ty>(concat!($name, "\0").as_bytes()) }.map_err(|e| {
                    NcclError::MissingSymbol {
                        symbol: $name,
                        reason: e.to_string(),
                    }
                })?
            };
        }
        Ok(Api {
            get_unique_id: sym!("ncclGetUniqueId", GetUniqueId),
            comm_init_rank: sym!("ncclCommInitRank", CommInitRank),
            comm_destroy: sym!("ncclCommDestroy", CommDestroy),
            send: sym!("ncclSend", Send),
            recv: sym!("ncclRecv", Recv),
            group_start: sym!("ncclGroupStart", Group),
            group_end: sym!("ncclGroupEnd", Group),
            error_string: sym!("ncclGetErrorString", ErrorString),
            version: sym!("ncclGetVersion", Version),
            _lib: lib,
        })
    }

    /// `code` as an error naming `call` and this rank (`rank` of `size`).
    fn check(
        &self,
        call: &'static str,
        code: c_int,
        rank: usize,
        size: usize,
    ) -> Result<(), NcclError> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for every result code.
        let text = unsafe { std::ffi::CStr::from_ptr((self.error_string)(code)) };
        Err(NcclError::Call {
            call,
            rank,
            size,
            code,
            message: text.to_string_lossy().into_owned(),
        })
    }
}

/// NCCL's name for a tensor kind.
fn datatype(kind: Kind) -> Result<c_int, NcclError> {
    Ok(match kind {
        Kind::Int8 => 0,
        Kind::Uint8 => 1,
        Kind::Int => 2,
        Kind::Int64 => 4,
        Kind::Half => 6,
        Kind::Float => 7,
        Kind::Double => 8,
        Kind::BFloat16 => 9,
        other => {
            return Err(NcclError::Datatype {
                kind: format!("{other:?}"),
            })
        }
    })
}

/// Whether this process can use NCCL: a CUDA device and the library.
pub fn available() -> Result<(), NcclError> {
    if !tch::Cuda::is_available() {
        return Err(NcclError::NoCuda);
    }
    Api::load().map(|_| ())
}

/// An NCCL communicator over the ranks of a host communicator, one GPU per rank.
pub struct NcclComm {
    api: Arc<Api>,
    comm: RawComm,
    rank: usize,
    size: usize,
    device: Device,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclComm({} of {}, {:?})",
            self.rank, self.size, self.device
        )
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the communicator was initialized and is destroyed once.
        unsafe {
            (self.api.comm_destroy)(self.comm);
        }
    }
}

impl NcclComm {
    /// A communicator over the ranks of `host` (a collective call there): rank 0 makes
    /// the id, `host` broadcasts it, every rank joins with its GPU `device`.
    pub fn new(host: &Comm, device: Device) -> Result<NcclComm, NcclError> {
        let Device::Cuda(index) = device else {
            return Err(NcclError::NotCuda {
                device: format!("{device:?}"),
            });
        };
        let api = Api::load()?;
        let (rank, size) = (host.rank(), host.size());
        let mut id = UniqueId { internal: [0; 128] };
        if rank == 0 {
            // SAFETY: `id` is a valid ncclUniqueId to write.
            let code = unsafe { (api.get_unique_id)(&mut id) };
            api.check("ncclGetUniqueId", code, rank, size)?;
        }
        host.broadcast(&mut id.internal, 0);
        // Make the device current on this thread the way torch does, before NCCL binds.
        let _ = Tensor::zeros([1], (Kind::Float, device));
        tch::Cuda::synchronize(index as i64);
        let mut comm: RawComm = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; every rank passes the same id.
        let code = unsafe { (api.comm_init_rank)(&mut comm, size as c_int, id, rank as c_int) };
        api.check("ncclCommInitRank", code, rank, size)?;
        Ok(NcclComm {
            api: Arc::new(api),
            comm,
            rank,
            size,
            device,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the communicator.
    pub fn size(&self) -> usize {
        self.size
    }

    /// NCCL's version code (e.g. 22703 for 2.27.3).
    pub fn version(&self) -> i32 {
        let mut v = 0;
        // SAFETY: writes one int.
        unsafe {
            (self.api.version)(&mut v);
        }
        v
    }

    /// Checks that `shape` has rows, that `send_rows` and `recv_rows` give one count per
    /// rank, and that the send counts cover the rows.
    fn check_counts(
        &self,
        shape: &[i64],
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<(), NcclError> {
        let rows = shape.first().copied();
        let problem = if rows.is_none() {
            "a 0-dimensional tensor has no rows to send; reshape it to rows x ...".to_string()
        } else if send_rows.len() != self.size || recv_rows.len() != self.size {
            format!(
                "{} send and {} receive counts for {} ranks; give one of each per rank",
                send_rows.len(),
                recv_rows.len(),
                self.size
            )
        } else if i64::try_from(send_rows.iter().sum::<usize>()).ok() != rows {
            format!(
                "the send counts add up to {} rows, but the tensor has {}",
                send_rows.iter().sum::<usize>(),
                rows.unwrap_or(0)
            )
        } else {
            return Ok(());
        };
        Err(NcclError::Counts {
            call: "all_to_all_rows",
            rank: self.rank,
            problem,
        })
    }

    /// Sends `send_rows[d]` consecutive rows of `rows` (rows x ..., on this rank's GPU)
    /// to rank d; returns what arrived, rows from rank 0 first.
    pub fn all_to_all_rows(
        &self,
        rows: &Tensor,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<Tensor, NcclError> {
        let send = rows.contiguous();
        let shape = send.size();
        self.check_counts(&shape, send_rows, recv_rows)?;
        let row: usize = shape[1..].iter().product::<i64>() as usize;
        let mut out_shape = shape.clone();
        out_shape[0] = recv_rows.iter().sum::<usize>() as i64;
        let (dt, elt) = (datatype(send.kind())?, send.kind().elt_size_in_bytes());
        let recv = Tensor::empty(out_shape.as_slice(), (send.kind(), send.device()));
        let (sp, rp) = (send.data_ptr() as *const u8, recv.data_ptr() as *mut u8);
        let stream: Stream = std::ptr::null_mut();
        let api = &self.api;
        let check = |call, code| api.check(call, code, self.rank, self.size);
        // SAFETY: offsets stay inside the two contiguous buffers (counts sum to their
        // rows), and the work is ordered on the stream every use of them runs on.
        unsafe {
            check("ncclGroupStart", (api.group_start)())?;
            let (mut s_at, mut r_at) = (0usize, 0usize);
            let mut failed = Ok(());
            for peer in 0..self.size {
                let (sn, rn) = (send_rows[peer] * row, recv_rows[peer] * row);
                if sn > 0 {
                    let r = (api.send)(
                        sp.add(s_at * elt) as *const c_void,
                        sn,
                        dt,
                        peer as c_int,
                        self.comm,
                        stream,
                    );
                    failed = check("ncclSend", r);
                }
                if rn > 0 && failed.is_ok() {
                    let r = (api.recv)(
                        rp.add(r_at * elt) as *mut c_void,
                        rn,
                        dt,
                        peer as c_int,
                        self.comm,
                        stream,
                    );
                    failed = check("ncclRecv", r);
                }
                if failed.is_err() {
                    break;
                }
                s_at += sn;
                r_at += rn;
            }
            // The group is closed even after a failed send or receive, so this thread's
            // NCCL state is not left inside a group; the first error is the one returned.
            let ended = check("ncclGroupEnd", (api.group_end)());
            failed.and(ended)?;
        }
        // Dropping `send` here is safe: torch's caching allocator reuses its memory only
        // for work on the same (default) stream, which runs after the transfer.
        drop(send);
        Ok(recv)
    }

    /// Every rank's `t` (same shape on all), stacked in rank order: P x shape.
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor, NcclError> {
        let flat = t.contiguous().reshape([1, -1]);
        let copies = flat
            .expand([self.size as i64, flat.size()[1]], false)
            .contiguous();
        let mut shape = vec![self.size as i64];
        shape.extend(t.size());
        Ok(self
            .all_to_all_rows(&copies, &vec![1; self.size], &vec![1; self.size])?
            .view(shape.as_slice()))
    }

    /// The sum over ranks of `t`, the same bits on every rank: chunk r of every rank goes
    /// to rank r, which adds the P contributions in rank order; the sums are gathered.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, NcclError> {
        if self.size == 1 {
            return Ok(t.shallow_clone());
        }
        let p = self.size as i64;
        let flat = t.contiguous().reshape([-1]);
        let n = flat.size()[0];
        let chunk = (n + p - 1) / p;
        let padded = Tensor::cat(&[&flat, &flat.zeros_like().narrow(0, 0, chunk * p - n)], 0)
            .view([p, chunk]);
        let pieces = self.all_to_all_rows(&padded, &vec![1; self.size], &vec![1; self.size])?;
        let mut sum = pieces.get(0).copy();
        for src in 1..p {
            sum += pieces.get(src);
        }
        Ok(self
            .all_gather(&sum)?
            .reshape([-1])
            .narrow(0, 0, n)
            .view(t.size().as_slice()))
    }

    /// `root`'s `t` on every rank.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor, NcclError> {
        if root >= self.size {
            return Err(NcclError::Counts {
                call: "broadcast",
                rank: self.rank,
                problem: format!("root {root} is not a rank of {}", self.size),
            });
        }
        Ok(self.all_gather(t)?.get(root as i64))
    }
}

/// The name of CUDA device `ordinal` (e.g. "NVIDIA H100 80GB HBM3") from the driver
/// (`libcuda.so.1`, loaded at run time); None where there is no driver or device.
pub fn cuda_device_name(ordinal: usize) -> Option<String> {
    type Init = unsafe extern "C" fn(u32) -> i32;
    type Get = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type Name = unsafe extern "C" fn(*mut c_char, i32, i32) -> i32;
    // SAFETY: the symbols are the CUDA driver API's, with these C signatures; the name
    // buffer outlives the call and its length is passed.
    unsafe {
        let lib = Library::new("libcuda.so.1").ok()?;
        let init: libloading::Symbol<Init> = lib.get(b"cuInit\0").ok()?;
        let get: libloading::Symbol<Get> = lib.get(b"cuDeviceGet\0").ok()?;
        let name: libloading::Symbol<Name> = lib.get(b"cuDeviceGetName\0").ok()?;
        if init(0) != 0 {
            return None;
        }
        let mut dev = 0i32;
        if get(&mut dev, ordinal as i32) != 0 {
            return None;
        }
        let mut buf = [0 as c_char; 256];
        if name(buf.as_mut_ptr(), buf.len() as i32, dev) != 0 {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(buf.as_ptr())
                .to_string_lossy()
                .into_owned(),
        )
    }
}
