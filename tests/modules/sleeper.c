/* sleeper [seconds=3600]: print "sleeping", then block in one long sleep. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    long seconds = argc > 1 ? atol(argv[1]) : 3600;
    puts("sleeping");
    fflush(stdout);
    struct timespec pause = {.tv_sec = seconds, .tv_nsec = 0};
    nanosleep(&pause, NULL);
    return 0;
}
