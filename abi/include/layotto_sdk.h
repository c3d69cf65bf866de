/*
 * layotto_sdk.h: friendly C wrappers over the Runtime ABI's host functions
 * (abi/layotto_abi.yaml; the raw imports are declared in the generated layotto_abi.h).
 *
 * Link abi/c/layotto_sdk.c. With the HTTP handler SDK (layotto.h + abi/c/layotto.c):
 *
 *     clang --target=wasm32-wasi -O2 -mexec-model=reactor -Wl,--strip-debug -I abi/include \
 *           -o fn.wasm fn.c abi/c/layotto.c abi/c/layotto_sdk.c
 *
 * Conventions
 *   - Every function returns the host's status: LAYOTTO_OK (0) or one of the LAYOTTO_*
 *     codes of layotto_abi.h (LAYOTTO_NOT_FOUND for an absent key, LAYOTTO_PERMISSION_DENIED
 *     when the pod does not grant the capability, ...). lt_status_name() names a code.
 *   - String arguments are NUL-terminated C strings. A NULL string is passed as "".
 *   - Results the host returns (values, responses, etags, maps) are buffers the host
 *     allocated in guest memory through the exported `proxy_on_memory_allocate`; the
 *     caller owns them and releases them with free(). On LAYOTTO_OK such a result is never
 *     NULL and is always followed by a NUL byte (not counted in its length), so a text
 *     value can be used as a C string directly. On any other status the out-pointers are
 *     set to NULL / 0 and there is nothing to free.
 *   - Out-pointers for lengths may be NULL when the caller does not need the length.
 */
#ifndef LAYOTTO_SDK_H
#define LAYOTTO_SDK_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h> /* free() for the results */

#include "layotto_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- logging, time, randomness (always granted) ---- */

enum {
    LT_LOG_TRACE = 0,
    LT_LOG_DEBUG = 1,
    LT_LOG_INFO = 2,
    LT_LOG_WARN = 3,
    LT_LOG_ERROR = 4,
    LT_LOG_CRITICAL = 5
};

/* Writes one line to the function's log (`layotto logs`). */
int32_t lt_log(int32_t level, const char *msg);
/* printf-style lt_log (lines over 4 KiB are truncated). */
int32_t lt_logf(int32_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Nanoseconds since the Unix epoch. */
int32_t lt_time_now(int64_t *ns);
/* Fills buf[0..len) with cryptographically secure random bytes. */
int32_t lt_random(void *buf, size_t len);

/* ---- state (capability "state") ---- */

/* Reads `key` of state store `store`. LAYOTTO_NOT_FOUND when absent. */
int32_t lt_state_get(const char *store, const char *key, char **value, size_t *value_len);
/* lt_state_get that also returns the item's etag (a C string; free() it). */
int32_t lt_state_get_etag(const char *store, const char *key, char **value, size_t *value_len,
                          char **etag);
/* Stores value[0..value_len) under `key` (unconditionally). */
int32_t lt_state_save(const char *store, const char *key, const void *value, size_t value_len);
/* Stores only if the current etag is `etag` (else LAYOTTO_CAS_MISMATCH); NULL or "" stores
 * unconditionally. The new etag is returned through `new_etag` when it is not NULL. */
int32_t lt_state_save_etag(const char *store, const char *key, const void *value,
                           size_t value_len, const char *etag, char **new_etag);
/* Deletes `key`; LAYOTTO_NOT_FOUND when it did not exist. */
int32_t lt_state_delete(const char *store, const char *key);
/* Deletes `key` only if its etag is `etag` (LAYOTTO_CAS_MISMATCH otherwise). */
int32_t lt_state_delete_etag(const char *store, const char *key, const char *etag);
/* Reads several keys at once. The result is a map (see lt_map_next) of the keys found to
 * their values; absent keys are left out. */
int32_t lt_state_get_bulk(const char *store, const char *const *keys, size_t nkeys, char **map,
                          size_t *map_len);

/* One operation of lt_state_transaction. */
typedef struct {
    int kind; /* LT_STATE_UPSERT or LT_STATE_DELETE */
    const char *key;
    const void *value; /* upsert only */
    size_t value_len;
    const char *etag;  /* NULL or "": unconditional */
} lt_state_op;
enum { LT_STATE_UPSERT = 0, LT_STATE_DELETE = 1 };

/* Applies every operation or none. */
int32_t lt_state_transaction(const char *store, const lt_state_op *ops, size_t nops);

/* ---- invocation (capability "invoke") ---- */

/* Calls function (or application) `id`: an HTTP POST of data[0..len) to its path
 * "/<method>" ("/" for an empty method). Returns its response body. A 404 answer is
 * LAYOTTO_NOT_FOUND, any other error status LAYOTTO_INTERNAL_FAILURE. */
int32_t lt_invoke(const char *id, const char *method, const void *data, size_t len, char **out,
                  size_t *out_len);

/* ---- pub/sub (capability "pubsub") ---- */

/* Publishes data[0..len) on `topic` of pub/sub component `pubsub`. */
int32_t lt_publish(const char *pubsub, const char *topic, const void *data, size_t len);

/* ---- configuration (capability "configuration") ---- */

/* Reads configuration `key` of store `store`; `group` and `label` may be NULL.
 * LAYOTTO_NOT_FOUND when absent. */
int32_t lt_config_get(const char *store, const char *group, const char *label, const char *key,
                      char **value, size_t *value_len);

/* ---- locks (capability "lock") ---- */

/* Tries to take lock `resource` for `owner` for `expire_s` (> 0) seconds. *acquired is 1 when
 * taken, 0 when another owner holds it. */
int32_t lt_try_lock(const char *store, const char *resource, const char *owner, int32_t expire_s,
                    int *acquired);

enum { LT_UNLOCK_SUCCESS = 0, LT_UNLOCK_NOT_EXIST = 1, LT_UNLOCK_BELONGS_TO_OTHERS = 2 };
/* Releases lock `resource` held by `owner`; *result is one of LT_UNLOCK_*. */
int32_t lt_unlock(const char *store, const char *resource, const char *owner, int *result);

/* ---- sequencer (capability "sequencer") ---- */

/* The next id for `key` of sequencer `store`: strictly increasing. */
int32_t lt_next_id(const char *store, const char *key, int64_t *id);

/* ---- secrets (capability "secrets") ---- */

/* Secret `name` of store `store` as a map (see lt_map_next) of its keys to values. */
int32_t lt_get_secret(const char *store, const char *name, char **map, size_t *map_len);
/* One value of secret `name`: the entry `key`, or, with key NULL, the entry named `name`
 * (or the only entry). LAYOTTO_NOT_FOUND when there is no such entry. */
int32_t lt_get_secret_value(const char *store, const char *name, const char *key, char **value,
                            size_t *value_len);

/* ---- maps (proxy-wasm serialization: secrets, bulk state results) ---- */

/* Iterates over a serialized map:
 *     lt_map_iter it = LT_MAP_ITER(map, map_len);
 *     const char *k, *v; size_t kl, vl;
 *     while (lt_map_next(&it, &k, &kl, &v, &vl)) { ... }
 * Keys and values point into the map and are NUL-terminated. A malformed map ends the
 * iteration early and sets it.error. */
typedef struct {
    const uint8_t *map;
    size_t len;
    uint32_t index;
    uint32_t count;
    size_t offset;
    int error;
} lt_map_iter;
#define LT_MAP_ITER(m, l) ((lt_map_iter){(const uint8_t *)(m), (l), 0, 0, 0, 0})
int lt_map_next(lt_map_iter *it, const char **key, size_t *key_len, const char **value,
                size_t *value_len);
/* Looks up `key` in a serialized map: 1 and the value, or 0. */
int lt_map_get(const void *map, size_t map_len, const char *key, const char **value,
               size_t *value_len);

/* ---- status codes ---- */

/* "OK", "NOT_FOUND", ... ("UNKNOWN" for a code the table does not define). */
const char *lt_status_name(int32_t status);

#ifdef __cplusplus
}
#endif

#endif /* LAYOTTO_SDK_H */
