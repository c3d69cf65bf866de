/*
 * layotto_fn1: Layotto's FaaS demo function_1 written against Layotto's own ABI (module
 * `env`, proxy-wasm callbacks), as the TinyGo module in Layotto's demo/faas is: a WASI
 * command (`_start`) exporting proxy_abi_version_0_2_0, proxy_get_id, malloc,
 * proxy_on_memory_allocate and the proxy_on_* callbacks. It uses no Layotto SDK.
 *
 * id `id_1`. Per request the host calls proxy_on_context_create, proxy_on_request_headers
 * and proxy_on_request_body; the body (the query string when the request has no body) is
 * `name=book1`. It calls proxy_invoke_service("id_2", "", "book1") and appends
 * "There are <n> inventories for book1." to the response body (buffer 1).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ENV(name) __attribute__((import_module("env"), import_name(#name)))
#define EXPORT(name) __attribute__((export_name(#name)))

/* proxy-wasm buffer types (Layotto uses 8 for the function's id, "call data"). */
enum { BUFFER_HTTP_REQUEST_BODY = 0, BUFFER_HTTP_RESPONSE_BODY = 1, BUFFER_CALL_DATA = 8 };
enum { LOG_INFO = 2, LOG_ERROR = 4 };
enum { ACTION_CONTINUE = 0 };

ENV(proxy_log) int32_t proxy_log(int32_t level, const char *msg, size_t len);
ENV(proxy_get_buffer_bytes)
int32_t proxy_get_buffer_bytes(int32_t type, int32_t start, int32_t max_size, char **data,
                               size_t *len);
ENV(proxy_set_buffer_bytes)
int32_t proxy_set_buffer_bytes(int32_t type, int32_t start, int32_t size, const char *data,
                               size_t len);
ENV(proxy_set_effective_context) int32_t proxy_set_effective_context(int32_t context_id);
ENV(proxy_invoke_service)
int32_t proxy_invoke_service(const char *id, size_t id_len, const char *method,
                             size_t method_len, const char *param, size_t param_len,
                             char **result, size_t *result_len);

static const char ID[] = "id_1";

/* ---- exports every Layotto function has ---- */

EXPORT(proxy_abi_version_0_2_0) void proxy_abi_version_0_2_0(void) {}

/* DO NOT MODIFY (as Layotto's demo says): names the function. */
EXPORT(proxy_get_id) void proxy_get_id(void) {
    proxy_set_buffer_bytes(BUFFER_CALL_DATA, 0, 0, ID, sizeof ID - 1);
}

EXPORT(proxy_on_memory_allocate) void *proxy_on_memory_allocate(size_t size) {
    return malloc(size);
}

/* mosn's host allocates through `malloc`: export libc's (and `free`) under those names. */
EXPORT(malloc) void *export_malloc(size_t size) { return malloc(size); }
EXPORT(free) void export_free(void *p) { free(p); }

/* ---- contexts ---- */

EXPORT(proxy_on_context_create) void proxy_on_context_create(int32_t context_id,
                                                             int32_t root_context_id) {
    (void)context_id;
    (void)root_context_id;
}

EXPORT(proxy_on_vm_start) int32_t proxy_on_vm_start(int32_t root_context_id, int32_t size) {
    (void)root_context_id;
    (void)size;
    return 1;
}

EXPORT(proxy_on_configure) int32_t proxy_on_configure(int32_t root_context_id, int32_t size) {
    (void)root_context_id;
    (void)size;
    return 1;
}

EXPORT(proxy_on_done) int32_t proxy_on_done(int32_t context_id) {
    (void)context_id;
    return 1;
}

EXPORT(proxy_on_delete) void proxy_on_delete(int32_t context_id) { (void)context_id; }

/* ---- the request ---- */

EXPORT(proxy_on_request_headers)
int32_t proxy_on_request_headers(int32_t context_id, int32_t headers, int32_t end_of_stream) {
    (void)context_id;
    (void)headers;
    (void)end_of_stream;
    return ACTION_CONTINUE;
}

static void append(const char *s, size_t n) {
    proxy_set_buffer_bytes(BUFFER_HTTP_RESPONSE_BODY, INT32_MAX, 0, s, n);
}

static void append_str(const char *s) { append(s, strlen(s)); }

/* The value of `name` in a `k=v&k=v` string (no decoding, as the demo's getQueryParam). */
static int query_param(const char *q, size_t n, const char *name, const char **v, size_t *vl) {
    size_t nl = strlen(name), i = 0;
    while (i < n) {
        size_t end = i;
        while (end < n && q[end] != '&') {
            end++;
        }
        if (end - i > nl && memcmp(q + i, name, nl) == 0 && q[i + nl] == '=') {
            *v = q + i + nl + 1;
            *vl = end - i - nl - 1;
            return 1;
        }
        i = end + 1;
    }
    return 0;
}

EXPORT(proxy_on_request_body)
int32_t proxy_on_request_body(int32_t context_id, int32_t body_size, int32_t end_of_stream) {
    (void)end_of_stream;
    proxy_set_effective_context(context_id);
    /* 1. the request body */
    char *body = NULL;
    size_t len = 0;
    if (proxy_get_buffer_bytes(BUFFER_HTTP_REQUEST_BODY, 0, body_size, &body, &len) != 0) {
        append_str("failed to read the request body");
        return ACTION_CONTINUE;
    }
    /* 2. the book name */
    const char *name;
    size_t name_len;
    if (!query_param(body, len, "name", &name, &name_len)) {
        static const char msg[] = "param name not found";
        proxy_log(LOG_ERROR, msg, sizeof msg - 1);
        append_str(msg);
        free(body);
        return ACTION_CONTINUE;
    }
    /* 3. ask function_2 */
    char *inventories = NULL;
    size_t inv_len = 0;
    int32_t rc = proxy_invoke_service("id_2", 4, "", 0, name, name_len, &inventories, &inv_len);
    if (rc != 0) {
        static const char msg[] = "invoke service failed";
        proxy_log(LOG_ERROR, msg, sizeof msg - 1);
        append_str(msg);
    } else {
        /* 4. the answer */
        append_str("There are ");
        append(inventories, inv_len);
        append_str(" inventories for ");
        append(name, name_len);
        append_str(".");
    }
    free(inventories);
    free(body);
    return ACTION_CONTINUE;
}

int main(void) { return 0; }
