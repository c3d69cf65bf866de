/*
 * pubsub_subscriber: receives the messages of topic `orders` (pub/sub component
 * `pub_subs_demo`) and stores each one in state store `state_demo` (capabilities: state),
 * written on the Layotto C SDK.
 *
 *     POST /orders   body = the message (as delivered: the raw payload or its CloudEvent)
 *                    -> state_demo["last_order"] = body; answers {"status":"SUCCESS"}
 *     GET  /orders   -> the last stored message (404 before the first one)
 *
 * The subscription itself is declared on the function's pod (see the host's pub/sub docs);
 * delivery is an in-process POST to the topic's route, "/orders" here.
 */
#include <stdlib.h>

#include "layotto.h"
#include "layotto_sdk.h"

#define STORE "state_demo"
#define KEY "last_order"

static int answer(lt_response *resp, uint32_t status, const char *json) {
    lt_response_status(resp, status);
    lt_response_header(resp, "content-type", "application/json");
    return lt_response_print(resp, json);
}

int lt_handle(const lt_request *req, lt_response *resp) {
    if (!lt_str_eq(req->path, "/orders")) {
        return answer(resp, 404, "{\"error\":\"no such route\"}");
    }
    if (lt_str_eq(req->method, "GET")) {
        char *value = NULL;
        size_t len = 0;
        int32_t rc = lt_state_get(STORE, KEY, &value, &len);
        if (rc == LAYOTTO_NOT_FOUND) {
            return answer(resp, 404, "{\"error\":\"no order yet\"}");
        }
        if (rc != LAYOTTO_OK) {
            lt_response_status(resp, 502);
            return lt_response_printf(resp, "state_demo: %s\n", lt_status_name(rc));
        }
        int err = lt_response_write(resp, value, (uint32_t)len);
        free(value);
        return err;
    }
    int32_t rc = lt_state_save(STORE, KEY, req->body.ptr, req->body.len);
    if (rc != LAYOTTO_OK) {
        lt_logf(LT_LOG_ERROR, "storing an order: %s", lt_status_name(rc));
        /* RETRY asks the pub/sub component to deliver the message again (Dapr's convention). */
        return answer(resp, 500, "{\"status\":\"RETRY\"}");
    }
    lt_logf(LT_LOG_INFO, "stored an order of %u bytes", (unsigned)req->body.len);
    return answer(resp, 200, "{\"status\":\"SUCCESS\"}");
}
