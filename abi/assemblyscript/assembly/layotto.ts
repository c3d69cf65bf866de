// The Layotto guest SDK for AssemblyScript: the Runtime ABI (abi/layotto_abi.yaml) and the
// HTTP handler entry point (abi/http.md).
//
//     import { Request, Response, handle } from "<path>/abi/assemblyscript/assembly/layotto";
//     export { layotto_http_handle, proxy_on_memory_allocate } from "<path>/abi/assemblyscript/assembly/layotto";
//
//     handle((req: Request): Response => Response.text("Hello, " + req.queryParam("name", "world") + "!\n"));
//
// Build (abi/assemblyscript: `npm ci` once; images/sdk.mk does this for examples/):
//
//     abi/assemblyscript/node_modules/.bin/asc fn.ts -o fn.wasm \
//         -O3 --runtime incremental --exportStart _initialize --use abort=layotto_abort
//
// The module exports `layotto_http_handle`, `proxy_on_memory_allocate`, `memory` and
// `_initialize` (the top-level code: handle(...) registers the handler) and imports only
// `layotto.*`: AssemblyScript's `abort` is routed to layotto_abort below (a log line, then a
// trap), and nothing else of the JS host (`env.*`, `seed`, `trace`) may be used (so no
// Math.random: use random() below).
//
// Errors: AssemblyScript has no exceptions, so every wrapper sets the host's status code, read
// with lastStatus() (Status.OK = 0). Wrappers returning data return null on any failure
// (lastStatus() tells NOT_FOUND from the rest); wrappers returning nothing return the status.

// ---- raw host functions (module "layotto", exactly as the ABI table lowers them) -------------

@external("layotto", "layotto_log")
declare function layotto_log(level: i32, msg_ptr: usize, msg_len: usize): i32;
@external("layotto", "layotto_time_now")
declare function layotto_time_now(out_ns_ptr: usize): i32;
@external("layotto", "layotto_random")
declare function layotto_random(buf_ptr: usize, buf_len: usize): i32;
@external("layotto", "layotto_state_get")
declare function layotto_state_get(store_ptr: usize, store_len: usize, key_ptr: usize, key_len: usize,
  value_ptr_ptr: usize, value_len_ptr: usize, etag_ptr_ptr: usize, etag_len_ptr: usize): i32;
@external("layotto", "layotto_state_get_bulk")
declare function layotto_state_get_bulk(store_ptr: usize, store_len: usize, keys_ptr: usize, keys_len: usize,
  result_ptr_ptr: usize, result_len_ptr: usize): i32;
@external("layotto", "layotto_state_save")
declare function layotto_state_save(store_ptr: usize, store_len: usize, key_ptr: usize, key_len: usize,
  value_ptr: usize, value_len: usize, etag_ptr: usize, etag_len: usize,
  new_etag_ptr_ptr: usize, new_etag_len_ptr: usize): i32;
@external("layotto", "layotto_state_delete")
declare function layotto_state_delete(store_ptr: usize, store_len: usize, key_ptr: usize, key_len: usize,
  etag_ptr: usize, etag_len: usize): i32;
@external("layotto", "layotto_state_transaction")
declare function layotto_state_transaction(store_ptr: usize, store_len: usize, ops_ptr: usize, ops_len: usize): i32;
@external("layotto", "layotto_invoke")
declare function layotto_invoke(id_ptr: usize, id_len: usize, method_ptr: usize, method_len: usize,
  data_ptr: usize, data_len: usize, result_ptr_ptr: usize, result_len_ptr: usize): i32;
@external("layotto", "layotto_publish")
declare function layotto_publish(pubsub_ptr: usize, pubsub_len: usize, topic_ptr: usize, topic_len: usize,
  data_ptr: usize, data_len: usize): i32;
@external("layotto", "layotto_config_get")
declare function layotto_config_get(store_ptr: usize, store_len: usize, group_ptr: usize, group_len: usize,
  label_ptr: usize, label_len: usize, key_ptr: usize, key_len: usize,
  value_ptr_ptr: usize, value_len_ptr: usize): i32;
@external("layotto", "layotto_try_lock")
declare function layotto_try_lock(store_ptr: usize, store_len: usize, resource_ptr: usize, resource_len: usize,
  owner_ptr: usize, owner_len: usize, expire_s: i32, acquired_ptr: usize): i32;
@external("layotto", "layotto_unlock")
declare function layotto_unlock(store_ptr: usize, store_len: usize, resource_ptr: usize, resource_len: usize,
  owner_ptr: usize, owner_len: usize, result_ptr: usize): i32;
@external("layotto", "layotto_next_id")
declare function layotto_next_id(store_ptr: usize, store_len: usize, key_ptr: usize, key_len: usize, id_ptr: usize): i32;
@external("layotto", "layotto_get_secret")
declare function layotto_get_secret(store_ptr: usize, store_len: usize, name_ptr: usize, name_len: usize,
  result_ptr_ptr: usize, result_len_ptr: usize): i32;

// ---- status codes ------------------------------------------------------------------------------

export namespace Status {
  export const OK: i32 = 0;
  export const NOT_FOUND: i32 = 1;
  export const BAD_ARGUMENT: i32 = 2;
  export const SERIALIZATION_FAILURE: i32 = 3;
  export const PARSE_FAILURE: i32 = 4;
  export const INVALID_MEMORY_ACCESS: i32 = 6;
  export const EMPTY: i32 = 7;
  export const CAS_MISMATCH: i32 = 8;
  export const INTERNAL_FAILURE: i32 = 10;
  export const UNIMPLEMENTED: i32 = 12;
  export const PERMISSION_DENIED: i32 = 13;
  export const LIMIT_EXCEEDED: i32 = 14;
}

export function statusName(status: i32): string {
  switch (status) {
    case 0: return "OK";
    case 1: return "NOT_FOUND";
    case 2: return "BAD_ARGUMENT";
    case 3: return "SERIALIZATION_FAILURE";
    case 4: return "PARSE_FAILURE";
    case 6: return "INVALID_MEMORY_ACCESS";
    case 7: return "EMPTY";
    case 8: return "CAS_MISMATCH";
    case 10: return "INTERNAL_FAILURE";
    case 12: return "UNIMPLEMENTED";
    case 13: return "PERMISSION_DENIED";
    case 14: return "LIMIT_EXCEEDED";
  }
  return "UNKNOWN";
}

let last: i32 = 0;

/** The status of the last wrapper call. */
export function lastStatus(): i32 {
  return last;
}

// ---- memory the host allocates -------------------------------------------------------------------

/** The host allocates everything it hands to the guest through this export: unmanaged memory
 *  (not garbage collected), taken back with heap.free. */
export function proxy_on_memory_allocate(size: usize): usize {
  return heap.alloc(size);
}

// Out-pointers of the calls in progress: (ptr, len) pairs and 8-byte results.
const OUT: usize = memory.data(32, 8);

/** Copies a host-allocated (ptr, len) result into a managed array and frees it. */
function takeOut(slot: usize): Uint8Array {
  const ptr = load<u32>(OUT + slot) as usize;
  const len = load<u32>(OUT + slot + 4) as i32;
  store<u32>(OUT + slot, 0);
  store<u32>(OUT + slot + 4, 0);
  const out = new Uint8Array(len);
  if (ptr != 0) {
    memory.copy(out.dataStart, ptr, len);
    heap.free(ptr);
  }
  return out;
}

function clearOut(): void {
  memory.fill(OUT, 0, 32);
}

/** Frees whatever a failed call left in the out-pointers. */
function dropOut(slot: usize): void {
  const ptr = load<u32>(OUT + slot) as usize;
  if (ptr != 0) heap.free(ptr);
  store<u32>(OUT + slot, 0);
  store<u32>(OUT + slot + 4, 0);
}

// ---- strings ------------------------------------------------------------------------------

/** The UTF-8 bytes of a string. */
export function utf8(s: string): Uint8Array {
  return Uint8Array.wrap(String.UTF8.encode(s));
}

/** A string from UTF-8 bytes. */
export function text(b: Uint8Array): string {
  return String.UTF8.decodeUnsafe(b.dataStart, b.length);
}

// A string argument: its UTF-8 bytes, kept alive by the caller's local.
@inline function ptr(b: ArrayBuffer): usize {
  return changetype<usize>(b);
}
@inline function len(b: ArrayBuffer): usize {
  return b.byteLength as usize;
}
@inline function enc(s: string): ArrayBuffer {
  return String.UTF8.encode(s);
}

// ---- logging, time, randomness --------------------------------------------------------------------

export namespace Level {
  export const TRACE: i32 = 0;
  export const DEBUG: i32 = 1;
  export const INFO: i32 = 2;
  export const WARN: i32 = 3;
  export const ERROR: i32 = 4;
  export const CRITICAL: i32 = 5;
}

/** Writes a line to the function's log. */
export function log(level: i32, msg: string): i32 {
  const m = enc(msg);
  return last = layotto_log(level, ptr(m), len(m));
}

/** Nanoseconds since the Unix epoch (0 on failure). */
export function timeNow(): i64 {
  last = layotto_time_now(OUT);
  return last == 0 ? load<i64>(OUT) : 0;
}

/** `n` cryptographically secure random bytes (empty on failure). */
export function random(n: i32): Uint8Array {
  const out = new Uint8Array(n);
  last = layotto_random(out.dataStart, n);
  return last == 0 ? out : new Uint8Array(0);
}

// AssemblyScript's `abort` (asc --use abort=layotto_abort): a log line, then a trap.
let aborting = false;

// @ts-ignore: decorator
@global
export function layotto_abort(message: string | null, fileName: string | null, line: u32, column: u32): void {
  if (!aborting) {
    aborting = true;
    const m = enc("abort: " + (message ? message : "") + " at " + (fileName ? fileName : "?") +
      ":" + line.toString() + ":" + column.toString());
    layotto_log(Level.CRITICAL, ptr(m), len(m));
  }
  unreachable();
}

// ---- state ------------------------------------------------------------------------------------

/** The value of `key` in state store `storeName` (null when absent or on failure). */
export function stateGet(storeName: string, key: string): Uint8Array | null {
  const s = enc(storeName), k = enc(key);
  clearOut();
  last = layotto_state_get(ptr(s), len(s), ptr(k), len(k), OUT, OUT + 4, OUT + 8, OUT + 12);
  if (last != 0) {
    dropOut(0);
    dropOut(8);
    return null;
  }
  dropOut(8);
  return takeOut(0);
}

/** A value and its etag. */
export class StateItem {
  constructor(public value: Uint8Array, public etag: string) {}
}

/** The value of `key` and its etag (null when absent or on failure). */
export function stateGetEtag(storeName: string, key: string): StateItem | null {
  const s = enc(storeName), k = enc(key);
  clearOut();
  last = layotto_state_get(ptr(s), len(s), ptr(k), len(k), OUT, OUT + 4, OUT + 8, OUT + 12);
  if (last != 0) {
    dropOut(0);
    dropOut(8);
    return null;
  }
  const value = takeOut(0);
  return new StateItem(value, text(takeOut(8)));
}

/** The values of several keys (absent keys are left out; null on failure). */
export function stateGetBulk(storeName: string, keys: string[]): Map<string, Uint8Array> | null {
  const s = enc(storeName);
  const pairs = new Array<string>(keys.length * 2);
  for (let i = 0; i < keys.length; i++) {
    pairs[2 * i] = keys[i];
    pairs[2 * i + 1] = "";
  }
  const list = encodeMap(pairs);
  clearOut();
  last = layotto_state_get_bulk(ptr(s), len(s), list.dataStart, list.length, OUT, OUT + 4);
  if (last != 0) {
    dropOut(0);
    return null;
  }
  const raw = takeOut(0);
  const out = new Map<string, Uint8Array>();
  const base = raw.dataStart;
  if (raw.length == 0) return out;
  if (raw.length < 4) {
    last = Status.PARSE_FAILURE;
    return null;
  }
  // Values are bytes: decode the map by hand rather than through decodeMap's strings.
  const n = load<u32>(base) as i64;
  let pos: i64 = 4 + 8 * n;
  for (let i: i64 = 0; i < n; i++) {
    const kl = load<u32>(base + 4 + 8 * (i as usize)) as i64;
    const vl = load<u32>(base + 8 + 8 * (i as usize)) as i64;
    if (pos + kl + vl + 2 > raw.length) {
      last = Status.PARSE_FAILURE;
      return null;
    }
    const key = String.UTF8.decodeUnsafe(base + (pos as usize), kl as usize);
    pos += kl + 1;
    out.set(key, raw.slice(pos as i32, (pos + vl) as i32));
    pos += vl + 1;
  }
  return out;
}

/** One operation of stateTransaction: an upsert (value set) or a delete; etag "" is unconditional. */
export class StateOp {
  constructor(public key: string, public value: Uint8Array | null, public etag: string = "") {}
  static upsert(key: string, value: Uint8Array, etag: string = ""): StateOp {
    return new StateOp(key, value, etag);
  }
  static delete(key: string, etag: string = ""): StateOp {
    return new StateOp(key, null, etag);
  }
}

/** Applies every operation or none. */
export function stateTransaction(storeName: string, ops: StateOp[]): i32 {
  const s = enc(storeName);
  const keys = new Array<ArrayBuffer>(ops.length), etags = new Array<ArrayBuffer>(ops.length);
  let size = 4;
  for (let i = 0; i < ops.length; i++) {
    keys[i] = enc(ops[i].key);
    etags[i] = enc(ops[i].etag);
    const v = ops[i].value;
    size += 16 + keys[i].byteLength + etags[i].byteLength + (v != null ? v.length : 0);
  }
  const buf = new Uint8Array(size);
  const base = buf.dataStart;
  store<u32>(base, ops.length);
  let p = base + 4;
  for (let i = 0; i < ops.length; i++) {
    const v = ops[i].value;
    const vl = v != null ? v.length : 0;
    store<u32>(p, v != null ? 0 : 1);
    store<u32>(p + 4, keys[i].byteLength);
    store<u32>(p + 8, vl);
    store<u32>(p + 12, etags[i].byteLength);
    p += 16;
    memory.copy(p, changetype<usize>(keys[i]), keys[i].byteLength);
    p += keys[i].byteLength;
    if (v != null) memory.copy(p, v.dataStart, vl);
    p += vl;
    memory.copy(p, changetype<usize>(etags[i]), etags[i].byteLength);
    p += etags[i].byteLength;
  }
  return last = layotto_state_transaction(ptr(s), len(s), base, size);
}

/** Stores `value` under `key` (a non-empty etag makes it conditional: CAS_MISMATCH). */
export function stateSave(storeName: string, key: string, value: Uint8Array, etag: string = ""): i32 {
  const s = enc(storeName), k = enc(key), e = enc(etag);
  clearOut();
  last = layotto_state_save(ptr(s), len(s), ptr(k), len(k), value.dataStart, value.length,
    ptr(e), len(e), OUT, OUT + 4);
  dropOut(0);
  return last;
}

/** Deletes `key` (NOT_FOUND when it did not exist). */
export function stateDelete(storeName: string, key: string, etag: string = ""): i32 {
  const s = enc(storeName), k = enc(key), e = enc(etag);
  return last = layotto_state_delete(ptr(s), len(s), ptr(k), len(k), ptr(e), len(e));
}

// ---- invocation, pub/sub, configuration ----------------------------------------------------------

/** Calls function (or application) `id`: a POST of `data` to "/<method>"; its response body
 *  (null on failure: NOT_FOUND for an unknown id or a 404 answer). */
export function invoke(id: string, method: string, data: Uint8Array): Uint8Array | null {
  const i = enc(id), m = enc(method);
  clearOut();
  last = layotto_invoke(ptr(i), len(i), ptr(m), len(m), data.dataStart, data.length, OUT, OUT + 4);
  if (last != 0) {
    dropOut(0);
    return null;
  }
  return takeOut(0);
}

/** Publishes `data` on `topic` of pub/sub component `pubsub`. */
export function publish(pubsub: string, topic: string, data: Uint8Array): i32 {
  const p = enc(pubsub), t = enc(topic);
  return last = layotto_publish(ptr(p), len(p), ptr(t), len(t), data.dataStart, data.length);
}

/** Configuration `key` of store `storeName` (null when absent or on failure). */
export function configGet(storeName: string, key: string, group: string = "", label: string = ""): Uint8Array | null {
  const s = enc(storeName), g = enc(group), l = enc(label), k = enc(key);
  clearOut();
  last = layotto_config_get(ptr(s), len(s), ptr(g), len(g), ptr(l), len(l), ptr(k), len(k), OUT, OUT + 4);
  if (last != 0) {
    dropOut(0);
    return null;
  }
  return takeOut(0);
}

// ---- locks, sequencer, secrets ------------------------------------------------------------------

/** Tries to take lock `resource` for `owner` for `expireSeconds`: true when taken (false when
 *  another owner holds it, or on failure: see lastStatus()). */
export function tryLock(storeName: string, resource: string, owner: string, expireSeconds: i32): bool {
  const s = enc(storeName), r = enc(resource), o = enc(owner);
  store<i32>(OUT, 0);
  last = layotto_try_lock(ptr(s), len(s), ptr(r), len(r), ptr(o), len(o), expireSeconds, OUT);
  return last == 0 && load<i32>(OUT) != 0;
}

export namespace Unlock {
  export const SUCCESS: i32 = 0;
  export const LOCK_DOES_NOT_EXIST: i32 = 1;
  export const BELONGS_TO_OTHERS: i32 = 2;
}

/** Releases lock `resource` held by `owner`: one of Unlock.*, or -1 on failure. */
export function unlock(storeName: string, resource: string, owner: string): i32 {
  const s = enc(storeName), r = enc(resource), o = enc(owner);
  store<i32>(OUT, 0);
  last = layotto_unlock(ptr(s), len(s), ptr(r), len(r), ptr(o), len(o), OUT);
  return last == 0 ? load<i32>(OUT) : -1;
}

/** The next id for `key` of sequencer `storeName` (0 on failure). */
export function nextId(storeName: string, key: string): i64 {
  const s = enc(storeName), k = enc(key);
  last = layotto_next_id(ptr(s), len(s), ptr(k), len(k), OUT);
  return last == 0 ? load<i64>(OUT) : 0;
}

/** Secret `name` of store `storeName` as its keys and values (null when absent or on failure). */
export function getSecret(storeName: string, name: string): Map<string, string> | null {
  const s = enc(storeName), n = enc(name);
  clearOut();
  last = layotto_get_secret(ptr(s), len(s), ptr(n), len(n), OUT, OUT + 4);
  if (last != 0) {
    dropOut(0);
    return null;
  }
  const pairs = decodeMap(takeOut(0));
  if (pairs == null) {
    last = Status.PARSE_FAILURE;
    return null;
  }
  const out = new Map<string, string>();
  for (let i = 0; i < pairs.length; i += 2) out.set(pairs[i], pairs[i + 1]);
  return out;
}

// ---- maps (proxy-wasm serialization) --------------------------------------------------------------

/** Encodes [k0, v0, k1, v1, ...] as a proxy-wasm map. */
export function encodeMap(pairs: string[]): Uint8Array {
  const n = pairs.length >> 1;
  const parts = new Array<ArrayBuffer>(n * 2);
  let size = 4 + 8 * n;
  for (let i = 0; i < n * 2; i++) {
    parts[i] = enc(pairs[i]);
    size += parts[i].byteLength + 1;
  }
  const out = new Uint8Array(size);
  const base = out.dataStart;
  store<u32>(base, n);
  let pos = 4 + 8 * n;
  for (let i = 0; i < n * 2; i++) {
    const b = parts[i];
    store<u32>(base + 4 + 4 * i, b.byteLength);
    memory.copy(base + pos, changetype<usize>(b), b.byteLength);
    pos += b.byteLength + 1; // the NUL is already 0
  }
  return out;
}

/** Decodes a proxy-wasm map into [k0, v0, k1, v1, ...] (null when malformed). */
export function decodeMap(b: Uint8Array): string[] | null {
  return decodeMapAt(b.dataStart, b.length);
}

function decodeMapAt(base: usize, size: i32): string[] | null {
  const out = new Array<string>(0);
  if (size == 0) return out;
  if (size < 4) return null;
  const n = load<u32>(base) as i64;
  let pos: i64 = 4 + 8 * n;
  if (pos > size) return null;
  for (let i: i64 = 0; i < n; i++) {
    const kl = load<u32>(base + 4 + 8 * (i as usize)) as i64;
    const vl = load<u32>(base + 8 + 8 * (i as usize)) as i64;
    if (pos + kl + vl + 2 > size) return null;
    out.push(String.UTF8.decodeUnsafe(base + (pos as usize), kl as usize));
    pos += kl + 1;
    out.push(String.UTF8.decodeUnsafe(base + (pos as usize), vl as usize));
    pos += vl + 1;
  }
  return out;
}

// ---- the HTTP handler entry point (abi/http.md) -----------------------------------------------------

function hexValue(c: i32): i32 {
  if (c >= 48 && c <= 57) return c - 48;
  if (c >= 97 && c <= 102) return c - 87;
  if (c >= 65 && c <= 70) return c - 55;
  return -1;
}

/** `+` and `%XX` decoding of a query string component (malformed escapes kept as they are). */
export function urlDecode(s: string): string {
  if (s.indexOf("%") < 0 && s.indexOf("+") < 0) return s;
  const b = utf8(s);
  const out = new Uint8Array(b.length);
  let n = 0;
  for (let i = 0; i < b.length; i++) {
    const c = b[i] as i32;
    if (c == 43) {
      out[n++] = 32;
    } else if (c == 37 && i + 2 < b.length && hexValue(b[i + 1]) >= 0 && hexValue(b[i + 2]) >= 0) {
      out[n++] = (hexValue(b[i + 1]) * 16 + hexValue(b[i + 2])) as u8;
      i += 2;
    } else {
      out[n++] = c as u8;
    }
  }
  return String.UTF8.decodeUnsafe(out.dataStart, n);
}

/** The first parameter `name` of an `a=b&c=d` string, decoded (null when absent). */
export function queryParam(query: string, name: string): string | null {
  const parts = query.split("&");
  for (let i = 0; i < parts.length; i++) {
    const part = parts[i];
    if (part.length == 0) continue;
    const eq = part.indexOf("=");
    const k = eq < 0 ? part : part.substring(0, eq);
    if (urlDecode(k) == name) return eq < 0 ? "" : urlDecode(part.substring(eq + 1));
  }
  return null;
}

export class Request {
  method: string = "";
  /** Without the query string. */
  path: string = "";
  /** Without the `?`. */
  query: string = "";
  /** [name0, value0, name1, value1, ...], lower-case names. */
  headers: string[] = [];
  body: Uint8Array = new Uint8Array(0);

  /** The first header `name` (case-insensitive), or null. */
  header(name: string): string | null {
    const want = name.toLowerCase();
    for (let i = 0; i + 1 < this.headers.length; i += 2) {
      if (this.headers[i].toLowerCase() == want) return this.headers[i + 1];
    }
    return null;
  }

  /** Query parameter `name`, decoded; `fallback` when absent. */
  queryParam(name: string, fallback: string | null = null): string | null {
    const v = queryParam(this.query, name);
    return v != null ? v : fallback;
  }

  bodyText(): string {
    return text(this.body);
  }
}

export class Response {
  status: u32 = 200;
  /** [name0, value0, ...] */
  headers: string[] = [];
  body: Uint8Array = new Uint8Array(0);

  /** 200 with a `text/plain; charset=utf-8` body. */
  static text(body: string): Response {
    return new Response().setHeader("content-type", "text/plain; charset=utf-8").setBody(utf8(body));
  }

  setStatus(status: u32): Response {
    this.status = status;
    return this;
  }

  setHeader(name: string, value: string): Response {
    this.headers.push(name);
    this.headers.push(value);
    return this;
  }

  setBody(body: Uint8Array): Response {
    this.body = body;
    return this;
  }
}

export type Handler = (req: Request) => Response;

let handler: Handler | null = null;

/** Registers the request handler (call it from the module's top level). */
export function handle(h: Handler): void {
  handler = h;
}

// The encoded response of the last request (unmanaged, reused): valid until the next call.
let respBuf: usize = 0;
let respCap: usize = 0;

function decodeRequest(base: usize, size: usize): Request | null {
  if (size < 20) return null;
  const ml = load<u32>(base) as u64, pl = load<u32>(base + 4) as u64, ql = load<u32>(base + 8) as u64;
  const hl = load<u32>(base + 12) as u64, bl = load<u32>(base + 16) as u64;
  if (20 + ml + pl + ql + hl + bl > (size as u64)) return null;
  const req = new Request();
  let p = base + 20;
  req.method = String.UTF8.decodeUnsafe(p, ml as usize);
  p += ml as usize;
  req.path = String.UTF8.decodeUnsafe(p, pl as usize);
  p += pl as usize;
  req.query = String.UTF8.decodeUnsafe(p, ql as usize);
  p += ql as usize;
  const headers = decodeMapAt(p, hl as i32);
  if (headers == null) return null;
  req.headers = headers;
  p += hl as usize;
  const body = new Uint8Array(bl as i32);
  memory.copy(body.dataStart, p, bl as usize);
  req.body = body;
  return req;
}

function encodeResponse(resp: Response): usize {
  const map = encodeMap(resp.headers);
  const size: usize = <usize>12 + <usize>map.length + <usize>resp.body.length;
  if (size > respCap || respCap > (1 << 20)) {
    if (respBuf != 0) heap.free(respBuf);
    respCap = size < 256 ? 256 : size;
    respBuf = heap.alloc(respCap);
  }
  store<u32>(respBuf, resp.status);
  store<u32>(respBuf + 4, map.length);
  store<u32>(respBuf + 8, resp.body.length);
  memory.copy(respBuf + 12, map.dataStart, map.length);
  memory.copy(respBuf + 12 + map.length, resp.body.dataStart, resp.body.length);
  return size;
}

function inMemory(p: usize, n: usize): bool {
  return p != 0 && (p as u64) + (n as u64) <= ((memory.size() as u64) << 16);
}

/** The entry point the host calls per request (re-export it from the module's entry file). */
export function layotto_http_handle(reqPtr: usize, reqLen: usize, respPtrPtr: usize, respLenPtr: usize): i32 {
  if (!inMemory(respPtrPtr, 4) || !inMemory(respLenPtr, 4)) return Status.INVALID_MEMORY_ACCESS;
  store<u32>(respPtrPtr, 0);
  store<u32>(respLenPtr, 0);
  if (!inMemory(reqPtr, reqLen)) return Status.INVALID_MEMORY_ACCESS;
  const req = decodeRequest(reqPtr, reqLen);
  heap.free(reqPtr); // host-allocated through proxy_on_memory_allocate; ours now
  if (req == null) return Status.PARSE_FAILURE;
  const h = handler;
  if (h == null) return Status.UNIMPLEMENTED;
  const resp = h(req);
  const size = encodeResponse(resp);
  store<u32>(respPtrPtr, respBuf);
  store<u32>(respLenPtr, size);
  return Status.OK;
}
