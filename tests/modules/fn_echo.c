/*
 * fn_echo: a function module (abi/http.md) that echoes its request. Answers 200 with header
 * `x-echo: 1` and the body lines
 *
 *     method=<method>
 *     path=<path>
 *     query=<query>
 *     body=<body>
 *     h:<name>=<value>        one per request header, in order
 *
 * Query parameters: `status=<n>` answers with status n; `big=<n>` answers a body of n bytes
 * of 'x' instead of the lines above.
 */
#include <string.h>

#include "layotto.h"

static int line(lt_response *resp, const char *key, lt_str value) {
    lt_response_print(resp, key);
    lt_response_write(resp, value.ptr, value.len);
    return lt_response_write(resp, "\n", 1);
}

int lt_handle(const lt_request *req, lt_response *resp) {
    lt_str v;
    uint64_t n;
    if (lt_query_param(req, "status", &v) && lt_str_to_u64(v, &n) && n <= 999) {
        lt_response_status(resp, (uint32_t)n);
    }
    lt_response_header(resp, "x-echo", "1");
    if (lt_query_param(req, "big", &v) && lt_str_to_u64(v, &n) && n <= UINT32_MAX) {
        static char chunk[4096];
        if (chunk[0] != 'x') {
            memset(chunk, 'x', sizeof chunk);
        }
        for (uint64_t left = n; left > 0;) {
            uint32_t k = left < sizeof chunk ? (uint32_t)left : (uint32_t)sizeof chunk;
            if (lt_response_write(resp, chunk, k) != 0) {
                return 1;
            }
            left -= k;
        }
        return 0;
    }
    line(resp, "method=", req->method);
    line(resp, "path=", req->path);
    line(resp, "query=", req->query);
    line(resp, "body=", req->body);
    lt_header_iter it = LT_HEADER_ITER(req);
    lt_str name, value;
    while (lt_header_next(&it, &name, &value)) {
        lt_response_write(resp, "h:", 2);
        lt_response_write(resp, name.ptr, name.len);
        line(resp, "=", value);
    }
    return 0;
}
