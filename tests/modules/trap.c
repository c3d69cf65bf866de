/* trap: print a line, then execute an `unreachable` instruction. */
#include <stdio.h>

int main(void) {
    puts("about to trap");
    fflush(stdout);
    __builtin_trap();
}
