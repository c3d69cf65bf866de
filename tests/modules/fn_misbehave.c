/*
 * fn_misbehave: a function module (abi/http.md) that misbehaves on request.
 *
 *     /loop          spin forever (no WASI call inside the loop)
 *     /trap          execute `unreachable`
 *     /oom           malloc 1 MiB blocks until malloc fails (keeping them), then answer 507
 *                    with "oom after <n> MiB\n"
 *     /fail          return a non-zero status from the handler (the host answers 500)
 *     /sleep?ms=N    busy-wait N ms on clock_gettime(CLOCK_MONOTONIC), then answer 200
 *                    "slept <N> ms\n"
 *     /count         increment a per-instance counter and answer it, "<n>\n"
 *     otherwise      200 "ok\n"
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#include <stdlib.h>
#include <time.h>

#include "layotto.h"

#define BLOCK (1024 * 1024)
#define MAX_BLOCKS 4096 /* 4 GiB: all that wasm32 can address */

/* volatile so that -O2 can delete neither the loop nor the allocations */
static volatile unsigned long long spin;
static char *volatile blocks[MAX_BLOCKS];
static unsigned long long count;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int lt_handle(const lt_request *req, lt_response *resp) {
    lt_str path = req->path;
    if (lt_str_eq(path, "/loop")) {
        for (;;) {
            spin++;
        }
    }
    if (lt_str_eq(path, "/trap")) {
        __builtin_trap();
    }
    if (lt_str_eq(path, "/oom")) {
        /* start the body first: the response buffer must exist before memory runs out */
        lt_response_status(resp, 507);
        lt_response_print(resp, "oom after ");
        unsigned n = 0;
        while (n < MAX_BLOCKS) {
            char *p = malloc(BLOCK);
            if (p == NULL) {
                break;
            }
            p[0] = p[BLOCK - 1] = 1;
            blocks[n++] = p;
        }
        return lt_response_printf(resp, "%u MiB\n", n);
    }
    if (lt_str_eq(path, "/fail")) {
        return 1;
    }
    if (lt_str_eq(path, "/sleep")) {
        lt_str v;
        uint64_t ms = 0;
        if (lt_query_param(req, "ms", &v)) {
            lt_str_to_u64(v, &ms);
        }
        uint64_t start = now_ns();
        while (now_ns() - start < ms * 1000000u) {
            spin++;
        }
        return lt_response_printf(resp, "slept %llu ms\n", (unsigned long long)ms);
    }
    if (lt_str_eq(path, "/count")) {
        return lt_response_printf(resp, "%llu\n", ++count);
    }
    return lt_response_print(resp, "ok\n");
}
