/*
 * faas_fn1: Layotto's FaaS demo function_1 (id `id_1`) on the Layotto C SDK.
 *
 *     GET /?name=book1  (header `id: id_1`, or /fn/id_1?name=book1)
 *     -> layotto_invoke("id_2", "", "book1")           (capability: invoke)
 *     -> 200 "There are 100 inventories for book1."
 *
 * Like Layotto's demo, a request without a query string may carry `name=...` in its body.
 * Answers 400 without a name, 404 when id_2 (or the book) is unknown, 502 on other failures.
 */
#include <stdlib.h>
#include <string.h>

#include "layotto.h"
#include "layotto_sdk.h"

/* `name` from the query string, else from a `name=...` body (Layotto's demo sends the
 * query string as the body). */
static int find_name(const lt_request *req, lt_str *name) {
    if (lt_query_param(req, "name", name) && name->len) {
        return 1;
    }
    lt_request fake = *req;
    fake.query = req->body;
    return lt_query_param(&fake, "name", name) && name->len;
}

int lt_handle(const lt_request *req, lt_response *resp) {
    lt_str name;
    lt_response_header(resp, "content-type", "text/plain; charset=utf-8");
    if (!find_name(req, &name)) {
        lt_response_status(resp, 400);
        return lt_response_print(resp, "missing the name parameter\n");
    }
    char *inventory = NULL;
    size_t len = 0;
    int32_t rc = lt_invoke("id_2", "", name.ptr, name.len, &inventory, &len);
    if (rc != LAYOTTO_OK) {
        lt_logf(LT_LOG_WARN, "invoke id_2 for %.*s: %s", (int)name.len, name.ptr,
                lt_status_name(rc));
        lt_response_status(resp, rc == LAYOTTO_NOT_FOUND ? 404 : 502);
        return lt_response_printf(resp, "id_2 failed: %s\n", lt_status_name(rc));
    }
    int err = lt_response_printf(resp, "There are %.*s inventories for %.*s.", (int)len,
                                 inventory, (int)name.len, name.ptr);
    free(inventory);
    return err;
}
