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
#   id uid gid stdout stderr status fd4 nsteps step... argc argv... envc env...
# where a step is `private`, `mount SOURCE TARGET TYPE FLAGS DATA`,
# `mkdir PATH`, `chdir PATH`, `rlimit RESOURCE SOFT HARD`, `cgroup PROCSFILE`,
# `netns SLIRP4NETNS` or `oom_score_adj VALUE`; uid -1 keeps root; fd4 is a file opened read-only
# as descriptor 4, or empty for none. Replies on stdout,
# one line each: `started ID PID`, `failed ID MESSAGE`,
# `exited ID CODE SIGNAL`. When stdin closes (the worker is gone), every
# sandbox still running is killed and the launcher exits; when the worker
# dies, the kernel kills the launcher (PR_SET_PDEATHSIG) and, in turn, every
# program it started.
use strict;
use warnings;
use POSIX ();

# The numbers of the system calls perl has no function for; they differ
# between architectures, so launcher.ts passes them (x86_64: 165 272 302 157).
my ($SYS_MOUNT, $SYS_UNSHARE, $SYS_PRLIMIT64, $SYS_PRCTL) = map { $_ + 0 } @ARGV;
die "usage: launcher.pl SYS_mount SYS_unshare SYS_prlimit64 SYS_prctl\n"
  unless $SYS_MOUNT && $SYS_UNSHARE && $SYS_PRLIMIT64 && $SYS_PRCTL;

use constant CLONE_NEWNS => 0x00020000;
use constant CLONE_NEWNET => 0x40000000;
use constant MS_REC => 0x4000;
use constant MS_PRIVATE => 0x40000;
use constant PR_SET_PDEATHSIG => 1;
use constant SIGKILL => 9;
use constant LAUNCH_FAILED => 'berth launcher: ';
use constant STEP_ARGS => { private => 0, mount => 5, mkdir => 1, chdir => 1, rlimit => 3, cgroup => 1, netns => 1, oom_score_adj => 1 };

# Descriptors the worker inherited from whoever started it (a shell, a
# service manager, a test holding a file open) must reach no sandbox: every
# one above stderr is closed before anything else happens.
close_inherited_descriptors();
# Dies with the worker, even when it is killed outright; its children follow
# (see child()). A worker already gone before this call left us to init.
die_with_parent();

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
  my ($id, $uid, $gid, $stdout, $stderr, $status, $fd4, $nsteps) = splice(@fields, 0, 8);
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
    child($uid, $gid, $stdout, $stderr, $status, $fd4, \@steps, \@argv, \@env);
  } else {
    $running{$pid} = $id;
    print "started $id $pid\n";
  }
}

# Never returns: execs the command or exits 126 with the reason on the stderr file.
sub child {
  my ($uid, $gid, $stdout, $stderr, $status, $fd4, $steps, $argv, $env) = @_;
  my $launcher = getppid();
  # Its own session and process group: one kill(-pid) reaches every process that has not left it, and the
  # sandbox has no controlling terminal.
  POSIX::setsid();
  my $flags = POSIX::O_WRONLY() | POSIX::O_CREAT() | POSIX::O_TRUNC();
  my $null = POSIX::open('/dev/null', POSIX::O_RDONLY());
  my $out = POSIX::open($stdout, $flags, 0644);
  my $err = $stderr eq $stdout ? $out : POSIX::open($stderr, $flags, 0644);
  my $info = POSIX::open($status, $flags, 0600);
  POSIX::_exit(126) unless defined $null && defined $out && defined $err && defined $info;
  # The program's user owns its stdout and stderr files: a command that reopens them by name
  # (`echo … > /dev/stderr`, through /proc/self/fd/2) is checked against the file's owner and mode, and a
  # file of root's would refuse it. They lie outside what the program can reach by any other name.
  POSIX::_exit(126) if $uid >= 0 && chown($uid, $gid, $stdout, $stderr) != ($stderr eq $stdout ? 1 : 2);
  POSIX::dup2($null, 0);
  POSIX::dup2($out, 1);
  POSIX::dup2($err, 2);
  POSIX::dup2($info, 3);
  POSIX::close($_) for grep { $_ > 3 } $null, $out, $err, $info;
  if ($fd4 ne '') {
    # Opened as root, before the switch of user: the program reads it through the descriptor alone.
    my $input = POSIX::open($fd4, POSIX::O_RDONLY());
    POSIX::_exit(126) unless defined $input;
    if ($input != 4) {
      POSIX::dup2($input, 4);
      POSIX::close($input);
    }
  }
  eval {
    run_step(@$_) for @$steps;
    if ($uid >= 0) {
      $) = "$gid $gid";    # the effective gid, and the supplementary groups reduced to it
      POSIX::setgid($gid) or die "setgid $gid: $!\n";
      POSIX::setuid($uid) or die "setuid $uid: $!\n";
      die "could not become uid $uid\n" if $< != $uid || $> != $uid;
      die "could not drop the groups of root\n" if grep { $_ != $gid } split(' ', $)), split(' ', $();
    }
    # The kernel clears the parent-death signal when the user changes, so it is set after that: when the
    # launcher dies, so does the program (bwrap, whose --die-with-parent takes the sandbox along). A
    # launcher gone before this point is seen through getppid.
    die_with_parent();
    die "the launcher is gone\n" if getppid() != $launcher;
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
  } elsif ($kind eq 'rlimit') {
    # prlimit64(0, resource, &new, NULL) on this process: struct rlimit64 is two unsigned 64-bit numbers.
    # Limits are lowered while still root, so the program cannot raise them again (only the soft one, up
    # to the hard one). perl-base has no BSD::Resource, hence the system call.
    # Limits are only ever lowered: raising a hard limit needs CAP_SYS_RESOURCE, which a worker in a
    # container may lack, and a host's lower limit is the operator's choice.
    my ($resource, $soft, $hard) = @args;
    my $current = pack('QQ', 0, 0);
    syscall($SYS_PRLIMIT64, 0, $resource + 0, 0, $current) == 0 or die "getrlimit($resource): $!\n";
    my ($current_soft, $current_hard) = unpack('QQ', $current);
    $hard = $current_hard if $current_hard < $hard;
    $soft = $hard if $hard < $soft;
    my $limit = pack('QQ', $soft, $hard);
    syscall($SYS_PRLIMIT64, 0, $resource + 0, $limit, 0) == 0 or die "setrlimit($resource, $soft): $!\n";
  } elsif ($kind eq 'cgroup') {
    # Joining the cgroup before the exec puts every later process of the sandbox in it.
    open(my $procs, '>', $args[0]) or die "open $args[0]: $!\n";
    print $procs "$$\n" or die "write $args[0]: $!\n";
    close($procs) or die "joining the cgroup $args[0]: $!\n";
  } elsif ($kind eq 'netns') {
    private_network(@args);
  } elsif ($kind eq 'oom_score_adj') {
    open(my $adj, '>', '/proc/self/oom_score_adj') or die "open /proc/self/oom_score_adj: $!\n";
    print $adj "$args[0]\n";
    close($adj) or die "setting oom_score_adj to $args[0]: $!\n";
  }
}

# A network namespace of its own, reaching outside only through slirp4netns (user-mode networking, run as
# root outside the namespace): outbound TCP and UDP go through slirp4netns's sockets on the host, while
# --disable-host-loopback refuses its gateway address (10.0.2.2), the way to the host's loopback, where the
# farm's own ports listen. The namespace's own 127.0.0.1 is its own. slirp4netns
# parses the action's packets as root, so it confines itself (--enable-sandbox:
# its own mount namespace with almost nothing in it; --enable-seccomp).
sub private_network {
  my ($slirp) = @_;
  pipe(my $go_read, my $go_write) or die "pipe: $!\n";
  pipe(my $ready_read, my $ready_write) or die "pipe: $!\n";
  my $target = $$;
  my $helper = fork;
  die "fork: $!\n" unless defined $helper;
  if ($helper == 0) {
    eval {
      close $go_write;
      close $ready_read;
      # Waits for the namespace to exist, staying in the host's.
      sysread($go_read, my $byte, 1) == 1 or POSIX::_exit(0);
      # slirp4netns lives as long as its parent, which becomes bwrap.
      die_with_parent();
      POSIX::_exit(0) if getppid() != $target;
      my $flags = fcntl($ready_write, POSIX::F_GETFD(), 0);
      fcntl($ready_write, POSIX::F_SETFD(), $flags & ~POSIX::FD_CLOEXEC()) or die "fcntl: $!\n";
      # The action's descriptors (its stdout and stderr files, the status file, the argument file) are not
      # slirp4netns's business: its chatter ("sent tapfd=…") must not become the action's (cached) stderr,
      # and it must hold nothing of the action's open. It keeps /dev/null and the ready pipe only; a failure
      # to start shows as the launcher's "did not set up the network".
      my $null = POSIX::open('/dev/null', POSIX::O_RDWR());
      defined $null or die "open /dev/null: $!\n";
      for my $fd (0, 1, 2) {
        defined POSIX::dup2($null, $fd) or die "dup2: $!\n";
      }
      close_inherited_descriptors(fileno($ready_write));
      no warnings 'exec';
      exec { $slirp } $slirp, '--configure', '--mtu=65520', '--disable-host-loopback', '--enable-sandbox', '--enable-seccomp',
        '--ready-fd=' . fileno($ready_write), $target, 'tap0';
      die "cannot run $slirp: $!\n";
    };
    print STDERR LAUNCH_FAILED, $@;
    POSIX::_exit(126);
  }
  close $go_read;
  close $ready_write;
  syscall($SYS_UNSHARE, CLONE_NEWNET) == 0 or die "unshare(CLONE_NEWNET): $!\n";
  syswrite($go_write, '1') == 1 or die "signalling slirp4netns: $!\n";
  close $go_write;
  sysread($ready_read, my $ready, 1) == 1 or die "slirp4netns ($slirp) did not set up the network\n";
  close $ready_read;
}

sub die_with_parent {
  syscall($SYS_PRCTL, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) == 0 or die "prctl(PR_SET_PDEATHSIG): $!\n";
}

# Closes every descriptor above stderr but those given.
sub close_inherited_descriptors {
  my %keep = map { $_ => 1 } @_;
  opendir(my $dir, '/proc/self/fd') or die "opendir /proc/self/fd: $!\n";
  my @open = grep { /^\d+$/ && $_ > 2 && !$keep{$_} } readdir($dir);
  my $own = fileno($dir);
  closedir($dir);
  POSIX::close($_) for grep { $_ != $own } @open;
}
