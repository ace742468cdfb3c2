/*
 * berth-relay: runs in a Berth guest VM (in the agent's root, started by berth-start-dockerd) and relays TCP
 * connections made to a guest address to the worker's forward of one registry.
 *
 * Usage: berth-relay LISTEN_ADDRESS LISTEN_PORT TARGET_ADDRESS TARGET_PORT
 *
 * The guest reaches the host only through QEMU's user-mode network in a network namespace of the worker's, where
 * TARGET (the gateway's address) leads to the namespace's loopback and the worker's listener for that registry
 * alone. dockerd connects to the registry by the name the farm uses (127.0.0.1:5000, registry.example:443): this
 * relay listens there. One child per connection copies both ways until both sides are done.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int address(const char *ip, const char *port, struct sockaddr_in *out) {
  memset(out, 0, sizeof *out);
  out->sin_family = AF_INET;
  out->sin_port = htons((unsigned short)atoi(port));
  return inet_pton(AF_INET, ip, &out->sin_addr) == 1 ? 0 : -1;
}

/* Copies what one side sends to the other; returns 0 once that side is done sending. */
static int copy(int from, int to) {
  char buffer[65536];
  ssize_t n = read(from, buffer, sizeof buffer);
  if (n < 0 && errno == EINTR) return 1;
  if (n <= 0) {
    shutdown(to, SHUT_WR);
    return 0;
  }
  for (ssize_t done = 0; done < n;) {
    ssize_t w = write(to, buffer + done, (size_t)(n - done));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    done += w;
  }
  return 1;
}

static void relay(int client, const struct sockaddr_in *target) {
  int upstream = socket(AF_INET, SOCK_STREAM, 0);
  if (upstream < 0 || connect(upstream, (const struct sockaddr *)target, sizeof *target) < 0) _exit(1);
  int open[2] = {1, 1};
  while (open[0] || open[1]) {
    struct pollfd fds[2] = {{open[0] ? client : -1, POLLIN, 0}, {open[1] ? upstream : -1, POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      _exit(1);
    }
    if (fds[0].revents) open[0] = copy(client, upstream);
    if (fds[1].revents) open[1] = copy(upstream, client);
    if (open[0] < 0 || open[1] < 0) _exit(1);
  }
  _exit(0);
}

int main(int argc, char **argv) {
  struct sockaddr_in listen_at, target;
  if (argc != 5 || address(argv[1], argv[2], &listen_at) < 0 || address(argv[3], argv[4], &target) < 0) {
    fprintf(stderr, "usage: berth-relay LISTEN_ADDRESS LISTEN_PORT TARGET_ADDRESS TARGET_PORT\n");
    return 2;
  }
  signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
  signal(SIGPIPE, SIG_IGN);
  int one = 1;
  int server = socket(AF_INET, SOCK_STREAM, 0);
  if (server < 0 || setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
      bind(server, (struct sockaddr *)&listen_at, sizeof listen_at) < 0 || listen(server, 64) < 0) {
    fprintf(stderr, "berth-relay: cannot listen on %s:%s: %s\n", argv[1], argv[2], strerror(errno));
    return 1;
  }
  for (;;) {
    int client = accept(server, NULL, NULL);
    if (client < 0) continue;
    pid_t pid = fork();
    if (pid == 0) {
      close(server);
      relay(client, &target);
    }
    close(client);
  }
}
