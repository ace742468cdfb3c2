#!/usr/bin/perl
# Berth's sandbox agent: the first process of a resident sandbox
# (resident-sandbox.ts starts it through bwrap --as-pid-1 and speaks to it).
# It starts each command the worker asks for, inside the sandbox, and reports
# how it ended; processes a command leaves running stay, and it reaps them.
#
# Why pid 1: the kernel delivers to a PID namespace's first process only the
# signals it has a handler for when they come from inside the namespace, so
# a command (same uid, same sandbox) can neither kill nor stop the agent. It
# is also made non-dumpable, so a command cannot ptrace it or open anything
# under /proc/1 (its descriptors, its root); and its two pipes to the worker
# were FIFOs unlinked as soon as both ends were open, with no name left to
# open. What a command can still do is end its own sandbox (fill its process
# limit so that no next command can start, say); the worker then sees the
# agent gone or a refused start, never more.
#
# Requests on descriptor 4, replies on stdout. A request is a count, then that
# many fields, each ended by a NUL:
#   run ID STDIN STDOUT STDERR CWD ARGC ARGV... ENVC NAME=VALUE...
#   spawn ID STDIN STDOUT STDERR CWD ARGC ARGV... ENVC NAME=VALUE...
#   kill ID
# Replies, one line each: `ready` once, then `started ID` (for a spawn only,
# once its files are open), `failed ID REASON`, `exited ID CODE` (128 + the
# signal number for a command a signal ended), followed by ` alone` when no
# process but the agent was left in the sandbox as the command's end was seen.
# STDIN is opened read-only, STDOUT and STDERR write-only, created and
# truncated (FIFOs as well as files). A command that cannot be started exits
# 127 with the reason on its stderr, as a shell's would. When the worker
# closes descriptor 4, the agent exits and the kernel ends the sandbox.
#
# The agent loads no module but strict (not POSIX, IO::Handle, Errno,
# constant or warnings): loading them took most of its start, about 15 ms of
# a core for each sandbox made ahead. The few system calls perl has no
# built-in for are made with syscall(), by the numbers the worker passes for
# its architecture; the flag and errno values are Linux's on both
# architectures the worker supports (x86-64 and arm64).
use strict;

# The numbers of prctl, close, dup3 and exit_group, comma-separated (they
# differ between architectures), and the directory each command is chrooted
# into, or '' for none (an image's root, an input root).
my ($SYSCALLS, $ROOT) = @ARGV;
die "usage: agent.pl SYS_prctl,SYS_close,SYS_dup3,SYS_exit_group ROOT\n"
  unless defined $SYSCALLS && $SYSCALLS =~ /^\d+,\d+,\d+,\d+$/ && defined $ROOT;
my ($SYS_PRCTL, $SYS_CLOSE, $SYS_DUP3, $SYS_EXIT_GROUP) = map { $_ + 0 } split /,/, $SYSCALLS;

sub PR_SET_DUMPABLE () { 4 }
sub PR_CAP_AMBIENT () { 47 }
sub PR_CAP_AMBIENT_CLEAR_ALL () { 4 }
sub REQUESTS () { 4 }
sub O_RDONLY () { 0 }
sub O_WRONLY () { 1 }
sub O_CREAT () { 0100 }
sub O_TRUNC () { 01000 }
sub O_NONBLOCK () { 04000 }
sub F_SETFD () { 2 }
sub F_GETFL () { 3 }
sub F_SETFL () { 4 }
sub FD_CLOEXEC () { 1 }
sub WNOHANG () { 1 }
sub EINTR () { 4 }
sub ECHILD () { 10 }
sub EAGAIN () { 11 }

syscall($SYS_PRCTL, PR_SET_DUMPABLE, 0, 0, 0, 0) == 0 or die "berth agent: prctl(PR_SET_DUMPABLE): $!\n";
# Only the two pipes and stderr stay (bwrap's status file, for one, is not ours). From here on the agent
# opens nothing but each command's three files, which it closes itself; the request pipe closes on exec, and
# the reply pipe and stderr are replaced in each command: no command inherits a descriptor of the agent's.
for my $fd (fds()) {
  close_fd($fd) unless $fd == 1 || $fd == 2 || $fd == REQUESTS;
}
open(my $requests, '<&=', REQUESTS) or die "berth agent: the request pipe: $!\n";
fcntl($requests, F_SETFD, FD_CLOEXEC) or die "berth agent: close-on-exec on the request pipe: $!\n";

$| = 1;
my %running;    # pid => request id
# SIGCHLD interrupts select; a child that ends between the reap and the select is seen through the wake pipe
# its handler writes to (perl runs handlers between statements), and, should it slip into the last few
# instructions before the system call, through the timeout. Perl makes both ends close-on-exec.
pipe(my $wake, my $waker) or die "berth agent: pipe: $!\n";
for my $end ($waker, $wake) {
  my $flags = fcntl($end, F_GETFL, 0) or die "berth agent: fcntl: $!\n";
  fcntl($end, F_SETFL, $flags | O_NONBLOCK) or die "berth agent: fcntl: $!\n";
}
$SIG{CHLD} = sub { syswrite($waker, 'x') };
my $readable = '';
vec($readable, REQUESTS, 1) = 1;
vec($readable, fileno($wake), 1) = 1;
my $buffer = '';
print "ready\n";
while (1) {
  reap();
  my $ready = select(my $bits = $readable, undef, undef, %running ? 0.25 : undef);
  next if $ready <= 0;
  sysread($wake, my $drained, 4096) if vec($bits, fileno($wake), 1);
  next unless vec($bits, REQUESTS, 1);
  my $read = sysread($requests, my $chunk, 65536);
  if (!defined $read) {
    next if $! == EINTR || $! == EAGAIN;
    last;
  }
  last if $read == 0;
  $buffer .= $chunk;
  while (defined(my $fields = take_request(\$buffer))) {
    handle(@$fields);
  }
}
exit 0;

sub reap {
  my @exits;
  my $pid;
  while (($pid = waitpid(-1, WNOHANG)) > 0) {
    my $status = $?;
    my $id = delete $running{$pid};
    next unless defined $id;
    my $code = ($status & 127) ? 128 + ($status & 127) : $status >> 8;
    push @exits, "$id $code";
  }
  # No child at all: every other process of the sandbox is a descendant of the agent (its pid 1, to which
  # orphans are handed before their parent's exit is reported), so none is left.
  my $alone = $pid < 0 && $! == ECHILD ? ' alone' : '';
  print "exited $_$alone\n" for @exits;
}

# The next whole request in the buffer, removed from it, or undef.
sub take_request {
  my ($buf) = @_;
  my $end = index($$buf, "\0");
  return undef if $end < 0;
  my $count = substr($$buf, 0, $end);
  my @fields;
  my $at = $end + 1;
  for (1 .. $count) {
    my $next = index($$buf, "\0", $at);
    return undef if $next < 0;
    push @fields, substr($$buf, $at, $next - $at);
    $at = $next + 1;
  }
  substr($$buf, 0, $at) = '';
  return \@fields;
}

sub handle {
  my ($kind, $id, @fields) = @_;
  if ($kind eq 'kill') {
    my ($pid) = grep { $running{$_} eq $id } keys %running;
    # Its process group first: what it started and did not move elsewhere.
    kill 'KILL', -$pid, $pid if defined $pid;
    return;
  }
  return print "failed $id unknown request $kind\n" unless $kind eq 'run' || $kind eq 'spawn';
  my ($stdin, $stdout, $stderr, $cwd) = splice(@fields, 0, 4);
  my @argv = splice(@fields, 0, shift @fields);
  my @env = splice(@fields, 0, shift @fields);
  # Opened here, before the fork: a start is reported only once the command's files (FIFOs among them, which
  # the worker unlinks when told) are open.
  my $flags = O_WRONLY | O_CREAT | O_TRUNC;
  my ($in, $out, $err);
  my $opened = sysopen($in, $stdin, O_RDONLY)
    && sysopen($out, $stdout, $flags, 0644)
    && ($stderr eq $stdout ? ($err = $out) : sysopen($err, $stderr, $flags, 0644));
  if (!$opened) {
    my $reason = "$!";
    close($_) for grep { defined } $in, $out;
    return print "failed $id cannot open the command's stdin, stdout or stderr: $reason\n";
  }
  my $pid = fork;
  if (!defined $pid) {
    my $reason = "$!";
    print "failed $id fork: $reason\n";
  } elsif ($pid == 0) {
    command($in, $out, $err, $cwd, \@argv, \@env);
  } else {
    $running{$pid} = $id;
    # Only a spawn's caller waits for this (to unlink its FIFOs); a run's would be woken for nothing.
    print "started $id\n" if $kind eq 'spawn';
  }
  close($_) for $in, $out, $stdout eq $stderr ? () : $err;
}

# Never returns: execs the command, or exits 127 with the reason on its stderr.
sub command {
  my ($in, $out, $err, $cwd, $argv, $env) = @_;
  # A process group of its own, which a `kill` request reaches.
  setpgrp(0, 0);
  dup_fd(fileno($in), 0);
  dup_fd(fileno($out), 1);
  dup_fd(fileno($err), 2);
  # Nothing of the agent's reaches the command: not its pipes to the worker, not a directory of its view.
  close($_) for grep { fileno($_) > 2 } $in, $out, $err;
  my $failure = eval {
    if ($ROOT ne '') {
      chroot($ROOT) or die "chroot: $!\n";
    }
    chdir($cwd) or die "cannot enter the working directory $cwd: $!\n";
    # The agent may hold CAP_SYS_CHROOT (in the sandbox's user namespace only) for the chroot above; the
    # command holds nothing (the sandbox's no_new_privs keeps file capabilities from giving any back).
    syscall($SYS_PRCTL, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    %ENV = map { split /=/, $_, 2 } @$env;
    $ENV{PWD} = $cwd;
    exec { $argv->[0] } @$argv;
    "execvp $argv->[0]: $!\n";
  };
  print STDERR "berth: ", $failure // $@;
  # Not exit: nothing of the agent's (its buffers, its handles' destructors) may run in the command's place.
  syscall($SYS_EXIT_GROUP, 127);
}

sub close_fd {
  my ($fd) = @_;
  syscall($SYS_CLOSE, $fd + 0);
}

# dup2 (which arm64 has only as dup3, which refuses to copy a descriptor onto itself).
sub dup_fd {
  my ($from, $to) = @_;
  syscall($SYS_DUP3, $from + 0, $to + 0, 0) unless $from == $to;
}

sub fds {
  opendir(my $dir, '/proc/self/fd') or return ();
  my $own = fileno($dir);
  my @open = grep { /^\d+$/ && $_ != $own } readdir($dir);
  closedir($dir);
  return @open;
}
