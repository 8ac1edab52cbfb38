/*
 * bareproxy: the floor of the end-to-end benchmarks. A PTY proxy that records
 * nothing: it opens a PTY with forkpty(), runs the command on it, puts the
 * outer terminal in raw mode and copies bytes both ways with a plain
 * poll/read/write loop, forwards SIGWINCH, and exits with the child's status
 * (128+N when the child was killed by signal N).
 *
 * Build: cc -O2 -o bareproxy bareproxy.c -lutil
 * Usage: bareproxy PROGRAM [ARG...]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

static volatile sig_atomic_t winch = 0;
static struct termios saved;
static int have_saved = 0;

static void on_winch(int sig) {
    (void)sig;
    winch = 1;
}

static void restore(void) {
    if (have_saved)
        tcsetattr(STDIN_FILENO, TCSAFLUSH, &saved);
}

/* Writes all of buf; returns 0, or -1 when the other side is gone. */
static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PROGRAM [ARG...]\n", argv[0]);
        return 2;
    }
    struct winsize ws;
    struct winsize *wsp = NULL;
    struct termios *tp = NULL;
    if (isatty(STDIN_FILENO)) {
        if (tcgetattr(STDIN_FILENO, &saved) == 0) {
            have_saved = 1;
            tp = &saved; /* the inner terminal starts with the user's modes */
        }
        if (ioctl(STDIN_FILENO, TIOCGWINSZ, &ws) == 0)
            wsp = &ws;
    }

    int master;
    pid_t child = forkpty(&master, NULL, tp, wsp);
    if (child < 0) {
        perror("forkpty");
        return 1;
    }
    if (child == 0) {
        execvp(argv[1], argv + 1);
        perror(argv[1]);
        _exit(127);
    }

    if (have_saved) {
        struct termios raw = saved;
        cfmakeraw(&raw);
        tcsetattr(STDIN_FILENO, TCSANOW, &raw);
        atexit(restore);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_winch; /* no SA_RESTART: poll returns EINTR */
    sigaction(SIGWINCH, &sa, NULL);

    static char buf[65536];
    int stdin_open = 1;
    for (;;) {
        if (winch) {
            winch = 0;
            if (ioctl(STDIN_FILENO, TIOCGWINSZ, &ws) == 0)
                ioctl(master, TIOCSWINSZ, &ws);
        }
        struct pollfd fds[2] = {
            {.fd = master, .events = POLLIN},
            {.fd = stdin_open ? STDIN_FILENO : -1, .events = POLLIN},
        };
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = read(master, buf, sizeof buf);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break; /* EIO: the child side is closed */
            if (write_all(STDOUT_FILENO, buf, (size_t)n) < 0) {
                /* the user's terminal is gone: keep draining the child */
            }
        }
        if (stdin_open && (fds[1].revents & (POLLIN | POLLHUP | POLLERR))) {
            ssize_t n = read(STDIN_FILENO, buf, sizeof buf);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                stdin_open = 0;
            else if (write_all(master, buf, (size_t)n) < 0)
                stdin_open = 0;
        }
    }

    int status = 0;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    restore();
    have_saved = 0;
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 1;
}
