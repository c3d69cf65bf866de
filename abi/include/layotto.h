/*
 * layotto.h: the C guest SDK for Layotto function modules (Runtime ABI, abi/http.md).
 *
 * A function module is a WebAssembly reactor. Write one function,
 *
 *     int lt_handle(const lt_request *req, lt_response *resp);
 *
 * and link abi/c/layotto.c, which exports `layotto_http_handle` and
 * `proxy_on_memory_allocate` and calls lt_handle once per HTTP request:
 *
 *     clang --target=wasm32-wasi -O2 -mexec-model=reactor -I abi/include \
 *           -o fn.wasm fn.c abi/c/layotto.c
 *
 * Lifetimes: every lt_str reachable from `req` (and every value returned by the
 * lookup functions) points into the request buffer or SDK scratch memory and is valid only
 * until lt_handle returns. Strings are not NUL-terminated in general (header names and values
 * are, because the wire format stores a NUL after each of them).
 *
 * lt_handle returns 0 on success; any other value makes the host answer 500. The response
 * starts as status 200, no headers, empty body.
 */
#ifndef LAYOTTO_H
#define LAYOTTO_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A byte string that is not necessarily NUL-terminated. */
typedef struct {
    const char *ptr;
    uint32_t len;
} lt_str;

/* One decoded HTTP request. `headers` is the proxy-wasm serialized map exactly as the host
 * sent it (already validated by the SDK): use lt_request_header or lt_header_next. */
typedef struct {
    lt_str method;
    lt_str path;  /* without the query string */
    lt_str query; /* without the '?' */
    lt_str body;
    const uint8_t *headers;
    uint32_t headers_len;
    uint32_t header_count;
} lt_request;

/* The response under construction (opaque; one per instance, reused across requests). */
typedef struct lt_response lt_response;

/* Status codes returned by layotto_http_handle (proxy-wasm's WasmResult values). */
enum {
    LT_OK = 0,
    LT_BAD_ARGUMENT = 2,
    LT_PARSE_FAILURE = 4,
    LT_INVALID_MEMORY_ACCESS = 6,
    LT_INTERNAL_FAILURE = 10
};

/* ---- implemented by the function ---- */

int lt_handle(const lt_request *req, lt_response *resp);

/* ---- request ---- */

/* Looks up a header by name (ASCII case-insensitive; the host sends lower-case names).
 * Returns 1 and sets *out to the first match's value, or returns 0. */
int lt_request_header(const lt_request *req, const char *name, lt_str *out);

/* Iterates over the request headers in order:
 *     lt_header_iter it = LT_HEADER_ITER(req);
 *     lt_str name, value;
 *     while (lt_header_next(&it, &name, &value)) { ... }  */
typedef struct {
    const lt_request *req;
    uint32_t index;
    uint32_t offset; /* of the next entry's key in req->headers */
} lt_header_iter;
#define LT_HEADER_ITER(r) ((lt_header_iter){(r), 0, 0})
int lt_header_next(lt_header_iter *it, lt_str *name, lt_str *value);

/* Looks up a query parameter (`a=b&c=d`; `+` and %XX in names and values are decoded).
 * A parameter without '=' has an empty value. Returns 1 and sets *out to the first match's
 * decoded value, or returns 0. */
int lt_query_param(const lt_request *req, const char *name, lt_str *out);

/* ---- response ---- (the int functions return 0, or -1 when out of memory; after a failure
 * the SDK answers the request with a non-zero status, i.e. the host's 500) */

void lt_response_status(lt_response *resp, uint32_t status);
int lt_response_header(lt_response *resp, const char *name, const char *value);
int lt_response_header_str(lt_response *resp, lt_str name, lt_str value);
int lt_response_write(lt_response *resp, const void *data, uint32_t len);
int lt_response_print(lt_response *resp, const char *s);
int lt_response_printf(lt_response *resp, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* ---- small helpers ---- */

/* 1 if s equals the NUL-terminated string c. */
int lt_str_eq(lt_str s, const char *c);
/* Parses a non-empty run of decimal digits (no sign, no spaces) into *out; returns 1, or 0
 * if s is not such a number or it overflows. */
int lt_str_to_u64(lt_str s, uint64_t *out);

#ifdef __cplusplus
}
#endif

#endif /* LAYOTTO_H */
