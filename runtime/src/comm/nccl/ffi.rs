//! NCCL's C entry points, loaded by path at run time (cudarc's own loader searches
//! names NCCL's Python package does not use, and panics when it finds none).

use super::{find_nccl_with, NcclId, NcclLocation, NcclVersion, NCCL_HINT};
use crate::{Error, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// `ncclComm_t`.
pub(super) type RawComm = *mut c_void;
/// `cudaStream_t` (the driver's `CUstream` is the same pointer).
pub(super) type Stream = cudarc::driver::sys::CUstream;

/// `ncclUniqueId`, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct UniqueId {
    pub internal: [u8; 128],
}

/// `ncclDataType_t` values (stable across NCCL 2.x).
pub(super) mod dtype {
    pub const UINT8: i32 = 1;
    pub const FLOAT16: i32 = 6;
    pub const FLOAT32: i32 = 7;
    pub const BFLOAT16: i32 = 9;
}
/// `ncclSum`.
pub(super) const SUM: c_int = 0;
/// `ncclInProgress`: a non-blocking call still running (not an error).
const IN_PROGRESS: c_int = 7;

macro_rules! nccl_table {
    ($($field:ident: $sym:literal fn($($arg:ty),*) -> $ret:ty;)*) => {
        /// The loaded library and the entry points kiln calls.
        pub(super) struct Nccl {
            _lib: libloading::Library,
            /// Where it came from.
            pub location: NcclLocation,
            $(pub $field: unsafe extern "C" fn($($arg),*) -> $ret,)*
        }

        impl Nccl {
            fn load(location: NcclLocation) -> std::result::Result<Nccl, String> {
                let name = location
                    .path
                    .as_ref()
                    .map_or_else(|| "libnccl.so.2".into(), |p| p.display().to_string());
                // SAFETY: loading NCCL runs its static initialisers only, which have
                // no preconditions.
                let lib = unsafe { libloading::Library::new(&name) }.map_err(|e| {
                    if location.path.is_none() {
                        NCCL_HINT.to_string()
                    } else {
                        format!("NCCL at {name} ({}): {e}", location.found_by)
                    }
                })?;
                // SAFETY: each symbol is declared with NCCL's C signature (nccl.h,
                // unchanged through 2.x for these entry points).
                unsafe {
                    Ok(Nccl {
                        $($field: *lib
                            .get::<unsafe extern "C" fn($($arg),*) -> $ret>($sym)
                            .map_err(|e| format!("NCCL at {name}: {e}"))?,)*
                        _lib: lib,
                        location,
                    })
                }
            }
        }
    };
}

nccl_table! {
    get_version: b"ncclGetVersion\0" fn(*mut c_int) -> c_int;
    get_unique_id: b"ncclGetUniqueId\0" fn(*mut UniqueId) -> c_int;
    get_error_string: b"ncclGetErrorString\0" fn(c_int) -> *const c_char;
    comm_init_rank: b"ncclCommInitRank\0" fn(*mut RawComm, c_int, UniqueId, c_int) -> c_int;
    comm_init_all: b"ncclCommInitAll\0" fn(*mut RawComm, c_int, *const c_int) -> c_int;
    comm_destroy: b"ncclCommDestroy\0" fn(RawComm) -> c_int;
    comm_abort: b"ncclCommAbort\0" fn(RawComm) -> c_int;
    comm_get_async_error: b"ncclCommGetAsyncError\0" fn(RawComm, *mut c_int) -> c_int;
    all_reduce: b"ncclAllReduce\0" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, Stream) -> c_int;
    all_gather: b"ncclAllGather\0" fn(*const c_void, *mut c_void, usize, c_int, RawComm, Stream) -> c_int;
    send: b"ncclSend\0" fn(*const c_void, usize, c_int, c_int, RawComm, Stream) -> c_int;
    recv: b"ncclRecv\0" fn(*mut c_void, usize, c_int, c_int, RawComm, Stream) -> c_int;
    group_start: b"ncclGroupStart\0" fn() -> c_int;
    group_end: b"ncclGroupEnd\0" fn() -> c_int;
}

// SAFETY: the table holds a library handle and plain function pointers; NCCL's entry
// points may be called from any thread.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

/// NCCL for this process, loaded on first use; `Err` says what to install.
pub(super) fn nccl() -> std::result::Result<&'static Nccl, String> {
    static LIB: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let location = find_nccl_with(&|k| std::env::var(k).ok().filter(|v| !v.is_empty()))?;
        Nccl::load(location)
    })
    .as_ref()
    .map_err(Clone::clone)
}

impl Nccl {
    /// `Ok` for `ncclSuccess`, else NCCL's own words for the code.
    pub fn check(&self, rc: c_int, what: &str) -> std::result::Result<(), String> {
        if rc == 0 || rc == IN_PROGRESS {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static C string for any code.
        let text = unsafe { CStr::from_ptr((self.get_error_string)(rc)) };
        Err(format!(
            "{what}: {} (ncclResult_t {rc})",
            text.to_string_lossy()
        ))
    }

    pub fn version(&self) -> Result<NcclVersion> {
        let mut code = 0;
        // SAFETY: writes one int.
        let rc = unsafe { (self.get_version)(&mut code) };
        self.check(rc, "ncclGetVersion").map_err(Error::Device)?;
        Ok(NcclVersion::from_code(code.max(0) as u32))
    }

    pub fn unique_id(&self) -> Result<NcclId> {
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: writes one ncclUniqueId.
        let rc = unsafe { (self.get_unique_id)(&mut id) };
        self.check(rc, "ncclGetUniqueId").map_err(Error::Device)?;
        Ok(NcclId(id.internal))
    }

    /// The communicator's asynchronous error, if any (a peer failed, a network error).
    pub fn async_error(&self, comm: RawComm) -> std::result::Result<(), String> {
        let mut rc = 0;
        // SAFETY: `comm` is a live communicator; writes one int.
        let q = unsafe { (self.comm_get_async_error)(comm, &mut rc) };
        self.check(q, "ncclCommGetAsyncError")?;
        self.check(rc, "NCCL")
    }
}
