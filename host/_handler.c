/*
 * The per-request hot path of handler-ABI functions, in C.
 *
 * Creating an instance of a function module and calling its handler each take a dozen
 * calls into wasmtime's C API. Made one by one through ctypes they cost ~1 µs apiece in
 * argument conversion and object allocation alone, which is most of what a fresh instance
 * or a small request costs. Here each is one call from Python: `instantiate` builds the
 * Store, instantiates the module's InstancePre, finds its exports and runs `_initialize`;
 * `call` allocates the request in linear memory, copies it in, runs the handler and copies
 * the response out, checking every guest pointer against the memory's current size.
 *
 * This file links against nothing: `bind` receives the addresses of the wasmtime
 * functions from the library wasmtime-py has loaded, and the sizes of the structures it
 * declares, which are checked against wasmtime-py's own declarations. Errors and traps
 * come back to Python as the wasmtime_error_t / wasm_trap_t pointers themselves, so that
 * wasmtime-py's classes own and describe them. wasm runs with the GIL released (the epoch
 * ticker and other functions' threads keep going); host functions it calls take the GIL
 * themselves.
 *
 * An instance reaches Python as an owned `_handler.Instance` object, never as a raw
 * address: `delete()` frees its Store once (a second delete does nothing), a call on a
 * deleted instance is a clear error, and an instance nobody deleted is freed with its
 * last reference. The Store's epoch-deadline callback gets the instance's watch object
 * (host/capi.py EpochWatch) as its environment; the instance holds a reference to it
 * until after the Store is gone.
 *
 * The ABI itself is in abi/layotto_abi.yaml (layotto_http_handle).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* wasmtime's C API structures, as far as this file touches them. */
typedef struct {
    uint64_t store_id;
    size_t private_index;
} wt_instance_t; /* wasmtime_instance_t */

typedef struct {
    uint8_t kind;
    uint8_t pad[7];
    uint8_t of[24]; /* a wasmtime_func_t (16 bytes) or wasmtime_memory_t (24 bytes) */
} wt_extern_t; /* wasmtime_extern_t */

typedef union {
    int32_t i32;
    int64_t i64;
    uint8_t v128[16];
} wt_val_raw_t; /* wasmtime_val_raw_t */

#define WT_EXTERN_FUNC 0
#define WT_EXTERN_MEMORY 3

typedef void *(*store_new_t)(void *engine, void *data, void (*finalizer)(void *));
typedef void *(*store_context_t)(void *store);
typedef void (*store_delete_t)(void *store);
typedef void (*store_limiter_t)(void *store, int64_t memory_size, int64_t table_elements, int64_t instances,
                                int64_t tables, int64_t memories);
typedef void (*store_epoch_callback_t)(void *store, void *callback, void *data, void (*finalizer)(void *));
typedef void (*set_epoch_deadline_t)(void *ctx, uint64_t ticks_beyond_current);
typedef void *(*set_wasi_t)(void *ctx, void *wasi_config);
typedef void *(*pre_instantiate_t)(const void *pre, void *ctx, wt_instance_t *out, void **trap);
typedef bool (*export_get_t)(void *ctx, const wt_instance_t *instance, const char *name, size_t name_len,
                             wt_extern_t *out);
typedef void *(*call_unchecked_t)(void *ctx, const void *func, wt_val_raw_t *args_and_results, size_t len,
                                  void **trap);
typedef uint8_t *(*memory_data_t)(const void *ctx, const void *memory);
typedef size_t (*memory_data_size_t)(const void *ctx, const void *memory);
typedef void *(*trap_new_t)(const char *message, size_t len);

static struct {
    store_new_t store_new;
    store_context_t store_context;
    store_delete_t store_delete;
    store_limiter_t store_limiter;
    store_epoch_callback_t store_epoch_callback;
    set_epoch_deadline_t set_epoch_deadline;
    set_wasi_t set_wasi;
    pre_instantiate_t pre_instantiate;
    export_get_t export_get;
    call_unchecked_t call_unchecked;
    memory_data_t memory_data;
    memory_data_size_t memory_data_size;
    trap_new_t trap_new;
    bool bound;
} api;

/* One instance: its Store and the exports the handler ABI uses (a Python object). */
typedef struct {
    PyObject_HEAD
    PyObject *watch; /* the epoch callback's environment: outlives the Store */
    bool in_call;    /* a call is running wasm (without the GIL): delete must wait */
    void *store;
    void *ctx;
    wt_instance_t instance;
    wt_extern_t alloc;
    wt_extern_t handler;
    wt_extern_t memory;
    uint32_t out; /* 8 bytes in linear memory where the handler leaves (response ptr, len) */
} handler_instance;

/* What `call` and `instantiate` report besides success (the first item of their tuple). */
enum {
    OK = 0,
    WASM_ERROR = 1,  /* (1, error pointer, trap pointer) */
    HANDLER_STATUS = 2, /* (2, nonzero status the handler returned) */
    NO_MEMORY = 3,   /* (3, message): the module's allocator returned 0 */
    BAD_GUEST = 4,   /* (4, message): a pointer or length from the guest is out of range */
    MISSING = 5,     /* (5, message): a required export is missing */
    BAD_HEADERS = 6, /* (6, message): the response's headers map is malformed */
};

static int bind_one(PyObject *addresses, const char *name, void **slot) {
    PyObject *value = PyDict_GetItemString(addresses, name);
    if (value == NULL) {
        PyErr_Format(PyExc_KeyError, "no address given for %s", name);
        return -1;
    }
    void *address = PyLong_AsVoidPtr(value);
    if (address == NULL) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "null address for %s", name);
        return -1;
    }
    *slot = address;
    return 0;
}

static PyObject *bind(PyObject *self, PyObject *args) {
    PyObject *addresses;
    Py_ssize_t extern_size, instance_size, val_size, func_size, memory_size;
    if (!PyArg_ParseTuple(args, "O!nnnnn", &PyDict_Type, &addresses, &extern_size, &instance_size, &val_size,
                          &func_size, &memory_size))
        return NULL;
    if (extern_size != sizeof(wt_extern_t) || instance_size != sizeof(wt_instance_t) ||
        val_size != sizeof(wt_val_raw_t) || func_size > 24 || memory_size > 24) {
        PyErr_Format(PyExc_RuntimeError,
                     "wasmtime's structure sizes differ from this build's (extern %zd/%zu, instance %zd/%zu, "
                     "val %zd/%zu)",
                     extern_size, sizeof(wt_extern_t), instance_size, sizeof(wt_instance_t), val_size,
                     sizeof(wt_val_raw_t));
        return NULL;
    }
    struct {
        const char *name;
        void **slot;
    } table[] = {
        {"wasmtime_store_new", (void **)&api.store_new},
        {"wasmtime_store_context", (void **)&api.store_context},
        {"wasmtime_store_delete", (void **)&api.store_delete},
        {"wasmtime_store_limiter", (void **)&api.store_limiter},
        {"wasmtime_store_epoch_deadline_callback", (void **)&api.store_epoch_callback},
        {"wasmtime_context_set_epoch_deadline", (void **)&api.set_epoch_deadline},
        {"wasmtime_context_set_wasi", (void **)&api.set_wasi},
        {"wasmtime_instance_pre_instantiate", (void **)&api.pre_instantiate},
        {"wasmtime_instance_export_get", (void **)&api.export_get},
        {"wasmtime_func_call_unchecked", (void **)&api.call_unchecked},
        {"wasmtime_memory_data", (void **)&api.memory_data},
        {"wasmtime_memory_data_size", (void **)&api.memory_data_size},
        {"wasmtime_trap_new", (void **)&api.trap_new},
    };
    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++)
        if (bind_one(addresses, table[i].name, table[i].slot) < 0)
            return NULL;
    api.bound = true;
    Py_RETURN_NONE;
}

static bool export_of(handler_instance *in, const char *name, uint8_t kind, wt_extern_t *out) {
    return api.export_get(in->ctx, &in->instance, name, strlen(name), out) && out->kind == kind;
}

/* Run a wasm function without the GIL; results replace the arguments in `vals`. */
static void *call_wasm(void *ctx, const void *func, wt_val_raw_t *vals, size_t len, void **trap) {
    void *error;
    Py_BEGIN_ALLOW_THREADS
    error = api.call_unchecked(ctx, func, vals, len, trap);
    Py_END_ALLOW_THREADS
    return error;
}

static PyTypeObject InstanceType;
static Py_ssize_t live_instances; /* Instances whose Store is not freed yet (tests, leaks) */

/* Free the Store (once), then drop the watch its epoch callback pointed at. */
static void release(handler_instance *in) {
    if (in->store != NULL) {
        void *store = in->store;
        in->store = NULL;
        in->ctx = NULL;
        api.store_delete(store);
        live_instances--;
    }
    Py_CLEAR(in->watch);
}

static PyObject *failure(handler_instance *in, int kind, void *error, void *trap) {
    release(in);
    Py_DECREF(in);
    return Py_BuildValue("(iKK)", kind, (unsigned long long)(uintptr_t)error, (unsigned long long)(uintptr_t)trap);
}

static PyObject *failure_message(handler_instance *in, int kind, const char *message) {
    release(in);
    Py_DECREF(in);
    return Py_BuildValue("(is)", kind, message);
}

/* instantiate(engine, pre, memory_limit, table_elements, instances, tables, memories,
 *             epoch_callback, watch, wasi_config, handler_name)
 * -> (0, Instance) | (1, error, trap) | (3 or 5, message) */
static PyObject *instantiate(PyObject *self, PyObject *args) {
    unsigned long long engine, pre, epoch_callback, wasi;
    long long memory_limit, table_elements, instances, tables, memories;
    PyObject *watch;
    const char *handler_name;
    if (!PyArg_ParseTuple(args, "KKLLLLLKOKs", &engine, &pre, &memory_limit, &table_elements, &instances, &tables,
                          &memories, &epoch_callback, &watch, &wasi, &handler_name))
        return NULL;
    if (!api.bound) {
        PyErr_SetString(PyExc_RuntimeError, "bind() has not been called");
        return NULL;
    }
    handler_instance *in = PyObject_New(handler_instance, &InstanceType);
    if (in == NULL)
        return NULL;
    /* Everything after the object header starts zeroed. */
    memset((char *)in + sizeof(PyObject), 0, sizeof(handler_instance) - sizeof(PyObject));
    Py_INCREF(watch);
    in->watch = watch;
    in->store = api.store_new((void *)(uintptr_t)engine, NULL, NULL);
    live_instances++;
    in->ctx = api.store_context(in->store);
    api.store_limiter(in->store, memory_limit, table_elements, instances, tables, memories);
    api.store_epoch_callback(in->store, (void *)(uintptr_t)epoch_callback, (void *)watch, NULL);
    api.set_epoch_deadline(in->ctx, (uint64_t)1 << 40);
    if (wasi) {
        void *error = api.set_wasi(in->ctx, (void *)(uintptr_t)wasi);
        if (error != NULL)
            return failure(in, WASM_ERROR, error, NULL);
    }
    void *trap = NULL;
    void *error;
    Py_BEGIN_ALLOW_THREADS /* a start function is wasm too */
    error = api.pre_instantiate((void *)(uintptr_t)pre, in->ctx, &in->instance, &trap);
    Py_END_ALLOW_THREADS
    if (error != NULL || trap != NULL)
        return failure(in, WASM_ERROR, error, trap);

    if (!export_of(in, "proxy_on_memory_allocate", WT_EXTERN_FUNC, &in->alloc) &&
        !export_of(in, "malloc", WT_EXTERN_FUNC, &in->alloc))
        return failure_message(in, MISSING, "proxy_on_memory_allocate (or malloc)");
    if (!export_of(in, handler_name, WT_EXTERN_FUNC, &in->handler))
        return failure_message(in, MISSING, handler_name);
    if (!export_of(in, "memory", WT_EXTERN_MEMORY, &in->memory))
        return failure_message(in, MISSING, "memory");

    wt_extern_t init;
    wt_val_raw_t vals[4];
    memset(vals, 0, sizeof(vals));
    if (export_of(in, "_initialize", WT_EXTERN_FUNC, &init)) {
        error = call_wasm(in->ctx, init.of, vals, 1, &trap);
        if (error != NULL || trap != NULL)
            return failure(in, WASM_ERROR, error, trap);
    }
    vals[0].i32 = 8;
    error = call_wasm(in->ctx, in->alloc.of, vals, 1, &trap);
    if (error != NULL || trap != NULL)
        return failure(in, WASM_ERROR, error, trap);
    in->out = (uint32_t)vals[0].i32;
    if (in->out == 0)
        return failure_message(in, NO_MEMORY, "the module's allocator returned 0");
    return Py_BuildValue("(iN)", OK, (PyObject *)in);
}

/* The instance `value` is, if it is a live one not in a call; else NULL with an error. */
static handler_instance *instance_arg(PyObject *value) {
    if (Py_TYPE(value) != &InstanceType) {
        PyErr_Format(PyExc_TypeError, "expected a _handler.Instance, got %.100s", Py_TYPE(value)->tp_name);
        return NULL;
    }
    handler_instance *in = (handler_instance *)value;
    if (in->store == NULL) {
        PyErr_SetString(PyExc_ValueError, "the instance has been deleted");
        return NULL;
    }
    if (in->in_call) {
        PyErr_SetString(PyExc_RuntimeError, "the instance is in a call on another thread");
        return NULL;
    }
    return in;
}

/* Whether guest memory [ptr, ptr + len) lies inside a memory of `size` bytes (no overflow). */
static inline bool in_range(uint64_t ptr, uint64_t len, uint64_t size) { return ptr <= size && len <= size - ptr; }

static inline uint32_t le32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v; /* wasm is little-endian, and so is every host this runs on (checked at build) */
}

/* The request as the handler ABI lays it out (abi/layotto_abi.yaml, layotto_http_handle):
 * five u32 lengths (method, path, query, headers, body), then those five byte strings; the
 * headers are a proxy-wasm map: u32 count, count x (u32 key length, u32 value length), then
 * each key and each value followed by a NUL. */
typedef struct {
    const char *method, *path, *query, *body;
    Py_ssize_t method_len, path_len, query_len, body_len;
    PyObject *headers; /* a tuple of (bytes, bytes) */
    Py_ssize_t count;
    uint64_t headers_len;
    uint64_t total;
} request_layout;

static int bytes_of(PyObject *value, const char **data, Py_ssize_t *len) {
    if (!PyBytes_Check(value)) {
        PyErr_Format(PyExc_TypeError, "expected bytes, got %.100s", Py_TYPE(value)->tp_name);
        return -1;
    }
    *data = PyBytes_AS_STRING(value);
    *len = PyBytes_GET_SIZE(value);
    return 0;
}

static int measure_request(PyObject *const *args, request_layout *r) {
    if (bytes_of(args[1], &r->method, &r->method_len) < 0 || bytes_of(args[2], &r->path, &r->path_len) < 0 ||
        bytes_of(args[3], &r->query, &r->query_len) < 0 || bytes_of(args[5], &r->body, &r->body_len) < 0)
        return -1;
    /* A tuple of the pairs: nothing can change them while wasm runs without the GIL
     * between measuring the request here and writing it out. */
    r->headers = PySequence_Tuple(args[4]);
    if (r->headers == NULL)
        return -1;
    r->count = PyTuple_GET_SIZE(r->headers);
    PyObject **pairs = &PyTuple_GET_ITEM(r->headers, 0);
    r->headers_len = 4 + 8 * (uint64_t)r->count;
    for (Py_ssize_t i = 0; i < r->count; i++) {
        PyObject *pair = pairs[i];
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_SetString(PyExc_TypeError, "each header must be a (bytes, bytes) tuple");
            return -1;
        }
        r->headers_len += (uint64_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 0)) +
                          (uint64_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 1)) + 2;
    }
    r->total = 20 + (uint64_t)r->method_len + (uint64_t)r->path_len + (uint64_t)r->query_len + r->headers_len +
               (uint64_t)r->body_len;
    return 0;
}

static inline uint8_t *put32(uint8_t *at, uint64_t value) {
    uint32_t v = (uint32_t)value;
    memcpy(at, &v, 4);
    return at + 4;
}

static inline uint8_t *put(uint8_t *at, const void *data, size_t len) {
    memcpy(at, data, len);
    return at + len;
}

static void write_request(const request_layout *r, uint8_t *at) {
    at = put32(at, r->method_len);
    at = put32(at, r->path_len);
    at = put32(at, r->query_len);
    at = put32(at, r->headers_len);
    at = put32(at, r->body_len);
    at = put(at, r->method, r->method_len);
    at = put(at, r->path, r->path_len);
    at = put(at, r->query, r->query_len);
    PyObject **pairs = &PyTuple_GET_ITEM(r->headers, 0);
    at = put32(at, r->count);
    for (Py_ssize_t i = 0; i < r->count; i++) {
        at = put32(at, PyBytes_GET_SIZE(PyTuple_GET_ITEM(pairs[i], 0)));
        at = put32(at, PyBytes_GET_SIZE(PyTuple_GET_ITEM(pairs[i], 1)));
    }
    for (Py_ssize_t i = 0; i < r->count; i++) {
        for (int j = 0; j < 2; j++) {
            PyObject *part = PyTuple_GET_ITEM(pairs[i], j);
            at = put(at, PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part));
            *at++ = 0;
        }
    }
    put(at, r->body, r->body_len);
}

/* The response's headers map as a list of (name, value) pairs; NULL with *error set to a
 * description when the guest's map is malformed (or NULL with a Python error). */
static PyObject *decode_headers(const uint8_t *map, uint64_t len, const char **error) {
    *error = NULL;
    if (len == 0 || (len == 1 && map[0] == 0))
        return PyList_New(0);
    if (len < 4) {
        *error = "map shorter than its count";
        return NULL;
    }
    uint64_t count = le32(map);
    if (count > (len - 4) / 10) { /* each entry: 8 bytes of lengths and 2 NULs at least */
        *error = "map count exceeds its size";
        return NULL;
    }
    PyObject *pairs = PyList_New((Py_ssize_t)count);
    if (pairs == NULL)
        return NULL;
    uint64_t pos = 4 + 8 * count;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t key_len = le32(map + 4 + 8 * i);
        uint64_t value_len = le32(map + 8 + 8 * i);
        if (pos + key_len + value_len + 2 > len) {
            Py_DECREF(pairs);
            *error = "map entry out of range";
            return NULL;
        }
        PyObject *pair = Py_BuildValue("(y#y#)", map + pos, (Py_ssize_t)key_len, map + pos + key_len + 1,
                                       (Py_ssize_t)value_len);
        if (pair == NULL) {
            Py_DECREF(pairs);
            return NULL;
        }
        PyList_SET_ITEM(pairs, (Py_ssize_t)i, pair);
        pos += key_len + value_len + 2;
    }
    return pairs;
}

#define WASM_FAILURE(error, trap)                                                                             \
    Py_BuildValue("(iKK)", WASM_ERROR, (unsigned long long)(uintptr_t)(error), (unsigned long long)(uintptr_t)(trap))

/* call(instance, method, path, query, headers, body)
 * -> (0, status, headers, body) | (1, error, trap) | (2, status) | (3|4, message) */
static PyObject *call(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "call(instance, method, path, query, headers, body)");
        return NULL;
    }
    handler_instance *in = instance_arg(args[0]);
    if (in == NULL)
        return NULL;
    request_layout r;
    memset(&r, 0, sizeof(r));
    PyObject *result = NULL;
    in->in_call = true; /* the GIL is released while wasm runs: no delete meanwhile */
    if (measure_request(args, &r) < 0)
        goto done;
    if (r.total > UINT32_MAX) {
        result = Py_BuildValue("(is)", BAD_GUEST, "request larger than 4 GiB");
        goto done;
    }

    wt_val_raw_t vals[4];
    memset(vals, 0, sizeof(vals));
    void *trap = NULL;
    vals[0].i32 = (int32_t)r.total;
    void *error = call_wasm(in->ctx, in->alloc.of, vals, 1, &trap);
    if (error != NULL || trap != NULL) {
        result = WASM_FAILURE(error, trap);
        goto done;
    }
    uint32_t ptr = (uint32_t)vals[0].i32;
    if (ptr == 0) {
        result = Py_BuildValue("(is)", NO_MEMORY, "the function's allocator returned 0 (out of memory)");
        goto done;
    }
    uint8_t *base = api.memory_data(in->ctx, in->memory.of);
    uint64_t msize = api.memory_data_size(in->ctx, in->memory.of);
    if (!in_range(ptr, r.total, msize)) {
        result = Py_BuildValue("(is)", BAD_GUEST, "the allocator returned a buffer outside linear memory");
        goto done;
    }
    write_request(&r, base + ptr);

    vals[0].i32 = (int32_t)ptr;
    vals[1].i32 = (int32_t)r.total;
    vals[2].i32 = (int32_t)in->out;
    vals[3].i32 = (int32_t)(in->out + 4);
    error = call_wasm(in->ctx, in->handler.of, vals, 4, &trap);
    if (error != NULL || trap != NULL) {
        result = WASM_FAILURE(error, trap);
        goto done;
    }
    if (vals[0].i32 != 0) {
        result = Py_BuildValue("(iI)", HANDLER_STATUS, (unsigned int)vals[0].i32);
        goto done;
    }

    base = api.memory_data(in->ctx, in->memory.of); /* the handler may have grown it */
    msize = api.memory_data_size(in->ctx, in->memory.of);
    if (!in_range(in->out, 8, msize)) {
        result = Py_BuildValue("(is)", BAD_GUEST, "the response slot is outside linear memory");
        goto done;
    }
    uint64_t resp = le32(base + in->out);
    uint64_t resp_len = le32(base + in->out + 4);
    if (resp_len < 12) {
        result = Py_BuildValue("(is)", BAD_GUEST, "the response is shorter than its 12-byte header");
        goto done;
    }
    if (!in_range(resp, resp_len, msize)) {
        result = Py_BuildValue("(is)", BAD_GUEST, "the response buffer is outside linear memory");
        goto done;
    }
    uint32_t status = le32(base + resp);
    uint64_t headers_len = le32(base + resp + 4);
    uint64_t body_len = le32(base + resp + 8);
    if (12 + headers_len + body_len > resp_len) {
        result = Py_BuildValue("(is)", BAD_GUEST, "response lengths exceed the response buffer");
        goto done;
    }
    const uint8_t *start = base + resp + 12;
    const char *malformed;
    PyObject *headers = decode_headers(start, headers_len, &malformed);
    if (headers == NULL) {
        if (malformed != NULL)
            result = Py_BuildValue("(is)", BAD_HEADERS, malformed);
        goto done;
    }
    result = Py_BuildValue("(iINy#)", OK, status, headers, start + headers_len, (Py_ssize_t)body_len);
done:
    in->in_call = false;
    Py_XDECREF(r.headers);
    return result;
}

/* Instance.addresses() -> (context, alloc func, handler func, memory, out, instance): for
 * the Python side (the Runtime ABI's view of memory, other exports, diagnostics). Valid
 * until delete(). */
static PyObject *instance_addresses(PyObject *self, PyObject *unused) {
    handler_instance *in = instance_arg(self);
    if (in == NULL)
        return NULL;
    return Py_BuildValue("(KKKKIK)", (unsigned long long)(uintptr_t)in->ctx,
                         (unsigned long long)(uintptr_t)in->alloc.of, (unsigned long long)(uintptr_t)in->handler.of,
                         (unsigned long long)(uintptr_t)in->memory.of, in->out,
                         (unsigned long long)(uintptr_t)&in->instance);
}

/* Instance.delete(): free the Store now. Deleting a deleted instance does nothing;
 * deleting one in a call (on another thread) is an error. */
static PyObject *instance_delete(PyObject *self, PyObject *unused) {
    handler_instance *in = (handler_instance *)self;
    if (in->in_call) {
        PyErr_SetString(PyExc_RuntimeError, "cannot delete an instance during its call");
        return NULL;
    }
    release(in);
    Py_RETURN_NONE;
}

static PyObject *instance_alive(PyObject *self, void *closure) {
    return PyBool_FromLong(((handler_instance *)self)->store != NULL);
}

static void instance_dealloc(PyObject *self) {
    release((handler_instance *)self); /* never deleted: freed with its last reference */
    PyObject_Free(self);
}

static PyMethodDef instance_methods[] = {
    {"addresses", instance_addresses, METH_NOARGS, "Raw addresses of the context and exports (until delete)."},
    {"delete", instance_delete, METH_NOARGS, "Free the Store now (a second delete does nothing)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef instance_getset[] = {
    {"alive", instance_alive, NULL, "Whether the Store still exists (not deleted).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject InstanceType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "layotto.host._handler.Instance",
    .tp_doc = "One Store with one handler-ABI instance; made by instantiate().",
    .tp_basicsize = sizeof(handler_instance),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = instance_dealloc,
    .tp_methods = instance_methods,
    .tp_getset = instance_getset,
};

static PyObject *live(PyObject *self, PyObject *unused) { return PyLong_FromSsize_t(live_instances); }

/* The two addresses at args[0] and args[1] (a store context and a function or memory),
   neither null; -1 with an exception set otherwise, or before bind(). */
static int address_pair(PyObject *const *args, void **ctx, void **of, const char *what) {
    if (!api.bound) {
        PyErr_SetString(PyExc_RuntimeError, "_handler.bind() has not been called");
        return -1;
    }
    *ctx = PyLong_AsVoidPtr(args[0]);
    *of = PyLong_AsVoidPtr(args[1]);
    if (PyErr_Occurred())
        return -1;
    if (*ctx == NULL || *of == NULL) {
        PyErr_Format(PyExc_ValueError, "null store context or %s", what);
        return -1;
    }
    return 0;
}

/* call_i32(ctx, func, arg): a wasm function of one i32 to one i32 (the guest allocator,
   called from host functions) without ctypes' conversions. The GIL is released as for any
   wasm call: a guest allocator that loops must not stop the other threads until its
   deadline. The result as an unsigned int, or (error pointer, trap pointer) when it failed. */
static PyObject *call_i32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "call_i32(ctx, func, arg)");
        return NULL;
    }
    void *ctx, *func;
    if (address_pair(args, &ctx, &func, "function") < 0)
        return NULL;
    long arg = PyLong_AsLong(args[2]);
    if (arg == -1 && PyErr_Occurred())
        return NULL;
    wt_val_raw_t vals[1];
    memset(vals, 0, sizeof vals);
    vals[0].i32 = (int32_t)arg;
    void *trap = NULL;
    void *error = call_wasm(ctx, func, vals, 1, &trap);
    if (error != NULL || trap != NULL)
        return Py_BuildValue("(NN)", PyLong_FromVoidPtr(error), PyLong_FromVoidPtr(trap));
    return PyLong_FromUnsignedLong((uint32_t)vals[0].i32);
}

/* memory_size(ctx, memory): a linear memory's size in bytes. */
static PyObject *memory_size(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "memory_size(ctx, memory)");
        return NULL;
    }
    void *ctx, *memory;
    if (address_pair(args, &ctx, &memory, "memory") < 0)
        return NULL;
    return PyLong_FromSize_t(api.memory_data_size(ctx, memory));
}

/* --- host functions: the Runtime ABI's imports, called from wasm --------------------------
 *
 * A host function is a Python callable of the import's i32 parameters that returns the
 * result (an int) or, to trap the guest, the trap's message (a str). wasmtime calls
 * `host_callback` with the raw values and the function's `host_env`; the arguments reach
 * Python as ints, pointers and lengths unsigned, and no ctypes object is made per call
 * (through a ctypes callback the crossing and the argument conversions cost about 2 µs). */

#define MAX_HOST_PARAMS 32

/* Time in host functions, per thread and per nesting depth: `host_seconds[d]` adds up the
 * wall-clock time of the host calls made at depth `d` (1: from a function called from
 * Python; 2: from a function invoked from inside such a host call; ...), each measured with
 * the GIL held. A function's run reads the counter of the depth below it when it begins and
 * ends (`host_clock_now`, in run_begin and run_end): the difference is the time its own host
 * calls took, whatever functions they called in turn; the rest of the run was wasm. Deeper
 * calls share the last counter (a run that deep just sees its time in wasm overstated). */
#define MAX_HOST_DEPTH 32
static _Thread_local uint32_t host_depth;
static _Thread_local double host_seconds[MAX_HOST_DEPTH + 1];

static inline double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline double host_clock_now(void) {
    return host_seconds[host_depth < MAX_HOST_DEPTH ? host_depth + 1 : MAX_HOST_DEPTH];
}


/* --- CPU accounting of function runs ------------------------------------------------------
 *
 * Each thread keeps a stack of the function runs in progress on it (a run nests in another
 * when a host call of the outer one invokes the inner one). The time between marks goes to
 * the run on top, so a run's own time excludes those nested in it, and is charged to its
 * function's share (host/scheduler.py Share.charge) when it ends, or sooner at a checkpoint
 * (a call with a CPU limit, from its deadline callback). A thread meters with the clock its
 * outermost run asks for: the wall clock on the event loop (which does nothing else during
 * an inline call, and reads it far more cheaply), the thread's CPU clock on workers (not the
 * wait for the GIL). Runs nested deeper than MAX_RUNS are counted to the deepest frame (the
 * interpreter's recursion limit stops any real nesting long before). */

#define MAX_RUNS 128

typedef struct {
    PyObject *share; /* a strong reference while the run lasts */
    double own;      /* its own time so far, up to `run_mark` */
    double charged;  /* what was charged to the share already (checkpoints) */
    double began;    /* the clock when it began */
    double host0;    /* host_clock_now() when it began */
} run_frame;

static _Thread_local run_frame runs[MAX_RUNS];
static _Thread_local uint32_t run_depth; /* may exceed MAX_RUNS: see above */
static _Thread_local double run_mark;
static _Thread_local clockid_t run_clock_id;
static PyObject *charge_name; /* "charge" */

static inline double run_clock(void) {
    struct timespec ts;
    clock_gettime(run_clock_id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int charge(PyObject *share, double seconds) {
    if (seconds <= 0)
        return 0;
    PyObject *value = PyFloat_FromDouble(seconds);
    if (value == NULL)
        return -1;
    PyObject *done = PyObject_CallMethodOneArg(share, charge_name, value);
    Py_DECREF(value);
    Py_XDECREF(done);
    return done != NULL ? 0 : -1;
}

/* run_begin(share, wall_clock): a run of share's function begins on this thread. */
static PyObject *run_begin(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "run_begin(share, wall_clock)");
        return NULL;
    }
    if (run_depth == 0)
        run_clock_id = PyObject_IsTrue(args[1]) ? CLOCK_MONOTONIC : CLOCK_THREAD_CPUTIME_ID;
    double now = run_clock();
    if (run_depth > 0 && run_depth <= MAX_RUNS)
        runs[run_depth - 1].own += now - run_mark;
    if (run_depth < MAX_RUNS) {
        run_frame *f = &runs[run_depth];
        f->share = Py_NewRef(args[0]);
        f->own = f->charged = 0.0;
        f->began = now;
        f->host0 = host_clock_now();
    }
    run_depth++;
    run_mark = now;
    Py_RETURN_NONE;
}

/* run_end() -> (own, in_wasm): the run on top ends; its own time (charged to its share
   now) and the part of its whole time not spent in its host calls (its time in wasm). */
static PyObject *run_end(PyObject *self, PyObject *unused) {
    if (run_depth == 0) {
        PyErr_SetString(PyExc_RuntimeError, "run_end() without a run");
        return NULL;
    }
    double now = run_clock();
    run_depth--;
    if (run_depth >= MAX_RUNS) { /* counted to the deepest frame, which goes on */
        run_mark = now;
        return Py_BuildValue("(dd)", 0.0, 0.0);
    }
    run_frame *f = &runs[run_depth];
    f->own += now - run_mark;
    run_mark = now;
    double wasm = (now - f->began) - (host_clock_now() - f->host0);
    PyObject *share = f->share;
    f->share = NULL;
    int failed = charge(share, f->own - f->charged);
    Py_DECREF(share);
    if (failed)
        return NULL;
    return Py_BuildValue("(dd)", f->own, wasm > 0 ? wasm : 0.0);
}

/* run_checkpoint(): charge the run on top what it used so far (its quota is checked
   against it). */
static PyObject *run_checkpoint(PyObject *self, PyObject *unused) {
    if (run_depth == 0 || run_depth > MAX_RUNS)
        Py_RETURN_NONE;
    run_frame *f = &runs[run_depth - 1];
    double now = run_clock();
    f->own += now - run_mark;
    run_mark = now;
    double due = f->own - f->charged;
    f->charged = f->own;
    if (charge(f->share, due) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *runs_in_progress(PyObject *self, PyObject *unused) { return PyLong_FromUnsignedLong(run_depth); }

typedef struct {
    PyObject *fn;
    uint32_t arity;
    uint32_t unsigned_mask; /* bit i set: parameter i is read as an unsigned 32-bit value */
} host_env;

static void *host_trap(const char *fallback) {
    /* The pending exception (or `fallback`) as a trap; the exception is cleared. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *text = value != NULL ? PyObject_Str(value) : NULL;
    PyErr_Clear();
    const char *message = fallback;
    Py_ssize_t len = (Py_ssize_t)strlen(fallback);
    if (text != NULL) {
        const char *utf8 = PyUnicode_AsUTF8AndSize(text, &len);
        if (utf8 != NULL)
            message = utf8;
        else {
            PyErr_Clear();
            len = (Py_ssize_t)strlen(fallback);
        }
    }
    void *trap = api.trap_new(message, (size_t)len);
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return trap;
}

static void *host_callback(void *env, void *caller, wt_val_raw_t *vals, size_t count) {
    (void)caller;
    (void)count;
    host_env *h = env;
    PyGILState_STATE gil = PyGILState_Ensure();
    uint32_t depth = ++host_depth < MAX_HOST_DEPTH ? host_depth : MAX_HOST_DEPTH;
    double began = monotonic();
    PyObject *argv[MAX_HOST_PARAMS];
    uint32_t made = 0;
    for (; made < h->arity; made++) {
        argv[made] = (h->unsigned_mask >> made) & 1 ? PyLong_FromUnsignedLong((uint32_t)vals[made].i32)
                                                     : PyLong_FromLong(vals[made].i32);
        if (argv[made] == NULL)
            break;
    }
    PyObject *result = made == h->arity ? PyObject_Vectorcall(h->fn, argv, made, NULL) : NULL;
    for (uint32_t i = 0; i < made; i++)
        Py_DECREF(argv[i]);
    void *trap = NULL;
    if (result == NULL) {
        trap = host_trap("host function failed");
    } else if (PyLong_Check(result)) {
        long value = PyLong_AsLong(result);
        if (value == -1 && PyErr_Occurred())
            trap = host_trap("host function result out of range");
        else
            vals[0].i32 = (int32_t)value;
    } else if (PyUnicode_Check(result)) {
        Py_ssize_t len;
        const char *message = PyUnicode_AsUTF8AndSize(result, &len);
        trap = message != NULL ? api.trap_new(message, (size_t)len) : host_trap("host function trapped");
    } else {
        PyErr_Format(PyExc_TypeError, "host function returned %.100s, not int or str", Py_TYPE(result)->tp_name);
        trap = host_trap("host function returned neither int nor str");
    }
    Py_XDECREF(result);
    host_seconds[depth] += monotonic() - began;
    host_depth--;
    PyGILState_Release(gil);
    return trap;
}

static void host_env_free(void *env) {
    host_env *h = env;
    if (h == NULL)
        return;
    if (Py_IsInitialized() && !_Py_IsFinalizing()) {
        PyGILState_STATE gil = PyGILState_Ensure();
        Py_DECREF(h->fn);
        PyGILState_Release(gil);
    } /* else: the interpreter is gone, and the reference with it */
    PyMem_RawFree(h);
}

/* host_function(fn, arity, unsigned_mask) -> (callback, env, finalizer): the addresses to
   give wasmtime_linker_define_func_unchecked. The env holds a reference to `fn` until
   wasmtime calls the finalizer (when the definition is gone). */
static PyObject *host_function(PyObject *self, PyObject *args) {
    PyObject *fn;
    unsigned int arity, mask;
    if (!PyArg_ParseTuple(args, "OII", &fn, &arity, &mask))
        return NULL;
    if (!api.bound) {
        PyErr_SetString(PyExc_RuntimeError, "_handler.bind() has not been called");
        return NULL;
    }
    if (!PyCallable_Check(fn) || arity > MAX_HOST_PARAMS) {
        PyErr_Format(PyExc_ValueError, "host_function: a callable of at most %d parameters", MAX_HOST_PARAMS);
        return NULL;
    }
    host_env *h = PyMem_RawMalloc(sizeof *h);
    if (h == NULL)
        return PyErr_NoMemory();
    Py_INCREF(fn);
    h->fn = fn;
    h->arity = arity;
    h->unsigned_mask = mask;
    return Py_BuildValue("(NNN)", PyLong_FromVoidPtr((void *)host_callback), PyLong_FromVoidPtr(h),
                         PyLong_FromVoidPtr((void *)host_env_free));
}

/* --- guest memory for the Runtime ABI's host functions -----------------------------------
 *
 * What host functions do with a caller's linear memory, as one `Guest` object per function
 * instance (made with the instance's store context, memory and allocator addresses): read
 * a range (as bytes, or as a UTF-8 str), check out-pointers, write a range, and give the
 * guest a result (allocate it with the guest's allocator, copy it in, and write its address
 * and length to two out-pointers). Every range is checked against the memory's size at the
 * time; a guest pointer or length outside it is refused, never followed. The methods have
 * the signatures of host/abi_context.py's AbiContext methods, which they replace for such
 * instances. A refusal raises what `fail(code, a, b)` (given by the host, Python) returns:
 * the same AbiStatus the Python methods raise, so the guest sees the same status and the
 * function's log the same message. */

typedef struct {
    PyObject_HEAD
    void *ctx, *memory, *alloc;
    PyObject *fail;
    PyObject *owner; /* what holds the Store (a reference), or NULL: see guest_alive */
    uint64_t max_key, max_value;
} guest_object;

static PyObject *ctx_name; /* "ctx" */

/* Whether the Store is still there: every method refuses to touch a deleted one. The owner
   is a _handler.Instance (its store pointer), or an object whose `ctx` attribute becomes
   None when it frees the Store (host/fastcall.py RawStore). */
static bool guest_alive(guest_object *g) {
    PyObject *owner = g->owner;
    if (owner == NULL)
        return true;
    bool alive;
    if (Py_IS_TYPE(owner, &InstanceType)) {
        alive = ((handler_instance *)owner)->store != NULL;
    } else {
        PyObject *ctx = PyObject_GetAttr(owner, ctx_name);
        if (ctx == NULL)
            return false;
        alive = ctx != Py_None;
        Py_DECREF(ctx);
    }
    if (!alive)
        PyErr_SetString(PyExc_RuntimeError, "guest memory of a deleted instance");
    return alive;
}

/* fail(code, a, b)'s codes, with what a and b are. */
enum {
    FAIL_OUTSIDE = 0,   /* a range outside linear memory: (ptr, length) */
    FAIL_LIMIT = 1,     /* a read longer than allowed: (length, limit) */
    FAIL_UTF8 = 2,      /* a str that is not UTF-8 */
    FAIL_TOO_LARGE = 3, /* a result to give larger than allowed: (length, limit) */
    FAIL_GIVE = 4,      /* giving failed: (GIVE_*, None) */
    FAIL_ALLOCATOR = 5, /* the guest allocator failed or trapped: (error address, trap address) */
};

/* What giving can fail for besides an out-pointer and the allocator itself. */
enum {
    GIVE_NO_MEMORY = 2,  /* the guest allocator returned 0 */
    GIVE_BAD_BUFFER = 3, /* the allocator returned a buffer outside linear memory */
};

static PyTypeObject GuestType;

/* The start of every Guest method: the Store is still there and the call has between `least`
   and `most` arguments (`usage` names them in the TypeError). */
static bool guest_ready(guest_object *g, Py_ssize_t nargs, Py_ssize_t least, Py_ssize_t most, const char *usage) {
    if (!guest_alive(g))
        return false;
    if (nargs < least || nargs > most) {
        PyErr_Format(PyExc_TypeError, "Guest.%s", usage);
        return false;
    }
    return true;
}

static PyObject *guest_fail(guest_object *g, int code, PyObject *a, PyObject *b) {
    PyObject *exc = PyObject_CallFunction(g->fail, "iOO", code, a != NULL ? a : Py_None, b != NULL ? b : Py_None);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *guest_fail_n(guest_object *g, int code, uint64_t a, uint64_t b) {
    PyObject *x = PyLong_FromUnsignedLongLong(a), *y = PyLong_FromUnsignedLongLong(b);
    PyObject *result = x != NULL && y != NULL ? guest_fail(g, code, x, y) : NULL;
    Py_XDECREF(x);
    Py_XDECREF(y);
    return result;
}

/* A guest pointer or length: a Python int in [0, 2**32); -1 for anything else (which every
   check then refuses as outside linear memory). */
static int64_t guest_u32(PyObject *value) {
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return v < 0 || v > UINT32_MAX ? -1 : v;
}

/* The linear memory at [ptr, ptr + len) of args[0] and args[1], checked against `limit`
   and the memory's size; NULL with the failure raised. */
static const uint8_t *guest_range(guest_object *g, PyObject *const *args, uint64_t limit, int64_t *len_out) {
    int64_t ptr = guest_u32(args[0]), len = guest_u32(args[1]);
    if (len >= 0 && (uint64_t)len > limit) {
        guest_fail_n(g, FAIL_LIMIT, (uint64_t)len, limit);
        return NULL;
    }
    if (ptr < 0 || len < 0 || !in_range((uint64_t)ptr, (uint64_t)len, api.memory_data_size(g->ctx, g->memory))) {
        guest_fail(g, FAIL_OUTSIDE, args[0], args[1]);
        return NULL;
    }
    *len_out = len;
    return api.memory_data(g->ctx, g->memory) + ptr;
}

/* read(ptr, len, limit=max_value) -> bytes */
static PyObject *guest_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    guest_object *g = (guest_object *)self;
    if (!guest_ready(g, nargs, 2, 3, "read(ptr, len, limit=max_value)"))
        return NULL;
    uint64_t limit = g->max_value;
    if (nargs == 3) {
        limit = PyLong_AsUnsignedLongLong(args[2]);
        if (limit == (uint64_t)-1 && PyErr_Occurred())
            return NULL;
    }
    int64_t len;
    const uint8_t *at = guest_range(g, args, limit, &len);
    return at != NULL ? PyBytes_FromStringAndSize((const char *)at, (Py_ssize_t)len) : NULL;
}

/* read_str(ptr, len) -> str: a name or key (at most max_key bytes), strict UTF-8. */
static PyObject *guest_read_str(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    guest_object *g = (guest_object *)self;
    if (!guest_ready(g, nargs, 2, 2, "read_str(ptr, len)"))
        return NULL;
    int64_t len;
    const uint8_t *at = guest_range(g, args, g->max_key, &len);
    if (at == NULL)
        return NULL;
    PyObject *text = PyUnicode_DecodeUTF8((const char *)at, (Py_ssize_t)len, NULL);
    if (text == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
        return guest_fail(g, FAIL_UTF8, NULL, NULL);
    }
    return text;
}

/* check_writable(ptr, len): the range is inside linear memory. */
static PyObject *guest_check_writable(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    guest_object *g = (guest_object *)self;
    if (!guest_ready(g, nargs, 2, 2, "check_writable(ptr, len)"))
        return NULL;
    int64_t len;
    if (guest_range(g, args, UINT64_MAX, &len) == NULL)
        return NULL;
    Py_RETURN_NONE;
}

/* check_out(ptr, ...): each ptr is an out-pointer, 4 bytes of linear memory. */
static PyObject *guest_check_out(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    guest_object *g = (guest_object *)self;
    if (!guest_alive(g))
        return NULL;
    uint64_t size = api.memory_data_size(g->ctx, g->memory);
    for (Py_ssize_t i = 0; i < nargs; i++) {
        int64_t ptr = guest_u32(args[i]);
        if (ptr < 0 || !in_range((uint64_t)ptr, 4, size)) {
            PyObject *four = PyLong_FromLong(4);
            PyObject *result = four != NULL ? guest_fail(g, FAIL_OUTSIDE, args[i], four) : NULL;
            Py_XDECREF(four);
            return result;
        }
    }
    Py_RETURN_NONE;
}

/* write(ptr, data): data (any bytes-like object) copied to [ptr, ptr + len(data)). */
static PyObject *guest_write(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    guest_object *g = (guest_object *)self;
    if (!guest_ready(g, nargs, 2, 2, "write(ptr, data)"))
        return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    int64_t ptr = guest_u32(args[0]);
    PyObject *result = NULL;
    if (ptr < 0 || !in_range((uint64_t)ptr, (uint64_t)data.len, api.memory_data_size(g->ctx, g->memory))) {
        PyObject *len = PyLong_FromSsize_t(data.len);
        if (len != NULL)
            guest_fail(g, FAIL_OUTSIDE, args[0], len);
        Py_XDECREF(len);
    } else {
        memcpy(api.memory_data(g->ctx, g->memory) + ptr, data.buf, (size_t)data.len);
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&data);
    return result;
}

/* Give `data` (bytes) through the out-pointers: 0, a GIVE_* code, or -1 with the failure
   raised (an out-pointer outside linear memory, the allocator's own failure). The allocator
   runs without the GIL, as any wasm; `data` is an immutable bytes object our caller holds
   throughout. */
static int give_bytes(guest_object *g, PyObject *ptr_obj, PyObject *len_obj, PyObject *data) {
    const char *bytes = PyBytes_AS_STRING(data);
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    PyObject *out[2] = {ptr_obj, len_obj};
    PyObject *checked = guest_check_out((PyObject *)g, out, 2);
    if (checked == NULL)
        return -1;
    Py_DECREF(checked);
    int64_t ptr_ptr = guest_u32(ptr_obj), len_ptr = guest_u32(len_obj);
    if ((uint64_t)len > UINT32_MAX)
        return GIVE_BAD_BUFFER;
    uint32_t addr = 0;
    if (len > 0) {
        wt_val_raw_t vals[1];
        memset(vals, 0, sizeof vals);
        vals[0].i32 = (int32_t)len;
        void *trap = NULL;
        void *error = call_wasm(g->ctx, g->alloc, vals, 1, &trap);
        if (error != NULL || trap != NULL) {
            PyObject *e = PyLong_FromVoidPtr(error), *t = PyLong_FromVoidPtr(trap);
            if (e != NULL && t != NULL)
                guest_fail(g, FAIL_ALLOCATOR, e, t);
            Py_XDECREF(e);
            Py_XDECREF(t);
            return -1;
        }
        addr = (uint32_t)vals[0].i32;
        if (addr == 0)
            return GIVE_NO_MEMORY;
        /* The allocator may have grown the memory. */
        if (!in_range(addr, (uint64_t)len, api.memory_data_size(g->ctx, g->memory)))
            return GIVE_BAD_BUFFER;
        memcpy(api.memory_data(g->ctx, g->memory) + addr, bytes, (size_t)len);
    }
    uint8_t *base = api.memory_data(g->ctx, g->memory); /* memory only grows: the out-pointers hold */
    uint32_t n = (uint32_t)len;
    memcpy(base + ptr_ptr, &addr, 4);
    memcpy(base + len_ptr, &n, 4);
    return 0;
}

/* give(ptr_ptr, len_ptr, data, *, checked=False): data (bytes-like, at most max_value
   bytes) in a buffer from the guest's allocator (none for empty data: address 0), its
   address and length written to the out-pointers (u32 each). Both out-pointers are
   checked here whatever `checked` says. */
static PyObject *guest_give(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    guest_object *g = (guest_object *)self;
    if (!guest_alive(g))
        return NULL;
    Py_ssize_t nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs != 3 || nkw > 1 ||
        (nkw == 1 && !PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0))) ||
        (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "checked") != 0)) {
        PyErr_SetString(PyExc_TypeError, "give(ptr_ptr, len_ptr, data, *, checked=False)");
        return NULL;
    }
    PyObject *data = PyBytes_CheckExact(args[2]) ? Py_NewRef(args[2]) : PyBytes_FromObject(args[2]);
    if (data == NULL)
        return NULL;
    PyObject *result = NULL;
    uint64_t len = (uint64_t)PyBytes_GET_SIZE(data);
    if (len > g->max_value) {
        guest_fail_n(g, FAIL_TOO_LARGE, len, g->max_value);
    } else {
        int code = give_bytes(g, args[0], args[1], data);
        if (code == 0)
            result = Py_NewRef(Py_None);
        else if (code > 0)
            guest_fail_n(g, FAIL_GIVE, (uint64_t)code, 0);
    }
    Py_DECREF(data);
    return result;
}

static void guest_dealloc(PyObject *self) {
    Py_XDECREF(((guest_object *)self)->fail);
    Py_XDECREF(((guest_object *)self)->owner);
    Py_TYPE(self)->tp_free(self);
}

static PyMethodDef guest_methods[] = {
    {"read", (PyCFunction)(void (*)(void))guest_read, METH_FASTCALL, "Read [ptr, ptr + len) as bytes."},
    {"read_str", (PyCFunction)(void (*)(void))guest_read_str, METH_FASTCALL, "Read a UTF-8 name or key."},
    {"check_writable", (PyCFunction)(void (*)(void))guest_check_writable, METH_FASTCALL,
     "Refuse a range outside linear memory."},
    {"check_out", (PyCFunction)(void (*)(void))guest_check_out, METH_FASTCALL,
     "Refuse out-pointers without 4 bytes of linear memory."},
    {"write", (PyCFunction)(void (*)(void))guest_write, METH_FASTCALL, "Write data at ptr."},
    {"give", (PyCFunction)(void (*)(void))guest_give, METH_FASTCALL | METH_KEYWORDS,
     "Give the guest data in a buffer of its own allocator, through two out-pointers."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject GuestType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "layotto.host._handler.Guest",
    .tp_doc = "A function instance's linear memory, for the Runtime ABI's host functions; made by guest().",
    .tp_basicsize = sizeof(guest_object),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = guest_dealloc,
    .tp_methods = guest_methods,
};

/* guest(ctx, memory, alloc, fail, max_key, max_value, owner=None) -> Guest. With `owner`
   (what holds the Store `ctx` is: a _handler.Instance, or an object with a `ctx` attribute
   that becomes None when the Store is freed), the Guest keeps it and refuses to work once
   the Store is gone. */
static PyObject *guest(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *ctx, *memory;
    if (nargs != 6 && nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "guest(ctx, memory, alloc, fail, max_key, max_value, owner=None)");
        return NULL;
    }
    PyObject *owner = nargs == 7 ? args[6] : Py_None;
    if (address_pair(args, &ctx, &memory, "memory") < 0)
        return NULL;
    void *alloc = PyLong_AsVoidPtr(args[2]);
    if (alloc == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "guest: null allocator");
        return NULL;
    }
    if (!PyCallable_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "guest: fail must be callable");
        return NULL;
    }
    uint64_t max_key = PyLong_AsUnsignedLongLong(args[4]), max_value = PyLong_AsUnsignedLongLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    guest_object *g = PyObject_New(guest_object, &GuestType);
    if (g == NULL)
        return NULL;
    g->ctx = ctx;
    g->memory = memory;
    g->alloc = alloc;
    g->fail = Py_NewRef(args[3]);
    g->owner = owner != Py_None ? Py_NewRef(owner) : NULL;
    g->max_key = max_key;
    g->max_value = max_value;
    return (PyObject *)g;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS, "Give the module the wasmtime C API's function addresses."},
    {"instantiate", instantiate, METH_VARARGS, "Create a Store with one handler instance."},
    {"call", (PyCFunction)(void (*)(void))call, METH_FASTCALL, "Run the handler on one request."},
    {"live", live, METH_NOARGS, "How many Instances have a Store not yet freed."},
    {"call_i32", (PyCFunction)(void (*)(void))call_i32, METH_FASTCALL,
     "Call a wasm function of one i32 to one i32, with the GIL held."},
    {"memory_size", (PyCFunction)(void (*)(void))memory_size, METH_FASTCALL, "A linear memory's size in bytes."},
    {"guest", (PyCFunction)(void (*)(void))guest, METH_FASTCALL,
     "The Runtime ABI's view of a function instance's linear memory (a Guest)."},
    {"host_function", host_function, METH_VARARGS, "A Python callable as a wasmtime unchecked host function."},
    {"run_begin", (PyCFunction)(void (*)(void))run_begin, METH_FASTCALL,
     "A run of a function begins on this thread (its CPU time is metered)."},
    {"run_end", run_end, METH_NOARGS, "The run on top ends: (own time, time in wasm); its own time is charged."},
    {"run_checkpoint", run_checkpoint, METH_NOARGS, "Charge the run on top what it used so far."},
    {"runs_in_progress", runs_in_progress, METH_NOARGS, "How many runs are in progress on this thread."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_handler",
    .m_doc = "The handler ABI's hot path (see host/_handler.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__handler(void) {
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "wasm linear memory is little-endian; this file reads it in place"
#endif
    if (PyType_Ready(&InstanceType) < 0 || PyType_Ready(&GuestType) < 0)
        return NULL;
    charge_name = PyUnicode_InternFromString("charge");
    ctx_name = PyUnicode_InternFromString("ctx");
    if (charge_name == NULL || ctx_name == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&InstanceType);
    if (PyModule_AddObject(m, "Instance", (PyObject *)&InstanceType) < 0) {
        Py_DECREF(&InstanceType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
