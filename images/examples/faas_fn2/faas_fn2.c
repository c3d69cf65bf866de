/*
 * faas_fn2: Layotto's FaaS demo function_2 (id `id_2`) on the Layotto C SDK.
 *
 * The book name is the request body (layotto_invoke delivers its data as a POST body), or
 * the `name` query parameter for a direct GET /?name=book1. Answers the value of that key
 * in state store `state_demo` (capability: state): "100"; 404 when the key is absent.
 */
#include <stdlib.h>
#include <string.h>

#include "layotto.h"
#include "layotto_sdk.h"

int lt_handle(const lt_request *req, lt_response *resp) {
    lt_str name = req->body;
    if (name.len == 0 && !lt_query_param(req, "name", &name)) {
        lt_response_status(resp, 400);
        return lt_response_print(resp, "missing the book name\n");
    }
    char *key = strndup(name.ptr, name.len);
    if (key == NULL) {
        return LT_INTERNAL_FAILURE;
    }
    char *value = NULL;
    size_t len = 0;
    int32_t rc = lt_state_get("state_demo", key, &value, &len);
    free(key);
    lt_response_header(resp, "content-type", "text/plain; charset=utf-8");
    if (rc == LAYOTTO_NOT_FOUND) {
        lt_response_status(resp, 404);
        return lt_response_printf(resp, "no inventory for %.*s\n", (int)name.len, name.ptr);
    }
    if (rc != LAYOTTO_OK) {
        lt_response_status(resp, 502);
        return lt_response_printf(resp, "state_demo: %s\n", lt_status_name(rc));
    }
    int err = lt_response_write(resp, value, (uint32_t)len);
    free(value);
    return err;
}
