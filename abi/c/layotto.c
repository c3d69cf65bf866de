/*
 * layotto.c: the C guest SDK's runtime (see abi/include/layotto.h and abi/http.md).
 *
 * Exports `layotto_http_handle` and `proxy_on_memory_allocate`. Per instance it keeps one
 * response buffer, one header buffer and one query-decoding scratch buffer; they grow with
 * realloc and are reused by every request, so a request allocates nothing in the common case.
 *
 * Response buffer layout: the body is written directly into `buf` at `body_off`, leaving room
 * in front of it for the 12-byte response header and the headers map, which are filled in
 * when the handler returns. The encoded response therefore starts at `buf + body_off - head`
 * and the body is never copied (unless the headers outgrow the room left in front of it).
 */
#include "layotto.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WASM_PAGE 65536u
#define REQ_HEAD 20u      /* 5 x u32 */
#define RESP_HEAD 12u     /* 3 x u32 */
#define RESERVE_MIN 64u   /* initial room in front of the body */
#define RESERVE_MAX 4096u /* never reserve more than this in front of the body */
#define KEEP_BUF (1u << 20) /* buffers above this size are released before the next request */
#define KEEP_SMALL (64u << 10)

struct lt_response {
    uint8_t *buf; /* encoded response; the body lives at buf + body_off */
    uint32_t cap;
    uint32_t body_off;
    uint32_t body_len;
    uint8_t *hdr; /* headers so far: entries of klen, vlen, key, NUL, value, NUL */
    uint32_t hdr_cap;
    uint32_t hdr_len;
    uint32_t hdr_count;
    uint32_t status;
    uint32_t reserve; /* room left in front of the body; adapts to the headers seen */
    int failed;       /* sticky: a builder call ran out of memory */
};

static lt_response g_resp = {.reserve = RESERVE_MIN};
static uint8_t *g_scratch; /* decoded query values */
static uint32_t g_scratch_cap;

static inline uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4); /* wasm is little-endian */
    return v;
}

static inline void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* Grows *buf to hold at least `need` bytes (doubling). 0 on success, -1 on failure. */
static int grow(uint8_t **buf, uint32_t *cap, uint64_t need) {
    if (need <= *cap) {
        return 0;
    }
    if (need > UINT32_MAX) {
        return -1;
    }
    uint64_t n = *cap ? *cap : 256;
    while (n < need) {
        n *= 2;
    }
    if (n > UINT32_MAX) {
        n = need;
    }
    void *p = realloc(*buf, (size_t)n);
    if (p == NULL && n > need) { /* near the memory limit: try the exact size */
        n = need;
        p = realloc(*buf, (size_t)n);
    }
    if (p == NULL) {
        return -1;
    }
    *buf = p;
    *cap = (uint32_t)n;
    return 0;
}

/* ---- allocator export ---- */

/* One byte more than asked, set to NUL: every buffer the host hands over (the request,
 * results of the Runtime ABI calls in layotto_sdk.h) is NUL-terminated without a copy. */
__attribute__((export_name("proxy_on_memory_allocate"))) uint32_t
proxy_on_memory_allocate(uint32_t size) {
    if (size == UINT32_MAX) {
        return 0;
    }
    uint8_t *p = malloc((size_t)size + 1);
    if (p != NULL) {
        p[size] = 0;
    }
    return (uint32_t)(uintptr_t)p;
}

/* ---- request ---- */

/* Decodes and validates the request in p[0..n). Every length is checked against n, including
 * the whole headers map, so that the accessors below can trust it. */
static int decode_request(const uint8_t *p, uint32_t n, lt_request *r) {
    if (n < REQ_HEAD) {
        return LT_PARSE_FAILURE;
    }
    uint32_t ml = rd32(p), pl = rd32(p + 4), ql = rd32(p + 8), hl = rd32(p + 12),
             bl = rd32(p + 16);
    if ((uint64_t)REQ_HEAD + ml + pl + ql + hl + bl > n) {
        return LT_PARSE_FAILURE;
    }
    const uint8_t *q = p + REQ_HEAD;
    r->method = (lt_str){(const char *)q, ml};
    q += ml;
    r->path = (lt_str){(const char *)q, pl};
    q += pl;
    r->query = (lt_str){(const char *)q, ql};
    q += ql;
    r->headers = q;
    r->headers_len = hl;
    r->header_count = 0;
    q += hl;
    r->body = (lt_str){(const char *)q, bl};

    if (hl == 0) { /* tolerate an absent map: no headers */
        return LT_OK;
    }
    const uint8_t *h = r->headers;
    if (hl < 4) {
        return LT_PARSE_FAILURE;
    }
    uint32_t count = rd32(h);
    uint64_t off = 4 + 8 * (uint64_t)count; /* start of the key/value data */
    if (off > hl) {
        return LT_PARSE_FAILURE;
    }
    for (uint32_t i = 0; i < count; i++) {
        uint32_t kl = rd32(h + 4 + 8 * i), vl = rd32(h + 8 + 8 * i);
        off += (uint64_t)kl + 1;
        if (off > hl || h[off - 1] != 0) {
            return LT_PARSE_FAILURE;
        }
        off += (uint64_t)vl + 1;
        if (off > hl || h[off - 1] != 0) {
            return LT_PARSE_FAILURE;
        }
    }
    r->header_count = count;
    return LT_OK;
}

int lt_header_next(lt_header_iter *it, lt_str *name, lt_str *value) {
    const lt_request *r = it->req;
    if (it->index >= r->header_count) {
        return 0;
    }
    const uint8_t *h = r->headers;
    if (it->offset == 0) { /* fresh iterator: the data follows the length table */
        it->offset = 4 + 8 * r->header_count;
    }
    uint32_t kl = rd32(h + 4 + 8 * it->index), vl = rd32(h + 8 + 8 * it->index);
    name->ptr = (const char *)h + it->offset;
    name->len = kl;
    value->ptr = name->ptr + kl + 1;
    value->len = vl;
    it->offset += kl + vl + 2;
    it->index++;
    return 1;
}

static inline unsigned char lower(unsigned char c) {
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + ('a' - 'A')) : c;
}

int lt_request_header(const lt_request *req, const char *name, lt_str *out) {
    size_t nl = strlen(name);
    lt_header_iter it = LT_HEADER_ITER(req);
    lt_str k, v;
    while (lt_header_next(&it, &k, &v)) {
        if (k.len != nl) {
            continue;
        }
        size_t i = 0;
        while (i < nl && lower((unsigned char)k.ptr[i]) == lower((unsigned char)name[i])) {
            i++;
        }
        if (i == nl) {
            *out = v;
            return 1;
        }
    }
    return 0;
}

static inline int hexval(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decodes one character of s[*i..end) ('+' is a space, %XX a byte; a malformed escape is kept
 * as is) and advances *i past it. */
static inline unsigned char qdecode(const char *s, uint32_t *i, uint32_t end) {
    unsigned char c = (unsigned char)s[*i];
    if (c == '+') {
        (*i)++;
        return ' ';
    }
    if (c == '%' && end - *i >= 3) {
        int hi = hexval((unsigned char)s[*i + 1]), lo = hexval((unsigned char)s[*i + 2]);
        if (hi >= 0 && lo >= 0) {
            *i += 3;
            return (unsigned char)(hi * 16 + lo);
        }
    }
    (*i)++;
    return c;
}

int lt_query_param(const lt_request *req, const char *name, lt_str *out) {
    const char *q = req->query.ptr;
    uint32_t n = req->query.len;
    size_t nl = strlen(name);
    uint32_t i = 0;
    while (i < n) {
        uint32_t end = i, eq;
        while (end < n && q[end] != '&') {
            end++;
        }
        eq = i;
        while (eq < end && q[eq] != '=') {
            eq++;
        }
        /* compare the decoded key q[i..eq) with name */
        uint32_t k = i;
        size_t j = 0;
        while (k < eq && j < nl && qdecode(q, &k, eq) == (unsigned char)name[j]) {
            j++;
        }
        if (k == eq && j == nl && eq > i) {
            uint32_t v = eq < end ? eq + 1 : end;
            int plain = 1;
            for (uint32_t x = v; x < end; x++) {
                if (q[x] == '%' || q[x] == '+') {
                    plain = 0;
                    break;
                }
            }
            if (plain) {
                *out = (lt_str){q + v, end - v};
                return 1;
            }
            /* Decode into the scratch buffer at the value's own offset: values never overlap
             * there, so earlier results of this request stay valid. */
            if (grow(&g_scratch, &g_scratch_cap, n) != 0) {
                *out = (lt_str){q + v, 0};
                return 0;
            }
            char *d = (char *)g_scratch + v;
            uint32_t dl = 0;
            while (v < end) {
                d[dl++] = (char)qdecode(q, &v, end);
            }
            *out = (lt_str){d, dl};
            return 1;
        }
        i = end + 1;
    }
    return 0;
}

/* ---- helpers ---- */

int lt_str_eq(lt_str s, const char *c) {
    size_t n = strlen(c);
    return s.len == n && (n == 0 || memcmp(s.ptr, c, n) == 0);
}

int lt_str_to_u64(lt_str s, uint64_t *out) {
    uint64_t v = 0;
    if (s.len == 0) {
        return 0;
    }
    for (uint32_t i = 0; i < s.len; i++) {
        unsigned d = (unsigned char)s.ptr[i] - '0';
        if (d > 9 || v > (UINT64_MAX - d) / 10) {
            return 0;
        }
        v = v * 10 + d;
    }
    *out = v;
    return 1;
}

/* ---- response ---- */

void lt_response_status(lt_response *resp, uint32_t status) { resp->status = status; }

/* Makes room for `extra` more body bytes and returns where they go (NULL when out of memory). */
static uint8_t *body_tail(lt_response *r, uint32_t extra) {
    if (r->failed) {
        return NULL;
    }
    if (r->body_len == 0) { /* no body yet: place it after the headers set so far */
        uint64_t head = RESP_HEAD + 4 + (uint64_t)r->hdr_len;
        if (head > UINT32_MAX) {
            r->failed = 1;
            return NULL;
        }
        r->body_off = head > r->reserve ? (uint32_t)head : r->reserve;
    }
    if (grow(&r->buf, &r->cap, (uint64_t)r->body_off + r->body_len + extra) != 0) {
        r->failed = 1;
        return NULL;
    }
    return r->buf + r->body_off + r->body_len;
}

int lt_response_write(lt_response *resp, const void *data, uint32_t len) {
    uint8_t *t = body_tail(resp, len);
    if (t == NULL) {
        return -1;
    }
    if (len) {
        memcpy(t, data, len);
    }
    resp->body_len += len;
    return 0;
}

int lt_response_print(lt_response *resp, const char *s) {
    return lt_response_write(resp, s, (uint32_t)strlen(s));
}

int lt_response_printf(lt_response *resp, const char *fmt, ...) {
    uint8_t *t = body_tail(resp, 0);
    if (t == NULL) {
        return -1;
    }
    uint32_t avail = resp->cap - resp->body_off - resp->body_len;
    va_list ap, again;
    va_start(ap, fmt);
    va_copy(again, ap);
    int n = vsnprintf((char *)t, avail, fmt, ap);
    va_end(ap);
    if (n >= 0 && (uint32_t)n >= avail) { /* did not fit: grow and format again */
        t = body_tail(resp, (uint32_t)n + 1);
        n = t == NULL ? -1 : vsnprintf((char *)t, (size_t)n + 1, fmt, again);
    }
    va_end(again);
    if (n < 0) {
        resp->failed = 1;
        return -1;
    }
    resp->body_len += (uint32_t)n;
    return 0;
}

int lt_response_header_str(lt_response *resp, lt_str name, lt_str value) {
    if (resp->failed) {
        return -1;
    }
    uint64_t need = (uint64_t)resp->hdr_len + 8 + name.len + value.len + 2;
    if (grow(&resp->hdr, &resp->hdr_cap, need) != 0) {
        resp->failed = 1;
        return -1;
    }
    uint8_t *e = resp->hdr + resp->hdr_len;
    wr32(e, name.len);
    wr32(e + 4, value.len);
    e += 8;
    memcpy(e, name.ptr, name.len);
    e[name.len] = 0;
    e += name.len + 1;
    memcpy(e, value.ptr, value.len);
    e[value.len] = 0;
    resp->hdr_len = (uint32_t)need;
    resp->hdr_count++;
    return 0;
}

int lt_response_header(lt_response *resp, const char *name, const char *value) {
    return lt_response_header_str(resp, (lt_str){name, (uint32_t)strlen(name)},
                                  (lt_str){value, (uint32_t)strlen(value)});
}

static void response_reset(lt_response *r) {
    if (r->cap > KEEP_BUF) { /* do not hold on to a huge body between requests */
        free(r->buf);
        r->buf = NULL;
        r->cap = 0;
    }
    if (r->hdr_cap > KEEP_SMALL) {
        free(r->hdr);
        r->hdr = NULL;
        r->hdr_cap = 0;
    }
    if (g_scratch_cap > KEEP_SMALL) {
        free(g_scratch);
        g_scratch = NULL;
        g_scratch_cap = 0;
    }
    r->status = 200;
    r->body_off = r->reserve;
    r->body_len = 0;
    r->hdr_len = 0;
    r->hdr_count = 0;
    r->failed = 0;
}

/* Writes the response head and headers map in front of the body. */
static int response_finish(lt_response *r, uint32_t *out_ptr, uint32_t *out_len) {
    uint64_t map = 4 + (uint64_t)r->hdr_len;
    uint64_t head = RESP_HEAD + map;
    if (r->body_len == 0) {
        if (body_tail(r, 0) == NULL) { /* sets body_off = max(head, reserve) */
            return -1;
        }
    } else if (head > r->body_off) { /* headers added after the body: move the body once */
        if (grow(&r->buf, &r->cap, head + r->body_len) != 0) {
            return -1;
        }
        memmove(r->buf + head, r->buf + r->body_off, r->body_len);
        r->body_off = (uint32_t)head;
    }
    if (head + r->body_len > UINT32_MAX) {
        return -1;
    }
    uint8_t *p = r->buf + r->body_off - head;
    wr32(p, r->status);
    wr32(p + 4, (uint32_t)map);
    wr32(p + 8, r->body_len);
    wr32(p + 12, r->hdr_count);
    uint8_t *tab = p + 16, *data = tab + 8 * r->hdr_count;
    const uint8_t *e = r->hdr;
    for (uint32_t i = 0; i < r->hdr_count; i++) {
        uint32_t kv = rd32(e) + rd32(e + 4) + 2;
        memcpy(tab, e, 8);
        memcpy(data, e + 8, kv);
        tab += 8;
        data += kv;
        e += 8 + kv;
    }
    if (head > r->reserve) { /* leave this much room in front of the next body */
        r->reserve = head > RESERVE_MAX ? RESERVE_MAX : (uint32_t)((head + 15) & ~15ull);
    }
    *out_ptr = (uint32_t)(uintptr_t)p;
    *out_len = (uint32_t)(head + r->body_len);
    return 0;
}

/* ---- entry point ---- */

static inline int in_memory(uint32_t ptr, uint32_t len, uint64_t mem) {
    return ptr != 0 && (uint64_t)ptr + len <= mem;
}

__attribute__((export_name("layotto_http_handle"))) int32_t
layotto_http_handle(uint32_t req_ptr, uint32_t req_len, uint32_t resp_ptr_ptr,
                    uint32_t resp_len_ptr) {
    uint64_t mem = (uint64_t)__builtin_wasm_memory_size(0) * WASM_PAGE;
    int out_ok = in_memory(resp_ptr_ptr, 4, mem) && in_memory(resp_len_ptr, 4, mem);
    int req_ok = in_memory(req_ptr, req_len, mem);
    uint8_t *req_buf = (uint8_t *)(uintptr_t)req_ptr;
    uint32_t out_ptr = 0, out_len = 0;
    int32_t status;

    if (!out_ok || !req_ok) {
        status = LT_INVALID_MEMORY_ACCESS;
    } else {
        lt_request req;
        status = decode_request(req_buf, req_len, &req);
        if (status == LT_OK) {
            response_reset(&g_resp);
            int rc = lt_handle(&req, &g_resp);
            if (rc != 0) {
                status = rc;
            } else if (g_resp.failed || response_finish(&g_resp, &out_ptr, &out_len) != 0) {
                status = LT_INTERNAL_FAILURE;
                out_ptr = out_len = 0;
            }
        }
    }
    if (out_ok) {
        wr32((uint8_t *)(uintptr_t)resp_ptr_ptr, out_ptr);
        wr32((uint8_t *)(uintptr_t)resp_len_ptr, out_len);
    }
    if (req_ok) {
        free(req_buf); /* host-allocated through proxy_on_memory_allocate; ours now */
    }
    return status;
}
