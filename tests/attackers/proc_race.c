/* An attacker for the end-to-end tests (tests/privsep.rs): races every new
 * recorder for its /proc entries. It watches the newest pids and, the moment
 * one of them is named shelltrail-shel, opens /proc/PID/environ, and keeps
 * trying for as long as that recorder lives: the open succeeds only while
 * the process is dumpable (ptrace-able by this user). Prints
 * "seen=N readable=M" (recorders seen, recorders readable at some moment)
 * after SECONDS. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_PIDS 4194304

static unsigned char *state; /* 0 unseen, 1 seen as a recorder, 2 done */
static int live[64];
static int nlive;

static int read_small(const char *path, char *buf, int len) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    int n = read(fd, buf, len - 1);
    close(fd);
    if (n < 0) return -1;
    buf[n] = 0;
    return n;
}

int main(int argc, char **argv) {
    int seconds = argc > 1 ? atoi(argv[1]) : 5;
    state = calloc(MAX_PIDS, 1);
    if (!state) return 2;
    time_t end = time(NULL) + seconds;
    long seen = 0, readable = 0;
    char path[64], buf[256];
    while (time(NULL) < end) {
        if (read_small("/proc/sys/kernel/ns_last_pid", buf, sizeof buf) <= 0) return 3;
        int last = atoi(buf);
        for (int pid = last - 4; pid <= last + 1; pid++) {
            if (pid <= 1 || pid >= MAX_PIDS || state[pid]) continue;
            snprintf(path, sizeof path, "/proc/%d/comm", pid);
            if (read_small(path, buf, sizeof buf) <= 0) continue;
            if (strcmp(buf, "shelltrail-shel\n") != 0) continue;
            state[pid] = 1;
            seen++;
            if (nlive < 64) live[nlive++] = pid;
        }
        for (int i = 0; i < nlive; i++) {
            int pid = live[i];
            snprintf(path, sizeof path, "/proc/%d/environ", pid);
            int fd = open(path, O_RDONLY);
            if (fd >= 0) {
                close(fd);
                snprintf(path, sizeof path, "/proc/%d/comm", pid);
                if (read_small(path, buf, sizeof buf) > 0 && strcmp(buf, "shelltrail-shel\n") == 0) {
                    readable++;
                    state[pid] = 2;
                    live[i--] = live[--nlive];
                }
                continue;
            }
            snprintf(path, sizeof path, "/proc/%d/comm", pid);
            if (read_small(path, buf, sizeof buf) <= 0 || strcmp(buf, "shelltrail-shel\n") != 0) {
                state[pid] = 2; /* gone, or no longer a recorder */
                live[i--] = live[--nlive];
            }
        }
    }
    printf("seen=%ld readable=%ld\n", seen, readable);
    return 0;
}
