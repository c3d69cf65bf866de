/*
 * fsprobe: try filesystem operations and report each outcome on stdout, one line each.
 * Used by the tenant-boundary tests (tests/security/test_filesystem.py).
 *
 *   "read:<path>"   -> "read <path>: ok <first line of the file>" or "read <path>: error <strerror>"
 *   "write:<path>"  -> creates/truncates <path> and writes "probe\n":
 *                      "write <path>: ok" or "write <path>: error <strerror>"
 *   "list:<path>"   -> "list <path>: ok <n> entries" or "list <path>: error <strerror>"
 *
 * Always exits 0: the tests judge the printed outcomes.
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

static void do_read(const char *path) {
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        printf("read %s: error %s\n", path, strerror(errno));
        return;
    }
    char line[256] = "";
    if (fgets(line, sizeof line, f) == NULL) {
        line[0] = '\0';
    }
    line[strcspn(line, "\n")] = '\0';
    fclose(f);
    printf("read %s: ok %s\n", path, line);
}

static void do_write(const char *path) {
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        printf("write %s: error %s\n", path, strerror(errno));
        return;
    }
    int failed = fputs("probe\n", f) < 0;
    failed |= fclose(f) != 0;
    if (failed) {
        printf("write %s: error %s\n", path, strerror(errno));
        return;
    }
    printf("write %s: ok\n", path);
}

static void do_list(const char *path) {
    DIR *d = opendir(path);
    if (d == NULL) {
        printf("list %s: error %s\n", path, strerror(errno));
        return;
    }
    int n = 0;
    while (readdir(d) != NULL) {
        n++;
    }
    closedir(d);
    printf("list %s: ok %d entries\n", path, n);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "read:", 5) == 0) {
            do_read(a + 5);
        } else if (strncmp(a, "write:", 6) == 0) {
            do_write(a + 6);
        } else if (strncmp(a, "list:", 5) == 0) {
            do_list(a + 5);
        } else {
            printf("unknown operation %s\n", a);
        }
        fflush(stdout);
    }
    return 0;
}
