/*
 * Berth's sandbox agent: the first process of a resident sandbox
 * (resident-sandbox.ts starts it through bwrap --as-pid-1 and speaks to it).
 * It starts each command the worker asks for, inside the sandbox, and reports
 * how it ended; processes a command leaves running stay, and it reaps them.
 *
 * Why pid 1: the kernel delivers to a PID namespace's first process only the
 * signals it has a handler for when they come from inside the namespace, and
 * the agent has none, so a command (same uid, same sandbox) can neither kill
 * nor stop it (a SIGCHLD it sends is queued, SIGCHLD being blocked here, and
 * only wakes the agent for nothing). It is also made non-dumpable, so a
 * command can neither ptrace it nor open anything under /proc/1 (its
 * descriptors, its root); and its two pipes to the worker were FIFOs unlinked
 * as soon as both ends were open, with no name left to open. What a command
 * can still do is end its own sandbox (fill its process limit so that no next
 * command can start, say); the worker then sees the agent gone or a refused
 * start, never more.
 *
 * Why C: a command is started as posix_spawn starts one, by a clone that
 * shares the agent's memory (on a stack of its own) until its exec: nothing
 * is copied, where a fork of the perl agent it replaces copied perl's page
 * tables and took most of a warm command's time on this farm's machines. Not
 * with CLONE_VFORK, though: another process of the sandbox could stop the
 * child before its exec and so hold the agent in clone. The agent waits for
 * the exec on a close-on-exec pipe instead, and kills a child that has not
 * got there within START_LIMIT_MS.
 *
 * Requests on descriptor 4, replies on stdout. A request is a count, then that
 * many fields, each ended by a NUL:
 *   run ID STDIN STDOUT STDERR CWD ARGC ARGV... ENVC NAME=VALUE...
 *   spawn ID STDIN STDOUT STDERR CWD ARGC ARGV... ENVC NAME=VALUE...
 *   kill ID
 * Replies, one line each: `ready` once, then `started ID` (for a spawn only,
 * once its files are open), `failed ID REASON`, `exited ID CODE` (128 + the
 * signal number for a command a signal ended), followed by ` alone` when no
 * process but the agent was left in the sandbox as the command's end was seen.
 * STDIN is opened read-only, STDOUT and STDERR write-only, created and
 * truncated: a run's outputs are regular files, a spawn's three files the
 * worker's FIFOs, and anything else found there (a link, another FIFO) fails
 * the request rather than hold the agent. A command that cannot be started
 * exits 127 with the reason on its stderr, as a shell's would. The command's
 * PATH (from its own environment; /bin:/usr/bin without one) is searched for
 * a program name without a slash. When the worker closes descriptor 4, the
 * agent exits and the kernel ends the sandbox.
 *
 * Usage: berth-agent ROOT, where ROOT is the directory each command is
 * chrooted into, or '' for none (an image's root, an input root).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/capability.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

#define REQUESTS 4
#define REPLIES 1
#define CHILD_STACK_BYTES (256 * 1024)
/* Far longer than any start takes (the files are opened before it): a child still short of its exec then
 * was stopped on purpose by another process of the sandbox. */
#define START_LIMIT_MS 5000

static const char *root;

struct running {
  pid_t pid;
  char *id;
};
static struct running *running;
static size_t running_count, running_capacity;

/* What a command's child needs, all of it made before the clone: the child only makes system calls. */
struct launch {
  int in, out, err;
  const char *cwd;
  char **argv;
  char **envp;
  const char *path;
};

static void die(const char *what) {
  char message[512];
  size_t length = 0;
  const char *parts[] = {"berth agent: ", what, ": ", strerror(errno), "\n"};
  for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
    size_t n = strlen(parts[i]);
    if (length + n > sizeof message) n = sizeof message - length;
    memcpy(message + length, parts[i], n);
    length += n;
  }
  (void)!write(2, message, length);
  _exit(1);
}

static void *grow(void *block, size_t bytes) {
  void *grown = realloc(block, bytes);
  if (grown == NULL) die("out of memory");
  return grown;
}

/* One reply line, written whole (at most PIPE_BUF bytes, so the worker never sees half of one). */
static void reply(const char *first, ...) {
  char line[4096];
  size_t length = 0;
  va_list parts;
  va_start(parts, first);
  for (const char *part = first; part != NULL; part = va_arg(parts, const char *)) {
    size_t n = strlen(part);
    if (length + n > sizeof line - 1) n = sizeof line - 1 - length;
    memcpy(line + length, part, n);
    length += n;
  }
  va_end(parts);
  /* A reason may hold a newline (a path does); the worker reads one reply per line. */
  for (size_t i = 0; i < length; i++)
    if (line[i] == '\n') line[i] = ' ';
  line[length++] = '\n';
  for (size_t written = 0; written < length;) {
    ssize_t n = write(REPLIES, line + written, length - written);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) _exit(1); /* The worker is gone: so is the sandbox's reason to be. */
    written += (size_t)n;
  }
}

static void reap(void) {
  pid_t pid;
  int status;
  /* Collected first: ` alone` is known only once waitpid says no child is left. */
  char **ids = NULL;
  int *codes = NULL;
  size_t exits = 0;
  while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
    for (size_t i = 0; i < running_count; i++) {
      if (running[i].pid != pid) continue;
      ids = grow(ids, (exits + 1) * sizeof *ids);
      codes = grow(codes, (exits + 1) * sizeof *codes);
      ids[exits] = running[i].id;
      codes[exits] = WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
      exits++;
      running[i] = running[--running_count];
      break;
    }
  }
  /* No child at all: every other process of the sandbox is a descendant of the agent (its pid 1, to which
   * orphans are handed before their parent's exit is reported), so none is left. */
  int alone = pid < 0 && errno == ECHILD;
  for (size_t i = 0; i < exits; i++) {
    char code[16];
    snprintf(code, sizeof code, "%d", codes[i]);
    reply("exited ", ids[i], " ", code, alone ? " alone" : "", NULL);
    free(ids[i]);
  }
  free(ids);
  free(codes);
}

/* Writes "berth: WHAT: ERROR" to the command's stderr (already in place) and ends the child. */
static void child_failed(const char *what, const char *detail, int error) {
  const char *parts[] = {"berth: ", what, detail, ": ", strerror(error), "\n"};
  for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) (void)!write(2, parts[i], strlen(parts[i]));
  _exit(127);
}

static void exec_file(const char *file, char **argv, char **envp) {
  execve(file, argv, envp);
  if (errno != ENOEXEC) return;
  /* Not a program the kernel runs: a script without #!, which execvp hands to the shell. */
  size_t count = 0;
  while (argv[count] != NULL) count++;
  /* Its copy of the arguments goes on the child's stack, which has room for this many. */
  if (count > 8192) return;
  char *with_shell[count + 2];
  with_shell[0] = "/bin/sh";
  with_shell[1] = (char *)file;
  for (size_t i = 1; i <= count; i++) with_shell[i + 1] = argv[i];
  execve("/bin/sh", with_shell, envp);
}

/* execvp's search, on the command's own PATH (the agent's environment is not the command's). */
static void exec_searching(const char *path, char **argv, char **envp) {
  const char *name = argv[0];
  if (name[0] == '\0') {
    errno = ENOENT;
    return;
  }
  if (strchr(name, '/') != NULL) {
    exec_file(name, argv, envp);
    return;
  }
  int denied = 0;
  size_t name_length = strlen(name);
  for (const char *dir = path;; dir++) {
    const char *end = strchrnul(dir, ':');
    size_t dir_length = (size_t)(end - dir);
    char file[PATH_MAX];
    if (dir_length + 1 + name_length < sizeof file) {
      /* An empty entry is the working directory. */
      size_t at = 0;
      if (dir_length > 0) {
        memcpy(file, dir, dir_length);
        file[dir_length] = '/';
        at = dir_length + 1;
      }
      memcpy(file + at, name, name_length + 1);
      exec_file(file, argv, envp);
      if (errno == EACCES) denied = 1;
      else if (errno != ENOENT && errno != ENOTDIR && errno != ESTALE && errno != ENODEV && errno != ETIMEDOUT)
        return;
    }
    if (*end == '\0') break;
    dir = end;
  }
  errno = denied ? EACCES : ENOENT;
}

/* The child, sharing the agent's memory until its exec: system calls only, on its own stack. */
static int command(void *argument) {
  struct launch *launch = argument;
  /* A process group of its own, which a `kill` request reaches. */
  setpgid(0, 0);
  int from[3] = {launch->in, launch->out, launch->err};
  for (int to = 0; to < 3; to++) {
    if (dup2(from[to], to) < 0) child_failed("cannot set up the command's files", "", errno);
  }
  /* The originals close on exec, as does everything else of the agent's: its pipes, its signalfd. */
  if (root[0] != '\0' && chroot(root) < 0) child_failed("chroot", "", errno);
  if (chdir(launch->cwd) < 0) child_failed("cannot enter the working directory ", launch->cwd, errno);
  /* The agent may hold CAP_SYS_CHROOT (in the sandbox's user namespace only) for the chroot above; the
   * command holds nothing. Every set is emptied before the exec, not only the ambient one: under
   * no_new_privs an exec keeps what file capabilities grant within the permitted set it started with. */
  prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
  struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct no_capabilities[_LINUX_CAPABILITY_U32S_3] = {{0, 0, 0}};
  if (syscall(SYS_capset, &header, no_capabilities) != 0) child_failed("cannot drop the capabilities", "", errno);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  exec_searching(launch->path, launch->argv, launch->envp);
  child_failed("execvp ", launch->argv[0], errno);
  return 127;
}

static int open_file(const char *path, int flags) {
  int fd;
  do fd = open(path, flags | O_CLOEXEC, 0644);
  while (fd < 0 && errno == EINTR);
  return fd;
}

/*
 * Opens a command's file where a process of the sandbox may have put something else first: no link is
 * followed, no FIFO's other end is waited for, and anything but a file of `type` is refused. Returns the
 * descriptor, blocking again, or -1 with `*reason` set.
 */
static int open_guarded(const char *path, int flags, mode_t type, const char **reason) {
  int fd = open_file(path, flags | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) {
    *reason = strerror(errno);
    return -1;
  }
  struct stat info;
  int file_flags = fcntl(fd, F_GETFL);
  if (fstat(fd, &info) != 0 || (info.st_mode & S_IFMT) != type || file_flags < 0 ||
      fcntl(fd, F_SETFL, file_flags & ~O_NONBLOCK) != 0) {
    *reason = type == S_IFIFO ? "not the worker's FIFO" : "not a regular file";
    close(fd);
    return -1;
  }
  return fd;
}

static int is_named(const char *variable, const char *name) {
  size_t n = strlen(name);
  return strncmp(variable, name, n) == 0 && variable[n] == '=';
}

/* The command's environment: the last of each name, PWD set to its working directory. */
static char **environment(char **variables, size_t count, const char *cwd, char **pwd) {
  char **envp = grow(NULL, (count + 2) * sizeof *envp);
  size_t kept = 0;
  for (size_t i = 0; i < count; i++) {
    const char *equals = strchr(variables[i], '=');
    size_t name_length = equals == NULL ? strlen(variables[i]) : (size_t)(equals - variables[i]);
    if (name_length == 3 && strncmp(variables[i], "PWD", 3) == 0) continue;
    int later = 0;
    for (size_t j = i + 1; j < count && !later; j++)
      later = strncmp(variables[j], variables[i], name_length) == 0 &&
              (variables[j][name_length] == '=' || variables[j][name_length] == '\0');
    if (!later) envp[kept++] = variables[i];
  }
  *pwd = grow(NULL, strlen(cwd) + 5);
  strcpy(*pwd, "PWD=");
  strcat(*pwd, cwd);
  envp[kept++] = *pwd;
  envp[kept] = NULL;
  return envp;
}

static char *child_stack;

/*
 * Waits for the child sharing the agent's memory to exec or end. One still short of its exec after
 * START_LIMIT_MS is killed, and so is one whose wait failed: the agent goes on only once the child has left
 * its memory. (errno is not looked at here: until then the child may write it too.)
 */
static void await_exec(pid_t pid, int exec_seen, int err) {
  struct pollfd closed = {.fd = exec_seen, .events = POLLIN};
  if (poll(&closed, 1, START_LIMIT_MS) > 0) return;
  kill(pid, SIGKILL);
  siginfo_t ended;
  while (waitid(P_PID, pid, &ended, WEXITED | WNOWAIT) != 0 && errno == EINTR) {
  }
  /* Never blocking: the command's stderr may be a FIFO that a process of the sandbox keeps full. */
  int flags = fcntl(err, F_GETFL);
  if (flags >= 0 && fcntl(err, F_SETFL, flags | O_NONBLOCK) == 0) {
    static const char held[] = "berth: the command was held before it could start (stopped by another process "
                               "of its sandbox?) and was killed\n";
    (void)!write(err, held, sizeof held - 1);
  }
}

/* A field that is a plain decimal number, as the worker writes them. */
static int number(const char *field, unsigned long *value) {
  char *end;
  if (field[0] < '0' || field[0] > '9') return 0;
  *value = strtoul(field, &end, 10);
  return *end == '\0';
}

static void start(int spawn, char *id, char **fields, size_t count) {
  if (count < 6) return reply("failed ", id, " malformed request", NULL);
  char *stdin_path = fields[0], *stdout_path = fields[1], *stderr_path = fields[2], *cwd = fields[3];
  unsigned long argc, envc;
  if (!number(fields[4], &argc) || argc == 0 || argc > count - 6 || !number(fields[5 + argc], &envc) ||
      envc != count - 6 - argc)
    return reply("failed ", id, " malformed request", NULL);
  char **args = fields + 5;
  char **variables = fields + 6 + argc;

  /* Opened here, before the start: a spawn is reported started only once the command's files are open.
   * They are in the io directory, which the sandbox's commands can write and whose next names they can
   * guess: a run's stdout and stderr are files the agent creates; a spawn's three are FIFOs the worker made
   * and opened at its end first. A run's stdin is /dev/null. */
  const char *reason = NULL;
  mode_t type = spawn ? S_IFIFO : S_IFREG;
  int flags = O_WRONLY | O_CREAT | O_TRUNC;
  int in = spawn ? open_guarded(stdin_path, O_RDONLY, type, &reason) : open_file(stdin_path, O_RDONLY);
  if (in < 0 && reason == NULL) reason = strerror(errno);
  int out = in < 0 ? -1 : open_guarded(stdout_path, flags, type, &reason);
  int same = strcmp(stderr_path, stdout_path) == 0;
  int err = out < 0 ? -1 : same ? out : open_guarded(stderr_path, flags, type, &reason);
  if (err < 0) {
    if (in >= 0) close(in);
    if (out >= 0) close(out);
    return reply("failed ", id, " cannot open the command's stdin, stdout or stderr: ", reason, NULL);
  }

  char **argv = grow(NULL, (argc + 1) * sizeof *argv);
  memcpy(argv, args, argc * sizeof *argv);
  argv[argc] = NULL;
  char *pwd;
  char **envp = environment(variables, envc, cwd, &pwd);
  const char *path = "/bin:/usr/bin";
  for (size_t i = 0; envp[i] != NULL; i++)
    if (is_named(envp[i], "PATH")) path = envp[i] + 5;
  struct launch launch = {in, out, err, cwd, argv, envp, path};

  int exec_seen[2];
  pid_t pid = -1;
  if (pipe2(exec_seen, O_CLOEXEC) == 0) {
    pid = clone(command, child_stack + CHILD_STACK_BYTES, CLONE_VM | SIGCHLD, &launch);
    int error = errno;
    close(exec_seen[1]);
    /* Until the child's copy of the pipe closes (its exec, or its end), it runs in this memory: the agent
     * touches nothing the child reads, and waits. */
    if (pid > 0) await_exec(pid, exec_seen[0], err);
    close(exec_seen[0]);
    errno = error;
  }
  if (pid < 0) {
    reply("failed ", id, " fork: ", strerror(errno), NULL);
  } else {
    if (running_count == running_capacity) {
      running_capacity = running_capacity ? running_capacity * 2 : 8;
      running = grow(running, running_capacity * sizeof *running);
    }
    running[running_count].pid = pid;
    running[running_count].id = strdup(id);
    if (running[running_count].id == NULL) die("out of memory");
    running_count++;
    /* Only a spawn's caller waits for this (to unlink its FIFOs); a run's would be woken for nothing. */
    if (spawn) reply("started ", id, NULL);
  }
  free(argv);
  free(envp);
  free(pwd);
  close(in);
  close(out);
  if (!same) close(err);
}

static void handle(char **fields, size_t count) {
  if (count < 2) return;
  char *kind = fields[0], *id = fields[1];
  if (strcmp(kind, "kill") == 0) {
    for (size_t i = 0; i < running_count; i++) {
      if (strcmp(running[i].id, id) != 0) continue;
      /* Its process group first: what it started and did not move elsewhere. */
      kill(-running[i].pid, SIGKILL);
      kill(running[i].pid, SIGKILL);
      break;
    }
    return;
  }
  int spawn = strcmp(kind, "spawn") == 0;
  if (!spawn && strcmp(kind, "run") != 0) return reply("failed ", id, " unknown request ", kind, NULL);
  start(spawn, id, fields + 2, count - 2);
}

/* Handles every whole request in buffer[0..length) and returns how many bytes they took. */
static size_t take_requests(char *buffer, size_t length) {
  size_t taken = 0;
  for (;;) {
    char *at = buffer + taken, *limit = buffer + length;
    char *nul = memchr(at, '\0', (size_t)(limit - at));
    if (nul == NULL) return taken;
    unsigned long count;
    /* The worker is trusted, but a count that is no plain number could only make the buffer grow forever. */
    if (!number(at, &count)) _exit(2);
    /* Each field takes a byte at least: a count past what is buffered cannot be whole yet. */
    if (count > (size_t)(limit - nul)) return taken;
    char **fields = grow(NULL, (count + 1) * sizeof *fields);
    char *field = nul + 1;
    unsigned long found = 0;
    for (; found < count && field < limit; found++) {
      char *field_end = memchr(field, '\0', (size_t)(limit - field));
      if (field_end == NULL) break;
      fields[found] = field;
      field = field_end + 1;
    }
    if (found < count) {
      free(fields);
      return taken;
    }
    handle(fields, count);
    free(fields);
    taken = (size_t)(field - buffer);
  }
}

/* Only the two pipes and stderr stay (bwrap's status file, for one, is not ours). */
static void close_inherited(void) {
  DIR *dir = opendir("/proc/self/fd");
  if (dir == NULL) die("/proc/self/fd");
  int own = dirfd(dir);
  int *open_fds = NULL;
  size_t count = 0;
  for (struct dirent *entry; (entry = readdir(dir)) != NULL;) {
    if (entry->d_name[0] < '0' || entry->d_name[0] > '9') continue;
    int fd = atoi(entry->d_name);
    if (fd == own || fd == REPLIES || fd == 2 || fd == REQUESTS) continue;
    open_fds = grow(open_fds, (count + 1) * sizeof *open_fds);
    open_fds[count++] = fd;
  }
  closedir(dir);
  for (size_t i = 0; i < count; i++) close(open_fds[i]);
  free(open_fds);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    errno = EINVAL;
    die("usage: berth-agent ROOT");
  }
  root = argv[1];
  if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) die("prctl(PR_SET_DUMPABLE)");
  /* The reply pipe, stderr and the request pipe: without one of them, a command's file could take its number. */
  if (fcntl(REPLIES, F_GETFD) < 0 || fcntl(2, F_GETFD) < 0 || fcntl(REQUESTS, F_GETFD) < 0) _exit(2);
  close_inherited();
  /* Descriptors 0 and 3 held by /dev/null: whatever the agent opens later is numbered above 4, so a command's
   * three files never sit where dup2 would have to copy one onto another. */
  if (open("/dev/null", O_RDONLY) != 0 || open("/dev/null", O_RDONLY | O_CLOEXEC) != 3) die("/dev/null");
  if (fcntl(REQUESTS, F_SETFD, FD_CLOEXEC) != 0) die("close-on-exec on the request pipe");

  /* SIGCHLD is read from a signalfd; blocked, it interrupts nothing (each command unblocks it for itself). */
  /* Ignored (inherited so), SIGCHLD would have the kernel reap every child unseen. */
  signal(SIGCHLD, SIG_DFL);
  sigset_t child_ended;
  sigemptyset(&child_ended);
  sigaddset(&child_ended, SIGCHLD);
  if (sigprocmask(SIG_BLOCK, &child_ended, NULL) != 0) die("sigprocmask");
  int ended = signalfd(-1, &child_ended, SFD_CLOEXEC | SFD_NONBLOCK);
  if (ended < 0) die("signalfd");
  /* With a page below it that faults: a child that ran past its stack would not write over the agent. */
  long page = sysconf(_SC_PAGESIZE);
  char *stack = mmap(NULL, CHILD_STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (stack == MAP_FAILED || mprotect(stack, page, PROT_NONE) != 0) die("the child's stack");
  child_stack = stack + page;

  size_t capacity = 65536, length = 0;
  char *buffer = grow(NULL, capacity);
  reply("ready", NULL);
  for (;;) {
    reap();
    struct pollfd watched[2] = {{.fd = REQUESTS, .events = POLLIN}, {.fd = ended, .events = POLLIN}};
    if (poll(watched, 2, -1) < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    if (watched[1].revents) {
      struct signalfd_siginfo drained[8];
      while (read(ended, drained, sizeof drained) > 0) {
      }
    }
    if (!watched[0].revents) continue;
    if (capacity - length < 65536) {
      capacity *= 2;
      buffer = grow(buffer, capacity);
    }
    ssize_t n = read(REQUESTS, buffer + length, capacity - length);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return 0;
    length += (size_t)n;
    size_t taken = take_requests(buffer, length);
    memmove(buffer, buffer + taken, length - taken);
    length -= taken;
  }
}
