/*
 * fn_work: a CPU-bound function module (abi/http.md) for scheduler tests and benchmarks.
 * Each request runs a chain of dependent integer steps (64-bit multiply, add, xor-shift),
 * then answers 200 with the body
 *
 *     n=<iterations> result=<final value in hex>
 *
 * The result depends on every step and is written to the response, so the compiler cannot
 * drop the loop; each step depends on the previous one, so its cost per step is fixed.
 *
 * Query parameters (the first one present wins):
 *
 *     n=<iterations>      run exactly that many steps
 *     us=<microseconds>   run about that many microseconds of work (us * WORK_STEPS_PER_US)
 *
 * Without either, about 2 ms of work (us=2000). WORK_STEPS_PER_US was calibrated on the
 * 2-core development machine (wasmtime, idle); on other machines `us` is only approximate,
 * so benchmarks report the measured service time next to their figures. A `seed=<n>` query
 * parameter changes the starting value (default 1).
 */
#include <stdint.h>

#include "layotto.h"

#define WORK_STEPS_PER_US 580u
#define WORK_DEFAULT_US 2000u
#define WORK_MAX_STEPS (UINT64_C(1) << 40)

static uint64_t work(uint64_t n, uint64_t x) {
    for (uint64_t i = 0; i < n; i++) {
        x = x * UINT64_C(6364136223846793005) + UINT64_C(1442695040888963407);
        x ^= x >> 29;
    }
    return x;
}

int lt_handle(const lt_request *req, lt_response *resp) {
    lt_str v;
    uint64_t n = (uint64_t)WORK_DEFAULT_US * WORK_STEPS_PER_US;
    uint64_t arg;
    if (lt_query_param(req, "n", &v)) {
        if (!lt_str_to_u64(v, &arg) || arg > WORK_MAX_STEPS) {
            lt_response_status(resp, 400);
            return lt_response_print(resp, "bad n\n");
        }
        n = arg;
    } else if (lt_query_param(req, "us", &v)) {
        if (!lt_str_to_u64(v, &arg) || arg > WORK_MAX_STEPS / WORK_STEPS_PER_US) {
            lt_response_status(resp, 400);
            return lt_response_print(resp, "bad us\n");
        }
        n = arg * WORK_STEPS_PER_US;
    }
    uint64_t seed = 1;
    if (lt_query_param(req, "seed", &v) && !lt_str_to_u64(v, &seed)) {
        seed = 1;
    }
    uint64_t x = work(n, seed);
    return lt_response_printf(resp, "n=%llu result=%016llx\n", (unsigned long long)n, (unsigned long long)x);
}
