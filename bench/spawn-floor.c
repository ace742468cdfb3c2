/*
 * The floor of the runners benchmark: /bin/true started (posix_spawn, which is
 * glibc's vfork-like clone), and waited for, COUNT times by this process, which
 * runs inside a sandbox; each start follows a pause of PAUSE_MS, as the other
 * kinds of run do. Prints each run's milliseconds, one a line.
 * Usage: spawn-floor COUNT PAUSE_MS
 */
#define _GNU_SOURCE
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
  if (argc != 3) return 2;
  int count = atoi(argv[1]);
  long pause_ms = atol(argv[2]);
  char *child_argv[] = {"/bin/true", NULL};
  char *child_env[] = {"PATH=/usr/bin:/bin", NULL};
  struct timespec pause = {pause_ms / 1000, (pause_ms % 1000) * 1000000L};
  for (int i = 0; i < count; i++) {
    nanosleep(&pause, NULL);
    double start = now_ms();
    pid_t pid;
    if (posix_spawn(&pid, "/bin/true", NULL, NULL, child_argv, child_env) != 0) return 1;
    int status;
    if (waitpid(pid, &status, 0) != pid || status != 0) return 1;
    printf("%.4f\n", now_ms() - start);
  }
  return 0;
}
