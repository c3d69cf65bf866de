/* ticker [N=5] [interval_ms=200]: print "tick <i>" N times, sleeping in between. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    int count = argc > 1 ? atoi(argv[1]) : 5;
    long interval_ms = argc > 2 ? atol(argv[2]) : 200;
    struct timespec pause = {
        .tv_sec = interval_ms / 1000,
        .tv_nsec = (interval_ms % 1000) * 1000000L,
    };
    for (int i = 0; i < count; i++) {
        printf("tick %d\n", i);
        fflush(stdout);
        if (i + 1 < count) {
            nanosleep(&pause, NULL);
        }
    }
    return 0;
}
