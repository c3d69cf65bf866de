//! The Layotto guest SDK for Rust: the Runtime ABI (abi/layotto_abi.yaml) and the HTTP
//! handler entry point (abi/http.md) for function modules built for `wasm32-wasi`.
//!
//! ```ignore
//! use layotto::http::{Request, Response};
//!
//! fn handle(req: &Request) -> layotto::Result<Response> {
//!     let name = req.query_param("name").unwrap_or_else(|| "world".into());
//!     Ok(Response::text(format!("Hello, {}!\n", name)))
//! }
//! layotto::http_handler!(handle);
//! ```
//!
//! Build with plain rustc (std for wasm32-wasi: Debian's `libstd-rust-dev-wasm32`; no crates):
//!
//! ```sh
//! rustc --edition 2021 --target wasm32-wasi -O --crate-type rlib --crate-name layotto \
//!       abi/rust/layotto/src/lib.rs -o build/rust/liblayotto.rlib
//! rustc --edition 2021 --target wasm32-wasi -O --crate-type cdylib \
//!       --extern layotto=build/rust/liblayotto.rlib fn.rs -o fn.wasm
//! ```
//!
//! The module exports `layotto_http_handle` (from [`http_handler!`]), `proxy_on_memory_allocate`
//! (this crate) and `memory`; it imports only `layotto.*` and `wasi_snapshot_preview1.*`.
//!
//! Every wrapper returns [`Result`]: `Err(Status)` carries the host's status code
//! ([`Status::PERMISSION_DENIED`] when the pod does not grant the capability, ...). Absent
//! keys are `Ok(None)` rather than an error where the call has a natural "absent" answer.

use std::alloc::{alloc, Layout};
use std::fmt;

/// The raw host functions, exactly as abi/layotto_abi.yaml lowers them (all i32).
pub mod sys {
    #[link(wasm_import_module = "layotto")]
    extern "C" {
        pub fn layotto_log(level: i32, msg_ptr: *const u8, msg_len: usize) -> i32;
        pub fn layotto_time_now(out_ns_ptr: *mut i64) -> i32;
        pub fn layotto_random(buf_ptr: *mut u8, buf_len: usize) -> i32;
        pub fn layotto_state_get(
            store_ptr: *const u8,
            store_len: usize,
            key_ptr: *const u8,
            key_len: usize,
            value_ptr_ptr: *mut *mut u8,
            value_len_ptr: *mut usize,
            etag_ptr_ptr: *mut *mut u8,
            etag_len_ptr: *mut usize,
        ) -> i32;
        pub fn layotto_state_get_bulk(
            store_ptr: *const u8,
            store_len: usize,
            keys_ptr: *const u8,
            keys_len: usize,
            result_ptr_ptr: *mut *mut u8,
            result_len_ptr: *mut usize,
        ) -> i32;
        pub fn layotto_state_save(
            store_ptr: *const u8,
            store_len: usize,
            key_ptr: *const u8,
            key_len: usize,
            value_ptr: *const u8,
            value_len: usize,
            etag_ptr: *const u8,
            etag_len: usize,
            new_etag_ptr_ptr: *mut *mut u8,
            new_etag_len_ptr: *mut usize,
        ) -> i32;
        pub fn layotto_state_delete(
            store_ptr: *const u8,
            store_len: usize,
            key_ptr: *const u8,
            key_len: usize,
            etag_ptr: *const u8,
            etag_len: usize,
        ) -> i32;
        pub fn layotto_state_transaction(
            store_ptr: *const u8,
            store_len: usize,
            ops_ptr: *const u8,
            ops_len: usize,
        ) -> i32;
        pub fn layotto_invoke(
            id_ptr: *const u8,
            id_len: usize,
            method_ptr: *const u8,
            method_len: usize,
            data_ptr: *const u8,
            data_len: usize,
            result_ptr_ptr: *mut *mut u8,
            result_len_ptr: *mut usize,
        ) -> i32;
        pub fn layotto_publish(
            pubsub_ptr: *const u8,
            pubsub_len: usize,
            topic_ptr: *const u8,
            topic_len: usize,
            data_ptr: *const u8,
            data_len: usize,
        ) -> i32;
        pub fn layotto_config_get(
            store_ptr: *const u8,
            store_len: usize,
            group_ptr: *const u8,
            group_len: usize,
            label_ptr: *const u8,
            label_len: usize,
            key_ptr: *const u8,
            key_len: usize,
            value_ptr_ptr: *mut *mut u8,
            value_len_ptr: *mut usize,
        ) -> i32;
        pub fn layotto_try_lock(
            store_ptr: *const u8,
            store_len: usize,
            resource_ptr: *const u8,
            resource_len: usize,
            owner_ptr: *const u8,
            owner_len: usize,
            expire_s: i32,
            acquired_ptr: *mut i32,
        ) -> i32;
        pub fn layotto_unlock(
            store_ptr: *const u8,
            store_len: usize,
            resource_ptr: *const u8,
            resource_len: usize,
            owner_ptr: *const u8,
            owner_len: usize,
            result_ptr: *mut i32,
        ) -> i32;
        pub fn layotto_next_id(
            store_ptr: *const u8,
            store_len: usize,
            key_ptr: *const u8,
            key_len: usize,
            id_ptr: *mut i64,
        ) -> i32;
        pub fn layotto_get_secret(
            store_ptr: *const u8,
            store_len: usize,
            name_ptr: *const u8,
            name_len: usize,
            result_ptr_ptr: *mut *mut u8,
            result_len_ptr: *mut usize,
        ) -> i32;
    }
}

// ---- status codes --------------------------------------------------------------------

/// A host status code (abi/ABI.md, "Status codes").
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Status(pub i32);

impl Status {
    pub const OK: Status = Status(0);
    pub const NOT_FOUND: Status = Status(1);
    pub const BAD_ARGUMENT: Status = Status(2);
    pub const SERIALIZATION_FAILURE: Status = Status(3);
    pub const PARSE_FAILURE: Status = Status(4);
    pub const INVALID_MEMORY_ACCESS: Status = Status(6);
    pub const EMPTY: Status = Status(7);
    pub const CAS_MISMATCH: Status = Status(8);
    pub const INTERNAL_FAILURE: Status = Status(10);
    pub const UNIMPLEMENTED: Status = Status(12);
    pub const PERMISSION_DENIED: Status = Status(13);
    pub const LIMIT_EXCEEDED: Status = Status(14);

    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "OK",
            1 => "NOT_FOUND",
            2 => "BAD_ARGUMENT",
            3 => "SERIALIZATION_FAILURE",
            4 => "PARSE_FAILURE",
            6 => "INVALID_MEMORY_ACCESS",
            7 => "EMPTY",
            8 => "CAS_MISMATCH",
            10 => "INTERNAL_FAILURE",
            12 => "UNIMPLEMENTED",
            13 => "PERMISSION_DENIED",
            14 => "LIMIT_EXCEEDED",
            _ => "UNKNOWN",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl std::error::Error for Status {}

pub type Result<T> = std::result::Result<T, Status>;

fn check(rc: i32) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Status(rc))
    }
}

/// `Ok(None)` for NOT_FOUND.
fn found<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(Status::NOT_FOUND) => Ok(None),
        Err(e) => Err(e),
    }
}

// ---- memory the host allocates --------------------------------------------------------

/// The allocator the host uses for everything it hands to the guest (the request, results).
/// Buffers are plain `Vec<u8>` allocations (align 1, capacity = size): the SDK takes them
/// back with [`Vec::from_raw_parts`].
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    match Layout::from_size_align(size.max(1), 1) {
        Ok(layout) => unsafe { alloc(layout) },
        Err(_) => std::ptr::null_mut(),
    }
}

/// Takes ownership of a buffer the host returned through a (ptr, len) out-pointer pair.
unsafe fn take(ptr: *mut u8, len: usize) -> Vec<u8> {
    if ptr.is_null() || len == 0 {
        if !ptr.is_null() {
            drop(Vec::from_raw_parts(ptr, 0, 1));
        }
        Vec::new()
    } else {
        Vec::from_raw_parts(ptr, len, len)
    }
}

/// A result buffer: the (ptr, len) pair the host writes, owned once read.
struct Out {
    ptr: *mut u8,
    len: usize,
}

impl Out {
    fn new() -> Self {
        Out { ptr: std::ptr::null_mut(), len: 0 }
    }
    fn take(&mut self) -> Vec<u8> {
        let v = unsafe { take(self.ptr, self.len) };
        self.ptr = std::ptr::null_mut();
        self.len = 0;
        v
    }
}

impl Drop for Out {
    fn drop(&mut self) {
        self.take();
    }
}

fn string(v: Vec<u8>) -> String {
    String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

// ---- logging, time, randomness ------------------------------------------------------------

/// Log levels of [`log`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Level {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// Writes a line to the function's log (`layotto logs`).
pub fn log(level: Level, msg: &str) {
    unsafe {
        sys::layotto_log(level as i32, msg.as_ptr(), msg.len());
    }
}

/// Nanoseconds since the Unix epoch.
pub fn time_now() -> Result<i64> {
    let mut ns = 0i64;
    check(unsafe { sys::layotto_time_now(&mut ns) })?;
    Ok(ns)
}

/// Fills `buf` with cryptographically secure random bytes.
pub fn random(buf: &mut [u8]) -> Result<()> {
    check(unsafe { sys::layotto_random(buf.as_mut_ptr(), buf.len()) })
}

// ---- state ----------------------------------------------------------------------------------

/// The value of `key` in state store `store`, `None` when absent.
pub fn state_get(store: &str, key: &str) -> Result<Option<Vec<u8>>> {
    Ok(state_get_etag(store, key)?.map(|(value, _)| value))
}

/// The value of `key` and its etag, `None` when absent.
pub fn state_get_etag(store: &str, key: &str) -> Result<Option<(Vec<u8>, String)>> {
    let (mut v, mut e) = (Out::new(), Out::new());
    let rc = unsafe {
        sys::layotto_state_get(
            store.as_ptr(),
            store.len(),
            key.as_ptr(),
            key.len(),
            &mut v.ptr,
            &mut v.len,
            &mut e.ptr,
            &mut e.len,
        )
    };
    found(check(rc).map(|_| (v.take(), string(e.take()))))
}

/// Stores `value` under `key` unconditionally; returns the new etag.
pub fn state_save(store: &str, key: &str, value: &[u8]) -> Result<String> {
    state_save_etag(store, key, value, "")
}

/// Stores `value` only if the item's etag is `etag` (else `Err(CAS_MISMATCH)`); an empty
/// etag stores unconditionally. Returns the new etag.
pub fn state_save_etag(store: &str, key: &str, value: &[u8], etag: &str) -> Result<String> {
    let mut e = Out::new();
    let rc = unsafe {
        sys::layotto_state_save(
            store.as_ptr(),
            store.len(),
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            etag.as_ptr(),
            etag.len(),
            &mut e.ptr,
            &mut e.len,
        )
    };
    check(rc).map(|_| string(e.take()))
}

/// Deletes `key`; `Ok(false)` when it did not exist.
pub fn state_delete(store: &str, key: &str) -> Result<bool> {
    state_delete_etag(store, key, "")
}

/// Deletes `key` only if its etag is `etag` (empty: unconditionally).
pub fn state_delete_etag(store: &str, key: &str, etag: &str) -> Result<bool> {
    let rc = unsafe {
        sys::layotto_state_delete(
            store.as_ptr(),
            store.len(),
            key.as_ptr(),
            key.len(),
            etag.as_ptr(),
            etag.len(),
        )
    };
    Ok(found(check(rc))?.is_some())
}

/// The values of several keys; absent keys are left out.
pub fn state_get_bulk(store: &str, keys: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let list = encode_map(keys.iter().map(|k| (k.as_bytes(), &b""[..])));
    let mut r = Out::new();
    let rc = unsafe {
        sys::layotto_state_get_bulk(
            store.as_ptr(),
            store.len(),
            list.as_ptr(),
            list.len(),
            &mut r.ptr,
            &mut r.len,
        )
    };
    check(rc)?;
    let map = r.take();
    let pairs = decode_map(&map).ok_or(Status::PARSE_FAILURE)?;
    Ok(pairs.into_iter().map(|(k, v)| (string(k.to_vec()), v.to_vec())).collect())
}

/// One operation of [`state_transaction`]; an empty etag is unconditional.
#[derive(Clone, Copy, Debug)]
pub enum StateOp<'a> {
    Upsert { key: &'a str, value: &'a [u8], etag: &'a str },
    Delete { key: &'a str, etag: &'a str },
}

/// Applies every operation or none.
pub fn state_transaction(store: &str, ops: &[StateOp]) -> Result<()> {
    let mut buf = Vec::new();
    buf.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for op in ops {
        let (kind, key, value, etag): (u32, &str, &[u8], &str) = match *op {
            StateOp::Upsert { key, value, etag } => (0, key, value, etag),
            StateOp::Delete { key, etag } => (1, key, b"", etag),
        };
        for n in [kind, key.len() as u32, value.len() as u32, etag.len() as u32] {
            buf.extend_from_slice(&n.to_le_bytes());
        }
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(value);
        buf.extend_from_slice(etag.as_bytes());
    }
    check(unsafe {
        sys::layotto_state_transaction(store.as_ptr(), store.len(), buf.as_ptr(), buf.len())
    })
}

// ---- invocation, pub/sub, configuration -------------------------------------------------------

/// Calls function (or application) `id`: an HTTP POST of `data` to "/<method>". Returns the
/// response body; a 404 answer is `Err(NOT_FOUND)`, other errors `Err(INTERNAL_FAILURE)`.
pub fn invoke(id: &str, method: &str, data: &[u8]) -> Result<Vec<u8>> {
    let mut r = Out::new();
    let rc = unsafe {
        sys::layotto_invoke(
            id.as_ptr(),
            id.len(),
            method.as_ptr(),
            method.len(),
            data.as_ptr(),
            data.len(),
            &mut r.ptr,
            &mut r.len,
        )
    };
    check(rc).map(|_| r.take())
}

/// Publishes `data` on `topic` of pub/sub component `pubsub`.
pub fn publish(pubsub: &str, topic: &str, data: &[u8]) -> Result<()> {
    check(unsafe {
        sys::layotto_publish(
            pubsub.as_ptr(),
            pubsub.len(),
            topic.as_ptr(),
            topic.len(),
            data.as_ptr(),
            data.len(),
        )
    })
}

/// Configuration `key` of store `store` (group and label may be empty), `None` when absent.
pub fn config_get(store: &str, group: &str, label: &str, key: &str) -> Result<Option<Vec<u8>>> {
    let mut v = Out::new();
    let rc = unsafe {
        sys::layotto_config_get(
            store.as_ptr(),
            store.len(),
            group.as_ptr(),
            group.len(),
            label.as_ptr(),
            label.len(),
            key.as_ptr(),
            key.len(),
            &mut v.ptr,
            &mut v.len,
        )
    };
    found(check(rc).map(|_| v.take()))
}

// ---- locks, sequencer, secrets ------------------------------------------------------------------

/// Tries to take lock `resource` for `owner` for `expire_s` seconds: `Ok(true)` when taken,
/// `Ok(false)` when another owner holds it.
pub fn try_lock(store: &str, resource: &str, owner: &str, expire_s: i32) -> Result<bool> {
    let mut acquired = 0i32;
    let rc = unsafe {
        sys::layotto_try_lock(
            store.as_ptr(),
            store.len(),
            resource.as_ptr(),
            resource.len(),
            owner.as_ptr(),
            owner.len(),
            expire_s,
            &mut acquired,
        )
    };
    check(rc).map(|_| acquired != 0)
}

/// What [`unlock`] found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Unlock {
    Success,
    LockDoesNotExist,
    BelongsToOthers,
}

/// Releases lock `resource` held by `owner`.
pub fn unlock(store: &str, resource: &str, owner: &str) -> Result<Unlock> {
    let mut result = 0i32;
    let rc = unsafe {
        sys::layotto_unlock(
            store.as_ptr(),
            store.len(),
            resource.as_ptr(),
            resource.len(),
            owner.as_ptr(),
            owner.len(),
            &mut result,
        )
    };
    check(rc)?;
    match result {
        0 => Ok(Unlock::Success),
        1 => Ok(Unlock::LockDoesNotExist),
        2 => Ok(Unlock::BelongsToOthers),
        _ => Err(Status::INTERNAL_FAILURE),
    }
}

/// The next id for `key` of sequencer `store`: strictly increasing.
pub fn next_id(store: &str, key: &str) -> Result<i64> {
    let mut id = 0i64;
    check(unsafe { sys::layotto_next_id(store.as_ptr(), store.len(), key.as_ptr(), key.len(), &mut id) })?;
    Ok(id)
}

/// Secret `name` of store `store` (its keys and values), `None` when absent.
pub fn get_secret(store: &str, name: &str) -> Result<Option<Vec<(String, String)>>> {
    let mut r = Out::new();
    let rc = unsafe {
        sys::layotto_get_secret(store.as_ptr(), store.len(), name.as_ptr(), name.len(), &mut r.ptr, &mut r.len)
    };
    found(check(rc).and_then(|_| {
        let map = r.take();
        let pairs = decode_map(&map).ok_or(Status::PARSE_FAILURE)?;
        Ok(pairs.into_iter().map(|(k, v)| (string(k.to_vec()), string(v.to_vec()))).collect())
    }))
}

// ---- maps (proxy-wasm serialization) ------------------------------------------------------------

/// Encodes pairs as a proxy-wasm map: u32 count, count x (u32 key_len, u32 value_len), then
/// each key and value followed by a NUL (little-endian).
pub fn encode_map<'a, I>(pairs: I) -> Vec<u8>
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
{
    let pairs: Vec<(&[u8], &[u8])> = pairs.into_iter().collect();
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in &pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in &pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

fn rd32(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

/// Decodes a proxy-wasm map (`None` when malformed; an empty buffer is an empty map).
pub fn decode_map(b: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    if b.is_empty() {
        return Some(Vec::new());
    }
    let count = rd32(b, 0)?;
    let mut pos = count.checked_mul(8)?.checked_add(4)?;
    if pos > b.len() {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let kl = rd32(b, 4 + 8 * i)?;
        let vl = rd32(b, 8 + 8 * i)?;
        let k = b.get(pos..pos.checked_add(kl)?)?;
        pos += kl;
        if *b.get(pos)? != 0 {
            return None;
        }
        pos += 1;
        let v = b.get(pos..pos.checked_add(vl)?)?;
        pos += vl;
        if *b.get(pos)? != 0 {
            return None;
        }
        pos += 1;
        out.push((k, v));
    }
    Some(out)
}

// ---- the HTTP handler entry point -----------------------------------------------------------------

/// The HTTP handler entry point (abi/http.md).
pub mod http {
    use super::{decode_map, encode_map, Status};
    use std::borrow::Cow;

    /// One decoded request. Slices borrow the request buffer, freed when the handler returns.
    #[derive(Debug)]
    pub struct Request<'a> {
        pub method: &'a [u8],
        /// Without the query string.
        pub path: &'a [u8],
        /// Without the `?`.
        pub query: &'a [u8],
        /// Lower-case names, in the order received.
        pub headers: Vec<(&'a [u8], &'a [u8])>,
        pub body: &'a [u8],
    }

    impl<'a> Request<'a> {
        /// Decodes the wire format (`None` when any length is out of range).
        pub fn decode(b: &'a [u8]) -> Option<Request<'a>> {
            let mut lens = [0usize; 5];
            for (i, len) in lens.iter_mut().enumerate() {
                *len = super::rd32(b, 4 * i)?;
            }
            let mut pos = 20usize;
            let mut next = |n: usize| -> Option<&'a [u8]> {
                let s = b.get(pos..pos.checked_add(n)?)?;
                pos += n;
                Some(s)
            };
            let method = next(lens[0])?;
            let path = next(lens[1])?;
            let query = next(lens[2])?;
            let headers = decode_map(next(lens[3])?)?;
            let body = next(lens[4])?;
            Some(Request { method, path, query, headers, body })
        }

        pub fn method(&self) -> &str {
            std::str::from_utf8(self.method).unwrap_or("")
        }

        pub fn path(&self) -> Cow<'a, str> {
            String::from_utf8_lossy(self.path)
        }

        /// The first header named `name` (ASCII case-insensitive).
        pub fn header(&self, name: &str) -> Option<&'a [u8]> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, v)| *v)
        }

        /// The first query parameter `name`, `+` and `%XX` decoded (a parameter without `=`
        /// has an empty value).
        pub fn query_param(&self, name: &str) -> Option<String> {
            query_param(self.query, name)
        }

        pub fn body_str(&self) -> Cow<'a, str> {
            String::from_utf8_lossy(self.body)
        }
    }

    fn hex(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }

    /// `+` and `%XX` decoding (a malformed escape is kept as is).
    pub fn url_decode(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(s.len());
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < s.len() => {
                    match (hex(s[i + 1]), hex(s[i + 2])) {
                        (Some(h), Some(l)) => {
                            out.push(h * 16 + l);
                            i += 3;
                            continue;
                        }
                        _ => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        out
    }

    /// The first parameter `name` of an `a=b&c=d` string, decoded.
    pub fn query_param(query: &[u8], name: &str) -> Option<String> {
        for part in query.split(|&c| c == b'&') {
            if part.is_empty() {
                continue;
            }
            let (k, v) = match part.iter().position(|&c| c == b'=') {
                Some(eq) => (&part[..eq], &part[eq + 1..]),
                None => (part, &b""[..]),
            };
            if url_decode(k) == name.as_bytes() {
                return Some(super::string(url_decode(v)));
            }
        }
        None
    }

    /// A response: status 200, no headers and an empty body unless set.
    #[derive(Clone, Debug, Default)]
    pub struct Response {
        pub status: u32,
        pub headers: Vec<(Vec<u8>, Vec<u8>)>,
        pub body: Vec<u8>,
    }

    impl Response {
        pub fn new(status: u32) -> Self {
            Response { status, headers: Vec::new(), body: Vec::new() }
        }

        /// 200 with a `text/plain; charset=utf-8` body.
        pub fn text(body: impl Into<String>) -> Self {
            Response::new(200)
                .header("content-type", "text/plain; charset=utf-8")
                .body(body.into().into_bytes())
        }

        pub fn status(mut self, status: u32) -> Self {
            self.status = status;
            self
        }

        pub fn header(mut self, name: &str, value: &str) -> Self {
            self.headers.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
            self
        }

        pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
            self.body = body.into();
            self
        }

        /// The wire format: status, headers_len, body_len (u32 LE), headers map, body.
        pub fn encode_into(&self, out: &mut Vec<u8>) {
            let map = encode_map(self.headers.iter().map(|(k, v)| (&k[..], &v[..])));
            out.clear();
            out.reserve(12 + map.len() + self.body.len());
            out.extend_from_slice(&self.status.to_le_bytes());
            out.extend_from_slice(&(map.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
            out.extend_from_slice(&map);
            out.extend_from_slice(&self.body);
        }
    }

    /// The encoded response of the last request: it must stay valid until the next call.
    static mut RESPONSE: Vec<u8> = Vec::new();

    fn in_memory(ptr: u32, len: u32) -> bool {
        let mem = core::arch::wasm32::memory_size(0) as u64 * 65536;
        ptr != 0 && ptr as u64 + len as u64 <= mem
    }

    /// The body of `layotto_http_handle` (see [`http_handler!`](crate::http_handler)): decodes
    /// the request (which the host allocated and the guest now owns), runs `handler`, encodes
    /// its response. A handler's `Err(status)` becomes that status (the host answers 500).
    pub fn dispatch<F>(req_ptr: u32, req_len: u32, resp_ptr_ptr: u32, resp_len_ptr: u32, handler: F) -> i32
    where
        F: FnOnce(&Request) -> super::Result<Response>,
    {
        if !in_memory(resp_ptr_ptr, 4) || !in_memory(resp_len_ptr, 4) {
            return Status::INVALID_MEMORY_ACCESS.0;
        }
        let (mut out_ptr, mut out_len) = (0u32, 0u32);
        let status = if !in_memory(req_ptr, req_len) {
            Status::INVALID_MEMORY_ACCESS.0
        } else {
            // The host allocated the request with proxy_on_memory_allocate(req_len).
            let buf = unsafe { Vec::from_raw_parts(req_ptr as *mut u8, req_len as usize, req_len.max(1) as usize) };
            let status = match Request::decode(&buf) {
                None => Status::PARSE_FAILURE.0,
                Some(req) => match handler(&req) {
                    Ok(resp) => unsafe {
                        if RESPONSE.capacity() > 1 << 20 {
                            RESPONSE = Vec::new(); // do not keep a huge buffer between requests
                        }
                        resp.encode_into(&mut RESPONSE);
                        out_ptr = RESPONSE.as_ptr() as u32;
                        out_len = RESPONSE.len() as u32;
                        0
                    },
                    Err(Status(0)) => Status::INTERNAL_FAILURE.0,
                    Err(Status(rc)) => rc,
                },
            };
            drop(buf);
            status
        };
        unsafe {
            *(resp_ptr_ptr as *mut u32) = out_ptr;
            *(resp_len_ptr as *mut u32) = out_len;
        }
        status
    }
}

/// Exports `layotto_http_handle` calling `handler: fn(&http::Request) -> layotto::Result<http::Response>`.
#[macro_export]
macro_rules! http_handler {
    ($handler:path) => {
        #[no_mangle]
        pub extern "C" fn layotto_http_handle(
            req_ptr: u32,
            req_len: u32,
            resp_ptr_ptr: u32,
            resp_len_ptr: u32,
        ) -> i32 {
            $crate::http::dispatch(req_ptr, req_len, resp_ptr_ptr, resp_len_ptr, $handler)
        }
    };
}
