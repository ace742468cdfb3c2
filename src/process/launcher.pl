#!/usr/bin/perl
# Berth's sandbox launcher: one long-lived process per worker that starts
# sandboxes on the worker's behalf (src/process/launcher.ts speaks to it).
#
# Why it exists: Node.js can only start a process by forking its own, large,
# address space, synchronously on its one thread, and it cannot call
# unshare(2) or mount(2) at all. Before bwrap, an image action needs a private
# mount namespace holding the image's overlay and the input root, and a switch
# to the unprivileged user; done with unshare, sh, mount and setpriv that costs
# six programs per action. This process forks its small self instead and makes
# those calls directly. perl-base is part of every Debian system.
#
# Requests on stdin: a count, then that many fields, each ended by a NUL:
#   id uid gid stdout stderr status nsteps step... argc argv... envc env...
# where a step is `private`, `mount SOURCE TARGET TYPE FLAGS DATA`,
# `mkdir PATH` or `chdir PATH`, and uid -1 keeps root. Replies on stdout,
# one line each: `started ID PID`, `failed ID MESSAGE`,
# `exited ID CODE SIGNAL`. When stdin closes (the worker is gone), every
# sandbox still running is killed and the launcher exits.
use strict;
use warnings;
use POSIX ();

my ($SYS_MOUNT, $SYS_UNSHARE) = map { $_ + 0 } @ARGV;
die "usage: launcher.pl SYS_mount SYS_unshare\n" unless $SYS_MOUNT && $SYS_UNSHARE;

use constant CLONE_NEWNS => 0x00020000;
use constant MS_REC => 0x4000;
use constant MS_PRIVATE => 0x40000;
use constant LAUNCH_FAILED => 'berth launcher: ';
use constant STEP_ARGS => { private => 0, mount => 5, mkdir => 1, chdir => 1 };

$| = 1;
binmode STDIN;
my %running;    # pid => request id
# A handler, though empty, makes SIGCHLD interrupt the select below. The
# timeout covers a child that ends just before select starts waiting.
$SIG{CHLD} = sub { };
my $stdin = '';
vec($stdin, fileno(STDIN), 1) = 1;

my $buffer = '';
while (1) {
  reap();
  my $ready = select(my $readable = $stdin, undef, undef, %running ? 0.05 : undef);
  next if $ready <= 0;
  my $read = sysread(STDIN, $buffer, 65536, length $buffer);
  if (!defined $read) {
    next if $!{EINTR} || $!{EAGAIN};
    last;
  }
  last if $read == 0;
  while (defined(my $fields = take_request(\$buffer))) {
    launch(@$fields);
  }
}
kill 'KILL', -$_ for keys %running;
exit 0;

sub reap {
  while ((my $pid = waitpid(-1, POSIX::WNOHANG())) > 0) {
    my $status = $?;
    my $id = delete $running{$pid};
    printf "exited %s %d %d\n", $id, $status >> 8, $status & 127 if defined $id;
  }
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

sub launch {
  my @fields = @_;
  my ($id, $uid, $gid, $stdout, $stderr, $status, $nsteps) = splice(@fields, 0, 7);
  my @steps;
  for (1 .. $nsteps) {
    my $kind = shift @fields;
    my $args = STEP_ARGS->{$kind};
    return print "failed $id unknown step $kind\n" unless defined $args;
    push @steps, [$kind, splice(@fields, 0, $args)];
  }
  my @argv = splice(@fields, 0, shift @fields);
  my @env = splice(@fields, 0, shift @fields);

  my $pid = fork;
  if (!defined $pid) {
    print "failed $id fork: $!\n";
  } elsif ($pid == 0) {
    $SIG{CHLD} = 'DEFAULT';
    child($uid, $gid, $stdout, $stderr, $status, \@steps, \@argv, \@env);
  } else {
    $running{$pid} = $id;
    print "started $id $pid\n";
  }
}

# Never returns: execs the command or exits 126 with the reason on the stderr file.
sub child {
  my ($uid, $gid, $stdout, $stderr, $status, $steps, $argv, $env) = @_;
  # Its own session and process group: one kill(-pid) reaches every process that has not left it, and the
  # sandbox has no controlling terminal.
  POSIX::setsid();
  my $flags = POSIX::O_WRONLY() | POSIX::O_CREAT() | POSIX::O_TRUNC();
  my $null = POSIX::open('/dev/null', POSIX::O_RDONLY());
  my $out = POSIX::open($stdout, $flags, 0644);
  my $err = $stderr eq $stdout ? $out : POSIX::open($stderr, $flags, 0644);
  my $info = POSIX::open($status, $flags, 0600);
  POSIX::_exit(126) unless defined $null && defined $out && defined $err && defined $info;
  POSIX::dup2($null, 0);
  POSIX::dup2($out, 1);
  POSIX::dup2($err, 2);
  POSIX::dup2($info, 3);
  POSIX::close($_) for grep { $_ > 3 } $null, $out, $err, $info;
  eval {
    run_step(@$_) for @$steps;
    if ($uid >= 0) {
      $) = "$gid $gid";    # the effective gid, and the supplementary groups reduced to it
      POSIX::setgid($gid) or die "setgid $gid: $!\n";
      POSIX::setuid($uid) or die "setuid $uid: $!\n";
      die "could not become uid $uid\n" if $< != $uid || $> != $uid;
      die "could not drop the groups of root\n" if grep { $_ != $gid } split(' ', $)), split(' ', $();
    }
    chdir '/' or die "chdir /: $!\n";
    %ENV = map { split /=/, $_, 2 } @$env;
    { no warnings 'exec'; exec { $argv->[0] } @$argv; }
    die "cannot run $argv->[0]: $!\n";
  };
  print STDERR LAUNCH_FAILED, $@;
  POSIX::_exit(126);
}

sub run_step {
  my ($kind, @args) = @_;
  if ($kind eq 'private') {
    syscall($SYS_UNSHARE, CLONE_NEWNS) == 0 or die "unshare(CLONE_NEWNS): $!\n";
    my $root = '/';    # syscall() needs a modifiable string to pass a pointer
    syscall($SYS_MOUNT, undef, $root, undef, MS_REC | MS_PRIVATE, undef) == 0
      or die "making the mount namespace private: $!\n";
  } elsif ($kind eq 'mount') {
    my ($source, $target, $type, $mountflags, $data) = @args;
    syscall($SYS_MOUNT, $source, $target, $type, $mountflags + 0, $data) == 0
      or die "mount $type $source on $target: $!\n";
  } elsif ($kind eq 'mkdir') {
    mkdir($args[0], 0755) or $!{EEXIST} or die "mkdir $args[0]: $!\n";
  } elsif ($kind eq 'chdir') {
    chdir($args[0]) or die "chdir $args[0]: $!\n";
  }
}
