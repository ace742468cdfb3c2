/*
 * berth-agent: runs in a Berth guest VM (as PID 1, started by init) and executes the host's commands.
 *
 * Usage: berth-agent PORT ROOT
 *   PORT  the virtio-serial port that leads to the host (e.g. /dev/vport1p1)
 *   ROOT  the directory each command is chrooted into (the image's root with the scratch overlay)
 *
 * Wire protocol, both directions (kept in step with src/vm/agent-protocol.ts):
 *   frame   = length:u32 big-endian (bytes after this field, 1..MAX_FRAME) type:u8 payload
 * Host to guest:
 *   'R' run      payload = fields separated by NUL, each ended by NUL:
 *                uid, gid, cwd, argc, argv[0..argc), envc, env[0..envc)   (numbers in decimal)
 *                Only one command runs at a time; a second 'R' while one runs is answered with 'F'.
 *   'S' setup    same payload as 'R', run in the agent's own root (the initramfs, with busybox) instead of
 *                ROOT: the worker's own steps around an action (mounting its input share), never an action's
 *   'M' mount    payload = NUL-ended fields: tag, target, then mode uid gid path for each directory (mode in
 *                octal): mounts the host's 9p share `tag` at ROOT/target (made if missing), then gives each
 *                ROOT/path those ids and mode; answered by an empty 'M', or 'F' saying what failed. Done by the
 *                agent itself: a shell and its commands cost a resumed VM hundreds of milliseconds under TCG
 *   'K' kill     payload = signal number in decimal; sent to the running command's process group
 *   'P' ping     payload echoed back in a 'P' frame (tells the host a resumed VM is alive)
 *   'T' time     payload = "<seconds> <nanoseconds>" since the epoch: the guest's clock is set to it (a VM
 *                resumed from a snapshot wakes up with the snapshot's time)
 * Guest to host:
 *   'H' hello    payload = the guest kernel's release; sent once, when the agent starts
 *   'O' / 'E'    a chunk of the command's stdout / stderr
 *   'X' exit     payload = "<exit code> <signal>" in decimal (code -1 when killed by a signal, signal 0 otherwise)
 *   'F' failure  payload = why the command could not start (no 'X' follows)
 *   'P' pong
 *   'M' mounted  (empty) the 'M' request succeeded
 * While the host end of the port is not connected, reads return EOF at once: the agent then polls.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <time.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_FRAME (1u << 20)
#define MAX_ARGS 4096

static int port = -1;
static const char *root;

static void die(const char *what) {
  dprintf(2, "berth-agent: %s: %s\n", what, strerror(errno));
  exit(1);
}

static void write_all(const void *data, size_t size) {
  const char *p = data;
  while (size > 0) {
    ssize_t n = write(port, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {
      usleep(1000);
      continue;
    }
    if (n <= 0) die("write to host");
    p += n;
    size -= (size_t)n;
  }
}

static void send_frame(char type, const void *payload, size_t size) {
  unsigned char header[5];
  uint32_t length = (uint32_t)size + 1;
  header[0] = length >> 24;
  header[1] = length >> 16;
  header[2] = length >> 8;
  header[3] = length;
  header[4] = (unsigned char)type;
  write_all(header, sizeof header);
  if (size > 0) write_all(payload, size);
}

static void send_text(char type, const char *format, ...) {
  char text[1024];
  va_list args;
  va_start(args, format);
  int n = vsnprintf(text, sizeof text, format, args);
  va_end(args);
  send_frame(type, text, n < 0 ? 0 : (size_t)n >= sizeof text ? sizeof text - 1 : (size_t)n);
}

/* Reads exactly size bytes; returns 0 on EOF (host not connected), 1 when done. */
static int read_exact(void *data, size_t size) {
  char *p = data;
  size_t done = 0;
  while (done < size) {
    ssize_t n = read(port, p + done, size - done);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
      usleep(1000);
      continue;
    }
    if (n < 0) die("read from host");
    if (n == 0) {
      if (done == 0) return 0;
      usleep(1000); /* the host went away inside a frame: wait for the rest */
      continue;
    }
    done += (size_t)n;
  }
  return 1;
}

/* Reads one frame into *payload (malloc'd); returns its type, or 0 when the host is not connected. */
static char read_frame(char **payload, size_t *size) {
  unsigned char header[5];
  if (!read_exact(header, sizeof header)) return 0;
  uint32_t length = (uint32_t)header[0] << 24 | (uint32_t)header[1] << 16 | (uint32_t)header[2] << 8 | header[3];
  if (length < 1 || length > MAX_FRAME) {
    errno = EPROTO;
    die("frame length");
  }
  *size = length - 1;
  *payload = malloc(*size + 1);
  if (!*payload) die("malloc");
  if (*size > 0 && !read_exact(*payload, *size)) die("short frame");
  (*payload)[*size] = 0;
  return (char)header[4];
}

struct request {
  int in_root; /* chroot into ROOT first ('R'); 0 for the worker's setup ('S') */
  uid_t uid;
  gid_t gid;
  char *cwd;
  char *argv[MAX_ARGS + 1];
  char *envp[MAX_ARGS + 1];
};

/* Splits a run payload; returns an error message, or NULL when it is well formed. */
static const char *parse_run(char *payload, size_t size, struct request *req) {
  char *fields[2 * MAX_ARGS + 8];
  size_t count = 0;
  size_t start = 0;
  for (size_t i = 0; i < size; i++) {
    if (payload[i] != 0) continue;
    if (count == sizeof fields / sizeof fields[0]) return "too many fields";
    fields[count++] = payload + start;
    start = i + 1;
  }
  if (start != size) return "last field not ended by NUL";
  if (count < 5) return "too few fields";
  req->uid = (uid_t)strtoul(fields[0], NULL, 10);
  req->gid = (gid_t)strtoul(fields[1], NULL, 10);
  req->cwd = fields[2];
  size_t argc = strtoul(fields[3], NULL, 10);
  if (argc < 1 || argc > MAX_ARGS || 4 + argc >= count) return "bad argc";
  for (size_t i = 0; i < argc; i++) req->argv[i] = fields[4 + i];
  req->argv[argc] = NULL;
  size_t envc = strtoul(fields[4 + argc], NULL, 10);
  if (envc > MAX_ARGS || 5 + argc + envc != count) return "bad envc";
  for (size_t i = 0; i < envc; i++) req->envp[i] = fields[5 + argc + i];
  req->envp[envc] = NULL;
  return NULL;
}

/* In the child: enters the root, drops to the user and executes; reports a failure on the error pipe. */
static void exec_child(struct request *req, int out, int err, int failure) {
  int null = open("/dev/null", O_RDONLY);
  if (null < 0 || dup2(null, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0) goto fail;
  if (setsid() < 0) goto fail;
  if (req->in_root && (chroot(root) < 0 || chdir("/") < 0)) goto fail;
  if (chdir(req->cwd) < 0) goto fail;
  if (setgroups(0, NULL) < 0 || setgid(req->gid) < 0 || setuid(req->uid) < 0) goto fail;
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  environ = req->envp; /* execvp searches the command's own PATH */
  execvp(req->argv[0], req->argv);
fail:;
  int saved = errno;
  write(failure, &saved, sizeof saved);
  _exit(127);
}

/* Splits a payload of NUL-ended fields; returns how many, or -1 when malformed. */
static int split_fields(char *payload, size_t size, char **fields, int max) {
  int count = 0;
  size_t start = 0;
  for (size_t i = 0; i < size; i++) {
    if (payload[i] != 0) continue;
    if (count == max) return -1;
    fields[count++] = payload + start;
    start = i + 1;
  }
  return start == size ? count : -1;
}

/* mkdir -p of an absolute path, without following a link out of it being a concern: the guest is the action's. */
static int make_dirs(char *path) {
  for (char *p = path + 1; *p; p++) {
    if (*p != '/') continue;
    *p = 0;
    int failed = mkdir(path, 0755) < 0 && errno != EEXIST;
    *p = '/';
    if (failed) return -1;
  }
  return mkdir(path, 0755) < 0 && errno != EEXIST ? -1 : 0;
}

static void mount_share(char *payload, size_t size) {
  char *fields[4 * 1024 + 2];
  char path[4096];
  int count = split_fields(payload, size, fields, (int)(sizeof fields / sizeof fields[0]));
  if (count < 2 || (count - 2) % 4 != 0) {
    send_text('F', "malformed mount request");
    return;
  }
  snprintf(path, sizeof path, "%s%s", root, fields[1]);
  if (make_dirs(path) < 0) {
    send_text('F', "cannot make the directory %s: %s", fields[1], strerror(errno));
    return;
  }
  if (mount(fields[0], path, "9p", 0, "trans=virtio,version=9p2000.L,msize=512000,cache=none") < 0) {
    send_text('F', "cannot mount the share %s at %s: %s", fields[0], fields[1], strerror(errno));
    return;
  }
  for (int i = 2; i + 3 < count; i += 4) {
    snprintf(path, sizeof path, "%s/%s", root, fields[i + 3]);
    if (lchown(path, (uid_t)strtoul(fields[i + 1], NULL, 10), (gid_t)strtoul(fields[i + 2], NULL, 10)) < 0 ||
        chmod(path, (mode_t)strtoul(fields[i], NULL, 8)) < 0) {
      send_text('F', "cannot set the mode of %s: %s", fields[i + 3], strerror(errno));
      return;
    }
  }
  send_frame('M', NULL, 0);
}

static void set_clock(const char *payload) {
  struct timespec now = {0, 0};
  char *end;
  now.tv_sec = strtoll(payload, &end, 10);
  now.tv_nsec = strtol(end, NULL, 10);
  if (now.tv_nsec < 0 || now.tv_nsec >= 1000000000) now.tv_nsec = 0;
  clock_settime(CLOCK_REALTIME, &now);
}

static void pump(int fd, char type, int *open_fd) {
  char buffer[65536];
  for (;;) {
    ssize_t n = read(fd, buffer, sizeof buffer);
    if (n > 0) {
      send_frame(type, buffer, (size_t)n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n == 0 || (n < 0 && errno != EAGAIN)) {
      close(fd);
      *open_fd = -1;
    }
    return;
  }
}

/* Reaps every ended child (the agent is PID 1: orphans are its own); returns 1 when `watched` was one. */
static int reap(pid_t watched, int *status) {
  int found = 0, st;
  pid_t p;
  while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
    if (p == watched) {
      *status = st;
      found = 1;
    }
  }
  return found;
}

static void run(struct request *req, int children) {
  int out[2], err[2], failure[2];
  if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0 || pipe2(failure, O_CLOEXEC) < 0) die("pipe");
  pid_t pid = fork();
  if (pid < 0) die("fork");
  if (pid == 0) exec_child(req, out[1], err[1], failure[1]);
  close(out[1]);
  close(err[1]);
  close(failure[1]);
  int saved;
  if (read(failure[0], &saved, sizeof saved) == sizeof saved) {
    close(failure[0]);
    close(out[0]);
    close(err[0]);
    waitpid(pid, NULL, 0);
    send_text('F', "cannot start %s in %s as %u:%u: %s", req->argv[0], req->cwd, (unsigned)req->uid,
              (unsigned)req->gid, strerror(saved));
    return;
  }
  close(failure[0]);
  fcntl(out[0], F_SETFL, O_NONBLOCK);
  fcntl(err[0], F_SETFL, O_NONBLOCK);
  int out_fd = out[0], err_fd = err[0], status = 0, exited = 0, host_gone = 0;
  while (!exited) {
    struct pollfd fds[4] = {
        {children, POLLIN, 0}, {out_fd, POLLIN, 0}, {err_fd, POLLIN, 0}, {host_gone ? -1 : port, POLLIN, 0}};
    if (poll(fds, 4, host_gone ? 20 : -1) < 0 && errno != EINTR) die("poll");
    host_gone = 0;
    if (fds[1].revents) pump(out_fd, 'O', &out_fd);
    if (fds[2].revents) pump(err_fd, 'E', &err_fd);
    if (fds[3].revents & (POLLIN | POLLHUP)) {
      char *payload;
      size_t size;
      char type = read_frame(&payload, &size);
      if (type == 0) {
        host_gone = 1;
      } else {
        if (type == 'K') kill(-pid, atoi(payload) > 0 ? atoi(payload) : SIGKILL);
        else if (type == 'P') send_frame('P', payload, size);
        else if (type == 'T') set_clock(payload);
        else if (type == 'R' || type == 'S') send_text('F', "a command is already running");
        free(payload);
      }
    }
    if (fds[0].revents) {
      struct signalfd_siginfo info;
      while (read(children, &info, sizeof info) == sizeof info) {
      }
      if (reap(pid, &status)) exited = 1;
    }
  }
  /* The command ended: what it wrote is in the pipes; processes it left behind may keep them open. */
  if (out_fd >= 0) pump(out_fd, 'O', &out_fd);
  if (err_fd >= 0) pump(err_fd, 'E', &err_fd);
  if (out_fd >= 0) close(out_fd);
  if (err_fd >= 0) close(err_fd);
  if (WIFSIGNALED(status)) send_text('X', "-1 %d", WTERMSIG(status));
  else send_text('X', "%d 0", WEXITSTATUS(status));
}

int main(int argc, char **argv) {
  if (argc != 3) {
    dprintf(2, "usage: berth-agent PORT ROOT\n");
    return 2;
  }
  root = argv[2];
  port = open(argv[1], O_RDWR | O_CLOEXEC);
  if (port < 0) die(argv[1]);
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, NULL);
  int children = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
  if (children < 0) die("signalfd");
  struct utsname name;
  uname(&name);
  send_frame('H', name.release, strlen(name.release));
  for (;;) {
    char *payload;
    size_t size;
    char type = read_frame(&payload, &size);
    int ignored;
    reap(-2, &ignored);
    if (type == 0) {
      usleep(10000);
      continue;
    }
    if (type == 'R' || type == 'S') {
      struct request req;
      req.in_root = type == 'R';
      const char *problem = parse_run(payload, size, &req);
      if (problem) send_text('F', "malformed run request: %s", problem);
      else run(&req, children);
    } else if (type == 'M') {
      mount_share(payload, size);
    } else if (type == 'P') {
      send_frame('P', payload, size);
    } else if (type == 'T') {
      set_clock(payload);
    } else if (type != 'K') {
      send_text('F', "unknown frame type %d", type);
    }
    free(payload);
  }
}
