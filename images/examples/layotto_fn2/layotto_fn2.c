/*
 * layotto_fn2: Layotto's FaaS demo function_2 written against Layotto's own ABI (module
 * `env`, proxy-wasm callbacks). Built as a reactor (`_initialize`, no `_start`), the way the
 * Rust module of Layotto's demo has no command entry. It uses no Layotto SDK.
 *
 * id `id_2`. The request body is the book name (layotto_fn1 passes it as the invoke
 * parameter); it answers proxy_get_state("state_demo", name), e.g. "100".
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ENV(name) __attribute__((import_module("env"), import_name(#name)))
#define EXPORT(name) __attribute__((export_name(#name)))

enum { BUFFER_HTTP_REQUEST_BODY = 0, BUFFER_HTTP_RESPONSE_BODY = 1, BUFFER_CALL_DATA = 8 };
enum { LOG_ERROR = 4 };
enum { ACTION_CONTINUE = 0 };

ENV(proxy_log) int32_t proxy_log(int32_t level, const char *msg, size_t len);
ENV(proxy_get_buffer_bytes)
int32_t proxy_get_buffer_bytes(int32_t type, int32_t start, int32_t max_size, char **data,
                               size_t *len);
ENV(proxy_set_buffer_bytes)
int32_t proxy_set_buffer_bytes(int32_t type, int32_t start, int32_t size, const char *data,
                               size_t len);
ENV(proxy_get_state)
int32_t proxy_get_state(const char *store, size_t store_len, const char *key, size_t key_len,
                        char **value, size_t *value_len);

static const char ID[] = "id_2";

EXPORT(proxy_abi_version_0_2_0) void proxy_abi_version_0_2_0(void) {}

/* DO NOT MODIFY: names the function. */
EXPORT(proxy_get_id) void proxy_get_id(void) {
    proxy_set_buffer_bytes(BUFFER_CALL_DATA, 0, 0, ID, sizeof ID - 1);
}

EXPORT(proxy_on_memory_allocate) void *proxy_on_memory_allocate(size_t size) {
    return malloc(size);
}
EXPORT(malloc) void *export_malloc(size_t size) { return malloc(size); }
EXPORT(free) void export_free(void *p) { free(p); }

EXPORT(proxy_on_context_create) void proxy_on_context_create(int32_t context_id,
                                                             int32_t root_context_id) {
    (void)context_id;
    (void)root_context_id;
}

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

static void fail(const char *msg) {
    proxy_log(LOG_ERROR, msg, strlen(msg));
    append(msg, strlen(msg));
}

EXPORT(proxy_on_request_body)
int32_t proxy_on_request_body(int32_t context_id, int32_t body_size, int32_t end_of_stream) {
    (void)context_id;
    (void)end_of_stream;
    char *name = NULL;
    size_t name_len = 0;
    if (proxy_get_buffer_bytes(BUFFER_HTTP_REQUEST_BODY, 0, body_size, &name, &name_len) != 0) {
        fail("failed to read the request body");
        return ACTION_CONTINUE;
    }
    char *value = NULL;
    size_t value_len = 0;
    if (proxy_get_state("state_demo", 10, name, name_len, &value, &value_len) != 0) {
        fail("GetState failed");
    } else {
        append(value, value_len);
    }
    free(value);
    free(name);
    return ACTION_CONTINUE;
}
