/*
 * fn_badresp: a function module WITHOUT the SDK whose `layotto_http_handle` returns 0 but
 * points the response out of linear memory (0xFFFFFFF0, length 100), to test that the host
 * validates the response range and answers 500. It frees the request like a well-behaved
 * guest, so only the response is wrong.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

__attribute__((export_name("proxy_on_memory_allocate"))) uint32_t
proxy_on_memory_allocate(uint32_t size) {
    return (uint32_t)(uintptr_t)malloc(size);
}

__attribute__((export_name("layotto_http_handle"))) int32_t
layotto_http_handle(uint32_t req_ptr, uint32_t req_len, uint32_t resp_ptr_ptr,
                    uint32_t resp_len_ptr) {
    (void)req_len;
    uint32_t ptr = 0xFFFFFFF0u, len = 100;
    memcpy((void *)(uintptr_t)resp_ptr_ptr, &ptr, 4);
    memcpy((void *)(uintptr_t)resp_len_ptr, &len, 4);
    free((void *)(uintptr_t)req_ptr);
    return 0;
}
