/* The smallest Layotto example: a WASI command module that prints one line. */
#include <stdio.h>

int main(void) {
    puts("Hello from a Layotto nanoprocess!");
    return 0;
}
