/*
 * echoargs: report argv and selected environment variables.
 *
 *   every argument          -> stdout "arg[i]=<value>"
 *   "env:NAME"              -> stdout "env:NAME=<value or (unset)>"
 *   "stderr:<text>"         -> stderr "<text>"
 *   "exit:<n>"              -> exit status n (after flushing)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    int status = 0;
    for (int i = 0; i < argc; i++) {
        printf("arg[%d]=%s\n", i, argv[i]);
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "env:", 4) == 0) {
            const char *value = getenv(a + 4);
            printf("%s=%s\n", a, value ? value : "(unset)");
        } else if (strncmp(a, "stderr:", 7) == 0) {
            fprintf(stderr, "%s\n", a + 7);
        } else if (strncmp(a, "exit:", 5) == 0) {
            status = atoi(a + 5);
        }
    }
    fflush(stdout);
    fflush(stderr);
    return status;
}
