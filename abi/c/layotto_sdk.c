/*
 * layotto_sdk.c: friendly wrappers over the Runtime ABI (see abi/include/layotto_sdk.h).
 *
 * Buffers the host returns are allocated through the module's `proxy_on_memory_allocate`
 * export, which reserves one extra byte and sets it to NUL (abi/c/layotto.c defines it; this
 * file carries a weak copy for modules that use the ABI without the HTTP handler SDK), so
 * every result is NUL-terminated without a copy.
 */
#include "layotto_sdk.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- allocator export (weak: abi/c/layotto.c's definition wins when both are linked) ---- */

__attribute__((weak, export_name("proxy_on_memory_allocate"))) uint32_t
proxy_on_memory_allocate(uint32_t size) {
    if (size == UINT32_MAX) {
        return 0;
    }
    uint8_t *p = malloc((size_t)size + 1); /* + a NUL after whatever the host writes */
    if (p != NULL) {
        p[size] = 0;
    }
    return (uint32_t)(uintptr_t)p;
}

/* ---- helpers ---- */

#define U8(s) ((const uint8_t *)(s))

static inline const char *nz(const char *s) { return s ? s : ""; }

/* A C string as the ABI's (ptr, len). */
#define STR(s) U8(nz(s)), strlen(nz(s))

static inline void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Hands a host-allocated result to the caller: on OK a non-NULL, NUL-terminated buffer
 * (an empty result, which the host returns as address 0, becomes ""); on failure nothing. */
static int32_t take(int32_t rc, uint8_t *p, size_t n, char **out, size_t *out_len) {
    if (rc == LAYOTTO_OK && p == NULL) {
        p = calloc(1, 1);
        n = 0;
        if (p == NULL) {
            rc = LAYOTTO_INVALID_MEMORY_ACCESS;
        }
    }
    if (rc != LAYOTTO_OK) {
        free(p);
        p = NULL;
        n = 0;
    }
    if (out != NULL) {
        *out = (char *)p;
    } else {
        free(p);
    }
    if (out_len != NULL) {
        *out_len = n;
    }
    return rc;
}

/* ---- logging, time, randomness ---- */

int32_t lt_log(int32_t level, const char *msg) { return layotto_log(level, STR(msg)); }

int32_t lt_logf(int32_t level, const char *fmt, ...) {
    char small[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) {
        return LAYOTTO_BAD_ARGUMENT;
    }
    if ((size_t)n < sizeof small) {
        return layotto_log(level, U8(small), (size_t)n);
    }
    if (n > 4096) {
        n = 4096;
    }
    char *big = malloc((size_t)n + 1);
    if (big == NULL) {
        return layotto_log(level, U8(small), sizeof small - 1);
    }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    int32_t rc = layotto_log(level, U8(big), (size_t)n);
    free(big);
    return rc;
}

int32_t lt_time_now(int64_t *ns) { return layotto_time_now(ns); }

int32_t lt_random(void *buf, size_t len) { return layotto_random((uint8_t *)buf, len); }

/* ---- state ---- */

int32_t lt_state_get(const char *store, const char *key, char **value, size_t *value_len) {
    return lt_state_get_etag(store, key, value, value_len, NULL);
}

int32_t lt_state_get_etag(const char *store, const char *key, char **value, size_t *value_len,
                          char **etag) {
    uint8_t *v = NULL, *e = NULL;
    size_t vl = 0, el = 0;
    int32_t rc = layotto_state_get(STR(store), STR(key), &v, &vl, &e, &el);
    int32_t rc2 = take(rc, e, el, etag, NULL);
    if (rc == LAYOTTO_OK && rc2 != LAYOTTO_OK) {
        rc = rc2;
    }
    rc = take(rc, v, vl, value, value_len);
    if (rc != LAYOTTO_OK && etag != NULL && *etag != NULL) {
        free(*etag);
        *etag = NULL;
    }
    return rc;
}

int32_t lt_state_save(const char *store, const char *key, const void *value, size_t value_len) {
    return lt_state_save_etag(store, key, value, value_len, NULL, NULL);
}

int32_t lt_state_save_etag(const char *store, const char *key, const void *value,
                           size_t value_len, const char *etag, char **new_etag) {
    uint8_t *e = NULL;
    size_t el = 0;
    int32_t rc = layotto_state_save(STR(store), STR(key), U8(value ? value : ""), value_len,
                                    STR(etag), &e, &el);
    return take(rc, e, el, new_etag, NULL);
}

int32_t lt_state_delete(const char *store, const char *key) {
    return lt_state_delete_etag(store, key, NULL);
}

int32_t lt_state_delete_etag(const char *store, const char *key, const char *etag) {
    return layotto_state_delete(STR(store), STR(key), STR(etag));
}

int32_t lt_state_get_bulk(const char *store, const char *const *keys, size_t nkeys, char **map,
                          size_t *map_len) {
    /* A list is a map with empty values: count, count x (klen, 0), then key NUL NUL. */
    size_t size = 4 + 8 * nkeys;
    for (size_t i = 0; i < nkeys; i++) {
        size += strlen(nz(keys[i])) + 2;
    }
    uint8_t *list = malloc(size);
    if (list == NULL) {
        return take(LAYOTTO_INVALID_MEMORY_ACCESS, NULL, 0, map, map_len);
    }
    wr32(list, (uint32_t)nkeys);
    uint8_t *data = list + 4 + 8 * nkeys;
    for (size_t i = 0; i < nkeys; i++) {
        size_t kl = strlen(nz(keys[i]));
        wr32(list + 4 + 8 * i, (uint32_t)kl);
        wr32(list + 8 + 8 * i, 0);
        memcpy(data, nz(keys[i]), kl);
        data[kl] = 0;
        data[kl + 1] = 0;
        data += kl + 2;
    }
    uint8_t *r = NULL;
    size_t rl = 0;
    int32_t rc = layotto_state_get_bulk(STR(store), list, size, &r, &rl);
    free(list);
    return take(rc, r, rl, map, map_len);
}

int32_t lt_state_transaction(const char *store, const lt_state_op *ops, size_t nops) {
    size_t size = 4;
    for (size_t i = 0; i < nops; i++) {
        size += 16 + strlen(nz(ops[i].key)) + strlen(nz(ops[i].etag)) +
                (ops[i].kind == LT_STATE_UPSERT ? ops[i].value_len : 0);
    }
    uint8_t *buf = malloc(size), *p;
    if (buf == NULL) {
        return LAYOTTO_INVALID_MEMORY_ACCESS;
    }
    wr32(buf, (uint32_t)nops);
    p = buf + 4;
    for (size_t i = 0; i < nops; i++) {
        const lt_state_op *op = &ops[i];
        size_t kl = strlen(nz(op->key)), el = strlen(nz(op->etag));
        size_t vl = op->kind == LT_STATE_UPSERT ? op->value_len : 0;
        wr32(p, (uint32_t)op->kind);
        wr32(p + 4, (uint32_t)kl);
        wr32(p + 8, (uint32_t)vl);
        wr32(p + 12, (uint32_t)el);
        p += 16;
        memcpy(p, nz(op->key), kl);
        p += kl;
        if (vl) {
            memcpy(p, op->value, vl);
        }
        p += vl;
        memcpy(p, nz(op->etag), el);
        p += el;
    }
    int32_t rc = layotto_state_transaction(STR(store), buf, size);
    free(buf);
    return rc;
}

/* ---- invocation, pub/sub, configuration ---- */

int32_t lt_invoke(const char *id, const char *method, const void *data, size_t len, char **out,
                  size_t *out_len) {
    uint8_t *r = NULL;
    size_t rl = 0;
    int32_t rc = layotto_invoke(STR(id), STR(method), U8(data ? data : ""), len, &r, &rl);
    return take(rc, r, rl, out, out_len);
}

int32_t lt_publish(const char *pubsub, const char *topic, const void *data, size_t len) {
    return layotto_publish(STR(pubsub), STR(topic), U8(data ? data : ""), len);
}

int32_t lt_config_get(const char *store, const char *group, const char *label, const char *key,
                      char **value, size_t *value_len) {
    uint8_t *v = NULL;
    size_t vl = 0;
    int32_t rc = layotto_config_get(STR(store), STR(group), STR(label), STR(key), &v, &vl);
    return take(rc, v, vl, value, value_len);
}

/* ---- locks, sequencer ---- */

int32_t lt_try_lock(const char *store, const char *resource, const char *owner, int32_t expire_s,
                    int *acquired) {
    int32_t got = 0;
    int32_t rc = layotto_try_lock(STR(store), STR(resource), STR(owner), expire_s, &got);
    if (acquired != NULL) {
        *acquired = rc == LAYOTTO_OK ? (int)got : 0;
    }
    return rc;
}

int32_t lt_unlock(const char *store, const char *resource, const char *owner, int *result) {
    int32_t r = 0;
    int32_t rc = layotto_unlock(STR(store), STR(resource), STR(owner), &r);
    if (result != NULL) {
        *result = rc == LAYOTTO_OK ? (int)r : -1;
    }
    return rc;
}

int32_t lt_next_id(const char *store, const char *key, int64_t *id) {
    int64_t v = 0;
    int32_t rc = layotto_next_id(STR(store), STR(key), &v);
    if (id != NULL) {
        *id = rc == LAYOTTO_OK ? v : 0;
    }
    return rc;
}

/* ---- secrets ---- */

int32_t lt_get_secret(const char *store, const char *name, char **map, size_t *map_len) {
    uint8_t *r = NULL;
    size_t rl = 0;
    int32_t rc = layotto_get_secret(STR(store), STR(name), &r, &rl);
    return take(rc, r, rl, map, map_len);
}

int32_t lt_get_secret_value(const char *store, const char *name, const char *key, char **value,
                            size_t *value_len) {
    char *map = NULL;
    size_t ml = 0;
    int32_t rc = lt_get_secret(store, name, &map, &ml);
    const char *v = NULL;
    size_t vl = 0;
    if (rc == LAYOTTO_OK && !lt_map_get(map, ml, key ? key : nz(name), &v, &vl)) {
        rc = LAYOTTO_NOT_FOUND;
        if (key == NULL) { /* a secret with a single entry: that entry */
            lt_map_iter it = LT_MAP_ITER(map, ml);
            const char *k;
            size_t kl;
            if (lt_map_next(&it, &k, &kl, &v, &vl) && it.count == 1) {
                rc = LAYOTTO_OK;
            }
        }
    }
    char *copy = NULL;
    if (rc == LAYOTTO_OK) {
        copy = malloc(vl + 1);
        if (copy == NULL) {
            rc = LAYOTTO_INVALID_MEMORY_ACCESS;
        } else {
            memcpy(copy, v, vl);
            copy[vl] = 0;
        }
    }
    free(map);
    if (value != NULL) {
        *value = copy;
    } else {
        free(copy);
    }
    if (value_len != NULL) {
        *value_len = rc == LAYOTTO_OK ? vl : 0;
    }
    return rc;
}

/* ---- maps ---- */

int lt_map_next(lt_map_iter *it, const char **key, size_t *key_len, const char **value,
                size_t *value_len) {
    if (it->error || it->map == NULL) {
        return 0;
    }
    if (it->offset == 0) { /* first call: read and check the count */
        if (it->len < 4) {
            it->error = it->len != 0;
            return 0;
        }
        it->count = rd32(it->map);
        if ((uint64_t)4 + 8 * (uint64_t)it->count > it->len) {
            it->error = 1;
            return 0;
        }
        it->offset = 4 + 8 * (size_t)it->count;
    }
    if (it->index >= it->count) {
        return 0;
    }
    const uint8_t *sizes = it->map + 4 + 8 * (size_t)it->index;
    uint64_t kl = rd32(sizes), vl = rd32(sizes + 4);
    uint64_t end = (uint64_t)it->offset + kl + 1 + vl + 1;
    if (end > it->len || it->map[it->offset + kl] != 0 || it->map[end - 1] != 0) {
        it->error = 1;
        return 0;
    }
    *key = (const char *)it->map + it->offset;
    *value = *key + kl + 1;
    if (key_len != NULL) {
        *key_len = (size_t)kl;
    }
    if (value_len != NULL) {
        *value_len = (size_t)vl;
    }
    it->offset = (size_t)end;
    it->index++;
    return 1;
}

int lt_map_get(const void *map, size_t map_len, const char *key, const char **value,
               size_t *value_len) {
    lt_map_iter it = LT_MAP_ITER(map, map_len);
    const char *k, *v;
    size_t kl, vl, want = strlen(nz(key));
    while (lt_map_next(&it, &k, &kl, &v, &vl)) {
        if (kl == want && memcmp(k, nz(key), kl) == 0) {
            *value = v;
            if (value_len != NULL) {
                *value_len = vl;
            }
            return 1;
        }
    }
    return 0;
}

/* ---- status codes ---- */

const char *lt_status_name(int32_t status) {
    switch (status) {
    case LAYOTTO_OK: return "OK";
    case LAYOTTO_NOT_FOUND: return "NOT_FOUND";
    case LAYOTTO_BAD_ARGUMENT: return "BAD_ARGUMENT";
    case LAYOTTO_SERIALIZATION_FAILURE: return "SERIALIZATION_FAILURE";
    case LAYOTTO_PARSE_FAILURE: return "PARSE_FAILURE";
    case LAYOTTO_INVALID_MEMORY_ACCESS: return "INVALID_MEMORY_ACCESS";
    case LAYOTTO_EMPTY: return "EMPTY";
    case LAYOTTO_CAS_MISMATCH: return "CAS_MISMATCH";
    case LAYOTTO_INTERNAL_FAILURE: return "INTERNAL_FAILURE";
    case LAYOTTO_UNIMPLEMENTED: return "UNIMPLEMENTED";
    case LAYOTTO_PERMISSION_DENIED: return "PERMISSION_DENIED";
    case LAYOTTO_LIMIT_EXCEEDED: return "LIMIT_EXCEEDED";
    default: return "UNKNOWN";
    }
}
