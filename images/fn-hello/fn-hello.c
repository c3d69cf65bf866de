/*
 * fn-hello: the benchmark function. Answers 200, `content-type: text/plain`,
 * "Hello, <name>!\n" where <name> is the `name` query parameter or "world".
 */
#include "layotto.h"

int lt_handle(const lt_request *req, lt_response *resp) {
    lt_str name;
    if (!lt_query_param(req, "name", &name)) {
        name = (lt_str){"world", 5};
    }
    lt_response_header(resp, "content-type", "text/plain");
    lt_response_write(resp, "Hello, ", 7);
    lt_response_write(resp, name.ptr, name.len);
    return lt_response_write(resp, "!\n", 2);
}
