/* Generated from abi/layotto_abi.yaml by `python -m layotto.abi.spec --write`. Do not edit. */
#ifndef LAYOTTO_ABI_H
#define LAYOTTO_ABI_H

#include <stddef.h>
#include <stdint.h>

#define LAYOTTO_ABI_VERSION 1

/* Status codes returned by every host function. */
#define LAYOTTO_OK 0  /* success */
#define LAYOTTO_NOT_FOUND 1  /* no such key, function, secret or lock */
#define LAYOTTO_BAD_ARGUMENT 2  /* an argument is malformed (bad UTF-8, unknown level, ...) */
#define LAYOTTO_SERIALIZATION_FAILURE 3  /* a result could not be encoded */
#define LAYOTTO_PARSE_FAILURE 4  /* an encoded argument (map, list, transaction) could not be decoded */
#define LAYOTTO_INVALID_MEMORY_ACCESS 6  /* a pointer or length lies outside the guest's linear memory, or the guest allocator failed */
#define LAYOTTO_EMPTY 7  /* nothing to return */
#define LAYOTTO_CAS_MISMATCH 8  /* an etag did not match (optimistic concurrency) */
#define LAYOTTO_INTERNAL_FAILURE 10  /* the component failed (backend unreachable, ...) */
#define LAYOTTO_UNIMPLEMENTED 12  /* the component does not support the call */
#define LAYOTTO_PERMISSION_DENIED 13  /* the function's pod does not grant this capability */
#define LAYOTTO_LIMIT_EXCEEDED 14  /* a value, key or result exceeds the host's limits */

#define LAYOTTO_MAX_KEY 1024
#define LAYOTTO_MAX_VALUE 4194304

/* Write a line to the function's log at `level` (0 trace .. 5 critical). Capability: log. */
__attribute__((import_module("layotto"), import_name("layotto_log")))
int32_t layotto_log(int32_t level, const uint8_t *msg_ptr, size_t msg_len);

/* Nanoseconds since the Unix epoch. Capability: time. */
__attribute__((import_module("layotto"), import_name("layotto_time_now")))
int32_t layotto_time_now(int64_t *out_ns_ptr);

/* Fill `buf` with random bytes. Capability: random. */
__attribute__((import_module("layotto"), import_name("layotto_random")))
int32_t layotto_random(uint8_t *buf_ptr, size_t buf_len);

/* Read `key` from state store `store`; NOT_FOUND when absent. Returns the value and its etag. Capability: state. */
__attribute__((import_module("layotto"), import_name("layotto_state_get")))
int32_t layotto_state_get(const uint8_t *store_ptr, size_t store_len, const uint8_t *key_ptr, size_t key_len, uint8_t **value_ptr_ptr, size_t *value_len_ptr, uint8_t **etag_ptr_ptr, size_t *etag_len_ptr);

/* Read several keys (a serialized list: map with empty values). Returns a map key → value; absent keys are left out. Capability: state. */
__attribute__((import_module("layotto"), import_name("layotto_state_get_bulk")))
int32_t layotto_state_get_bulk(const uint8_t *store_ptr, size_t store_len, const uint8_t *keys_ptr, size_t keys_len, uint8_t **result_ptr_ptr, size_t *result_len_ptr);

/* Store `value` under `key`. A non-empty `etag` makes the write conditional (CAS_MISMATCH). Returns the new etag. Capability: state. */
__attribute__((import_module("layotto"), import_name("layotto_state_save")))
int32_t layotto_state_save(const uint8_t *store_ptr, size_t store_len, const uint8_t *key_ptr, size_t key_len, const uint8_t *value_ptr, size_t value_len, const uint8_t *etag_ptr, size_t etag_len, uint8_t **new_etag_ptr_ptr, size_t *new_etag_len_ptr);

/* Delete `key`; a non-empty `etag` makes it conditional. NOT_FOUND when absent. Capability: state. */
__attribute__((import_module("layotto"), import_name("layotto_state_delete")))
int32_t layotto_state_delete(const uint8_t *store_ptr, size_t store_len, const uint8_t *key_ptr, size_t key_len, const uint8_t *etag_ptr, size_t etag_len);

/* Apply operations atomically. Encoding: u32 count, then per op u32 kind (0 upsert, 1 delete), u32 key_len, u32 value_len, u32 etag_len, then key, value, etag bytes. Capability: state. */
__attribute__((import_module("layotto"), import_name("layotto_state_transaction")))
int32_t layotto_state_transaction(const uint8_t *store_ptr, size_t store_len, const uint8_t *ops_ptr, size_t ops_len);

/* Call function (or application) `id` with `method` and `data`; returns the response body. Another function on the node is called in process. Capability: invoke. */
__attribute__((import_module("layotto"), import_name("layotto_invoke")))
int32_t layotto_invoke(const uint8_t *id_ptr, size_t id_len, const uint8_t *method_ptr, size_t method_len, const uint8_t *data_ptr, size_t data_len, uint8_t **result_ptr_ptr, size_t *result_len_ptr);

/* Publish `data` on `topic` of pub/sub component `pubsub`. Capability: pubsub. */
__attribute__((import_module("layotto"), import_name("layotto_publish")))
int32_t layotto_publish(const uint8_t *pubsub_ptr, size_t pubsub_len, const uint8_t *topic_ptr, size_t topic_len, const uint8_t *data_ptr, size_t data_len);

/* Read configuration `key` from store `store` (group and label may be empty); NOT_FOUND when absent. Capability: configuration. */
__attribute__((import_module("layotto"), import_name("layotto_config_get")))
int32_t layotto_config_get(const uint8_t *store_ptr, size_t store_len, const uint8_t *group_ptr, size_t group_len, const uint8_t *label_ptr, size_t label_len, const uint8_t *key_ptr, size_t key_len, uint8_t **value_ptr_ptr, size_t *value_len_ptr);

/* Try to take lock `resource` for `owner` for `expire_s` seconds; writes 1 when taken, 0 when held by another owner. Capability: lock. */
__attribute__((import_module("layotto"), import_name("layotto_try_lock")))
int32_t layotto_try_lock(const uint8_t *store_ptr, size_t store_len, const uint8_t *resource_ptr, size_t resource_len, const uint8_t *owner_ptr, size_t owner_len, int32_t expire_s, int32_t *acquired_ptr);

/* Release lock `resource` held by `owner`; writes 0 success, 1 lock does not exist, 2 held by another owner. Capability: lock. */
__attribute__((import_module("layotto"), import_name("layotto_unlock")))
int32_t layotto_unlock(const uint8_t *store_ptr, size_t store_len, const uint8_t *resource_ptr, size_t resource_len, const uint8_t *owner_ptr, size_t owner_len, int32_t *result_ptr);

/* The next id for `key`: strictly increasing. Capability: sequencer. */
__attribute__((import_module("layotto"), import_name("layotto_next_id")))
int32_t layotto_next_id(const uint8_t *store_ptr, size_t store_len, const uint8_t *key_ptr, size_t key_len, int64_t *id_ptr);

/* Secret `name` of store `store` as a map of its keys to values; NOT_FOUND when absent. Capability: secrets. */
__attribute__((import_module("layotto"), import_name("layotto_get_secret")))
int32_t layotto_get_secret(const uint8_t *store_ptr, size_t store_len, const uint8_t *name_ptr, size_t name_len, uint8_t **result_ptr_ptr, size_t *result_len_ptr);

#endif /* LAYOTTO_ABI_H */
