/* busyloop: spin forever without any WASI call inside the loop (tests interruption). */
#include <stdio.h>

static volatile unsigned long long counter;

int main(void) {
    puts("spinning");
    fflush(stdout);
    for (;;) {
        counter++;
    }
}
