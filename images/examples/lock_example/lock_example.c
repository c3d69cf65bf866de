/*
 * lock_example: a distributed lock around a sequencer increment, on the Layotto C SDK
 * (capabilities: lock, sequencer).
 *
 *     GET /?owner=o&resource=r&keep=1
 *
 *  1. lt_try_lock("lock_demo", r, o, 10 s)        (r defaults to "lock_example"; o to a random id)
 *  2. when taken: lt_next_id("sequencer_demo", r)
 *  3. lt_unlock("lock_demo", r, o)                (skipped with keep=1: the lock stays held for
 *                                                  10 s, so another owner's call sees it taken)
 *
 * Answers JSON: {"owner":"o","resource":"r","acquired":true,"id":7,"unlock":"SUCCESS"}
 * with 200 when the lock was taken, 409 (acquired false, no id) when another owner held it,
 * 502 when a call failed ({"error":"<step>: <STATUS>"}).
 */
#include <stdio.h>
#include <string.h>

#include "layotto.h"
#include "layotto_sdk.h"

#define LOCKS "lock_demo"
#define SEQUENCER "sequencer_demo"

static int fail(lt_response *resp, const char *step, int32_t rc) {
    lt_logf(LT_LOG_WARN, "%s: %s", step, lt_status_name(rc));
    lt_response_status(resp, 502);
    lt_response_header(resp, "content-type", "application/json");
    return lt_response_printf(resp, "{\"error\":\"%s: %s\"}", step, lt_status_name(rc));
}

/* A query parameter as a C string in buf (truncated to fit), or `fallback`. */
static const char *param(const lt_request *req, const char *name, char *buf, size_t size,
                         const char *fallback) {
    lt_str v;
    if (!lt_query_param(req, name, &v) || v.len == 0) {
        return fallback;
    }
    snprintf(buf, size, "%.*s", (int)v.len, v.ptr);
    return buf;
}

static const char *unlock_name(int result) {
    switch (result) {
    case LT_UNLOCK_SUCCESS: return "SUCCESS";
    case LT_UNLOCK_NOT_EXIST: return "LOCK_UNEXIST";
    case LT_UNLOCK_BELONGS_TO_OTHERS: return "LOCK_BELONG_TO_OTHERS";
    default: return "INTERNAL_ERROR";
    }
}

int lt_handle(const lt_request *req, lt_response *resp) {
    char owner_buf[128], resource_buf[256], random_owner[33];
    uint8_t rnd[16];
    const char *owner = param(req, "owner", owner_buf, sizeof owner_buf, NULL);
    const char *resource = param(req, "resource", resource_buf, sizeof resource_buf, "lock_example");
    lt_str keep;
    int keep_lock = lt_query_param(req, "keep", &keep) && !lt_str_eq(keep, "0");
    int32_t rc;

    if (owner == NULL) { /* a fresh owner per request */
        if ((rc = lt_random(rnd, sizeof rnd)) != LAYOTTO_OK) {
            return fail(resp, "random", rc);
        }
        for (size_t i = 0; i < sizeof rnd; i++) {
            snprintf(random_owner + 2 * i, 3, "%02x", rnd[i]);
        }
        owner = random_owner;
    }

    int acquired = 0;
    if ((rc = lt_try_lock(LOCKS, resource, owner, 10, &acquired)) != LAYOTTO_OK) {
        return fail(resp, "try_lock", rc);
    }
    lt_response_header(resp, "content-type", "application/json");
    if (!acquired) {
        lt_response_status(resp, 409);
        return lt_response_printf(resp,
                                  "{\"owner\":\"%s\",\"resource\":\"%s\",\"acquired\":false}",
                                  owner, resource);
    }

    int64_t id = 0;
    int32_t seq_rc = lt_next_id(SEQUENCER, resource, &id);
    const char *unlocked = "KEPT";
    if (!keep_lock) {
        int result = -1;
        if ((rc = lt_unlock(LOCKS, resource, owner, &result)) != LAYOTTO_OK) {
            return fail(resp, "unlock", rc);
        }
        unlocked = unlock_name(result);
    }
    if (seq_rc != LAYOTTO_OK) {
        return fail(resp, "next_id", seq_rc);
    }
    return lt_response_printf(resp,
                              "{\"owner\":\"%s\",\"resource\":\"%s\",\"acquired\":true,"
                              "\"id\":%lld,\"unlock\":\"%s\"}",
                              owner, resource, (long long)id, unlocked);
}
