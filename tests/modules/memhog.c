/*
 * memhog [max_mib]: allocate and touch 1 MiB blocks until malloc fails
 * (stderr "memhog: out of memory after <n> MiB", exit 1) or max_mib is reached
 * (stdout "memhog: allocated <n> MiB", exit 0).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK (1024 * 1024)
#define MAX_BLOCKS 4096 /* 4 GiB: all that wasm32 can address */

/* volatile so that -O2 cannot prove the allocations unused and delete them */
static char *volatile blocks[MAX_BLOCKS];

int main(int argc, char **argv) {
    long limit = argc > 1 ? atol(argv[1]) : -1;
    long n = 0;
    while (limit < 0 || n < limit) {
        if (n >= MAX_BLOCKS) {
            break;
        }
        char *p = malloc(BLOCK);
        if (p == NULL) {
            fprintf(stderr, "memhog: out of memory after %ld MiB\n", n);
            fflush(stderr);
            return 1;
        }
        memset(p, (int)(n & 0xff) | 1, BLOCK);
        blocks[n] = p;
        n++;
    }
    printf("memhog: allocated %ld MiB\n", n);
    fflush(stdout);
    return 0;
}
