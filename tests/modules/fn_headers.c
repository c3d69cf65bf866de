/*
 * fn_headers: a function module (abi/http.md) that returns hostile responses on request, to
 * test that the ingress never writes what would split the connection's byte stream.
 *
 *     /crlf       a header value with CR LF, a blank line and a whole forged response
 *     /lf         a header value with a bare LF and a forged set-cookie line
 *     /cr         a header value with a bare CR
 *     /nul        a header value with a NUL byte inside
 *     /ctl        a header value with a vertical tab (a control character)
 *     /colon      a header name with ": ", CR LF and a second header in it
 *     /space      a header name with a space
 *     /empty      an empty header name
 *     /s204       status 204 with a body that is a forged response
 *     /s100       status 100 (interim) with a body that is a forged response
 *     otherwise   200, header `x-note: fine`, body "fine\n"
 *
 * Every hostile response also carries a good header (`x-good: 1`) and the body "real\n"
 * (except /s204 and /s100, whose body is the forged response).
 */
#include "layotto.h"

#define FORGED "HTTP/1.1 200 OK\r\ncontent-length: 7\r\nx-forged: 1\r\n\r\nforged!"

static int hostile(lt_response *resp, const char *name, uint32_t name_len, const char *value,
                   uint32_t value_len) {
    lt_response_header(resp, "x-good", "1");
    lt_response_header_str(resp, (lt_str){name, name_len}, (lt_str){value, value_len});
    return lt_response_print(resp, "real\n");
}

#define LIT(s) s, (uint32_t)(sizeof(s) - 1)

int lt_handle(const lt_request *req, lt_response *resp) {
    lt_str path = req->path;
    if (lt_str_eq(path, "/crlf")) {
        return hostile(resp, LIT("x-note"), LIT("ok\r\n\r\n" FORGED));
    }
    if (lt_str_eq(path, "/lf")) {
        return hostile(resp, LIT("x-note"), LIT("ok\nset-cookie: forged=1"));
    }
    if (lt_str_eq(path, "/cr")) {
        return hostile(resp, LIT("x-note"), LIT("ok\rx-forged: 1"));
    }
    if (lt_str_eq(path, "/nul")) {
        return hostile(resp, LIT("x-note"), LIT("ok\0x-forged: 1"));
    }
    if (lt_str_eq(path, "/ctl")) {
        return hostile(resp, LIT("x-note"), LIT("ok\vx"));
    }
    if (lt_str_eq(path, "/colon")) {
        return hostile(resp, LIT("x-note: forged\r\nx-forged"), LIT("1"));
    }
    if (lt_str_eq(path, "/space")) {
        return hostile(resp, LIT("x note"), LIT("1"));
    }
    if (lt_str_eq(path, "/empty")) {
        return hostile(resp, LIT(""), LIT("1"));
    }
    if (lt_str_eq(path, "/s204") || lt_str_eq(path, "/s100")) {
        lt_response_status(resp, lt_str_eq(path, "/s204") ? 204 : 100);
        return lt_response_print(resp, FORGED);
    }
    lt_response_header(resp, "x-note", "fine");
    return lt_response_print(resp, "fine\n");
}
