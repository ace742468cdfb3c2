import assert from "node:assert/strict";
import { chmod, chown, mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from "node:fs/promises";
import { type AddressInfo, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { overlayMountArgs, writeLayerLinks } from "../image/overlay.js";
import { INPUT_ROOT_AS_ROOT, type OverlayRoot } from "./action-root.js";
import { INPUT_ROOT_MOUNT } from "./bubblewrap.js";
import { openSlotCgroup, removeSlotCgroup } from "./cgroups.js";
import { DEFAULT_LIMITS } from "./limits.js";
import { IO_MOUNT } from "./resident-layout.js";
import {
  type ResidentRunRequest,
  type ResidentRunResult,
  type ResidentSandbox,
  startResidentSandbox,
} from "./resident-sandbox.js";

const isRoot = process.getuid?.() === 0;
/** A range of uids of this test process's own, so that any process of one was started here. */
const UID_BASE = 2_097_000_000 + (process.pid % 100_000) * 10;
let nextUid = UID_BASE;
const PATH = { name: "PATH", value: "/usr/bin:/bin" };
/** SYS_ptrace, for the hostile command that tries it. */
const PTRACE = process.arch === "arm64" ? 117 : 101;

interface Workspace {
  dir: string;
  inputRoot: string;
  uid: number;
}

async function workspace(t: TestContext): Promise<Workspace> {
  const dir = await mkdtemp(join(tmpdir(), "berth-resident-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await chmod(dir, 0o755);
  const uid = nextUid++;
  const inputRoot = join(dir, "input");
  await mkdir(inputRoot);
  await chown(inputRoot, uid, uid);
  return { dir, inputRoot, uid };
}

async function start(
  t: TestContext,
  ws: Workspace,
  options: Partial<Parameters<typeof startResidentSandbox>[0]> = {},
): Promise<ResidentSandbox> {
  const sandbox = await startResidentSandbox({
    inputRoot: ws.inputRoot,
    stateDir: join(ws.dir, "state"),
    uid: ws.uid,
    gid: ws.uid,
    ...options,
  });
  t.after(() => sandbox.close());
  return sandbox;
}

interface Run extends ResidentRunResult {
  stdout: string;
  stderr: string;
}

let nextRun = 0;
async function run(
  sandbox: ResidentSandbox,
  ws: Workspace,
  argv: string[],
  options: Partial<ResidentRunRequest> = {},
): Promise<Run> {
  const n = nextRun++;
  const request: ResidentRunRequest = {
    workingDirectory: "",
    argv,
    env: [PATH],
    timeoutMs: 60_000,
    stdoutPath: join(ws.dir, `${n}.out`),
    stderrPath: join(ws.dir, `${n}.err`),
    ...options,
  };
  const result = await sandbox.run(request);
  const [stdout, stderr] = await Promise.all([
    readFile(request.stdoutPath, "utf8"),
    readFile(request.stderrPath, "utf8"),
  ]);
  return { ...result, stdout, stderr };
}

const sh = (sandbox: ResidentSandbox, ws: Workspace, script: string, options?: Partial<ResidentRunRequest>) =>
  run(sandbox, ws, ["/bin/sh", "-c", script], options);

/** Host pids of every process whose real uid is `uid`. */
async function processesOf(uid: number): Promise<number[]> {
  const found: number[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const status = await readFile(`/proc/${entry}/status`, "utf8");
      const uids = /^Uid:\s+(\d+)/m.exec(status);
      if (Number(uids?.[1]) === uid) found.push(Number(entry));
    } catch {
      // Exited while we looked.
    }
  }
  return found;
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

test("commands run one after another in one sandbox: inputs laid out after its start are seen, and a server one command started answers the next", {
  skip: !isRoot,
}, async (t) => {
  const ws = await workspace(t);
  // Started while the input root is still empty, as a sandbox made ahead of its action.
  const sandbox = await start(t, ws);
  await mkdir(join(ws.inputRoot, "pkg"));
  await chown(join(ws.inputRoot, "pkg"), ws.uid, ws.uid);
  await writeFile(join(ws.inputRoot, "pkg", "data.txt"), "laid out later\n");

  const server =
    'use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1:7777", Listen => 5, ReuseAddr => 1) ' +
    'or die "listen: $!"; open(my $r, ">", "/tmp/ready"); close $r; ' +
    'while (my $c = $s->accept) { print $c "served by $$\\n"; close $c }';
  const first = await sh(
    sandbox,
    ws,
    `perl -e '${server}' </dev/null >/tmp/server.log 2>&1 & ` +
      "while [ ! -e /tmp/ready ]; do sleep 0.01; done; echo $! > /tmp/server.pid; cat data.txt; pwd; echo $GREETING",
    { workingDirectory: "pkg", env: [PATH, { name: "GREETING", value: "hello there" }] },
  );
  assert.equal(first.exitCode, 0, first.stderr);
  assert.equal(first.stdout, `laid out later\n${INPUT_ROOT_MOUNT}/pkg\nhello there\n`);

  const client =
    'use IO::Socket::INET; my $c = IO::Socket::INET->new("127.0.0.1:7777") or die "connect: $!"; print scalar <$c>';
  const second = await run(sandbox, ws, ["perl", "-e", client]);
  assert.equal(second.exitCode, 0, second.stderr);
  const pid = (await sh(sandbox, ws, "cat /tmp/server.pid")).stdout.trim();
  assert.equal(second.stdout, `served by ${pid}\n`, "the first command's server answered the second");
  // Only the environment given, in the command's own working directory.
  const env = await run(sandbox, ws, ["/usr/bin/env"], { env: [{ name: "ONLY", value: "this" }] });
  assert.equal(env.stdout, `ONLY=this\nPWD=${INPUT_ROOT_MOUNT}\n`);
});

test("argv[0] is looked up in the action's PATH, relative paths in its working directory; what cannot run exits 127 with the reason", {
  skip: !isRoot,
}, async (t) => {
  const ws = await workspace(t);
  const sandbox = await start(t, ws);
  await mkdir(join(ws.inputRoot, "tools"));
  await writeFile(join(ws.inputRoot, "tools", "greet"), "#!/bin/sh\necho greeted from $0\n");
  await chmod(join(ws.inputRoot, "tools", "greet"), 0o555);
  const tools = { name: "PATH", value: `${INPUT_ROOT_MOUNT}/tools:/usr/bin:/bin` };

  const found = await run(sandbox, ws, ["greet"], { env: [tools] });
  assert.equal(found.exitCode, 0, found.stderr);
  assert.equal(found.stdout, `greeted from ${INPUT_ROOT_MOUNT}/tools/greet\n`);
  const relativePath = await run(sandbox, ws, ["./greet"], { workingDirectory: "tools" });
  assert.equal(relativePath.stdout, "greeted from ./greet\n");

  // The worker's PATH is not the action's: without the tools directory in it, greet is not found.
  const missing = await run(sandbox, ws, ["greet"]);
  assert.equal(missing.exitCode, 127);
  assert.match(missing.stderr, /execvp greet: No such file or directory/);
  await writeFile(join(ws.inputRoot, "tools", "data"), "not a program\n");
  await chmod(join(ws.inputRoot, "tools", "data"), 0o444);
  const notExecutable = await run(sandbox, ws, ["./tools/data"]);
  assert.equal(notExecutable.exitCode, 127);
  assert.match(notExecutable.stderr, /Permission denied/);
  // A command killed by a signal reports 128 + its number, and the sandbox runs the next one.
  const killed = await sh(sandbox, ws, "kill -TERM $$");
  assert.equal(killed.exitCode, 128 + 15);
  assert.equal((await run(sandbox, ws, ["true"])).exitCode, 0);
  await assert.rejects(
    sandbox.run({
      workingDirectory: "../..",
      argv: ["true"],
      env: [],
      timeoutMs: 0,
      stdoutPath: join(ws.dir, "x"),
      stderrPath: join(ws.dir, "y"),
    }),
    /not inside the input root/,
  );
});

for (const ending of ["timeout", "cancel"] as const) {
  test(`a ${ending === "timeout" ? "timed-out" : "cancelled"} command is killed with every process of its sandbox, which cannot be used again`, {
    skip: !isRoot,
  }, async (t) => {
    const ws = await workspace(t);
    const sandbox = await start(t, ws);
    // Processes that left the command's process group and session, and one left by an earlier command.
    assert.equal((await sh(sandbox, ws, "sleep 1000 >/dev/null 2>&1 &")).exitCode, 0);
    const controller = new AbortController();
    const pending = sh(sandbox, ws, "setsid sleep 1000 & (sleep 1000 &) ; echo started; sleep 1000", {
      timeoutMs: ending === "timeout" ? 500 : 0,
      signal: controller.signal,
    });
    if (ending === "cancel") {
      await sleep(300);
      controller.abort();
    }
    const result = await pending;
    assert.equal(result.exitCode, 137);
    assert.equal(result.timedOut, ending === "timeout");
    assert.equal(result.cancelled, ending === "cancel");
    assert.equal(result.aloneAfter, false);
    assert.equal(result.stdout, "started\n");
    assert.deepEqual(await processesOf(ws.uid), [], "no process of the sandbox is left");
    assert.equal(sandbox.usable, false);
    await assert.rejects(run(sandbox, ws, ["true"]), /cannot run commands/);
  });
}

test("a command gets only what it asked for: its environment (the last of a name wins, PWD its directory), no blocked or ignored signal, a script without #! run by sh", {
  skip: !isRoot,
}, async (t) => {
  const ws = await workspace(t);
  const sandbox = await start(t, ws);
  await mkdir(join(ws.inputRoot, "sub"));
  const env = [PATH, { name: "A", value: "first" }, { name: "PWD", value: "/forged" }, { name: "A", value: "last" }];
  const seen = await sh(sandbox, ws, 'echo "A=$A PWD=$PWD"; env | grep -c "^A="', { env, workingDirectory: "sub" });
  assert.equal(seen.exitCode, 0, seen.stderr);
  assert.equal(seen.stdout, `A=last PWD=${INPUT_ROOT_MOUNT}/sub\n1\n`);
  // The agent reads its children's ends through a blocked SIGCHLD: none of that reaches the command.
  const signals = await run(sandbox, ws, ["grep", "-E", "^Sig(Blk|Ign):", "/proc/self/status"]);
  assert.equal(signals.stdout, "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n");
  // execvp's rule: a file the kernel will not run is handed to /bin/sh.
  await writeFile(join(ws.inputRoot, "plain"), "echo run by sh with $1\n");
  await chmod(join(ws.inputRoot, "plain"), 0o555);
  const script = await run(sandbox, ws, ["./plain", "an argument"]);
  assert.equal(script.exitCode, 0, script.stderr);
  assert.equal(script.stdout, "run by sh with an argument\n");
});

test("close() kills every process the commands left, wherever they went, and removes the sandbox's files", {
  skip: !isRoot,
}, async (t) => {
  const ws = await workspace(t);
  const cgroup = openSlotCgroup(97, { memoryBytes: 512 * 1024 ** 2, processes: 256 });
  if (cgroup) t.after(() => removeSlotCgroup(cgroup));
  const stateDir = join(ws.dir, "state");
  const sandbox = await start(t, ws, cgroup ? { cgroup } : {});
  const result = await sh(
    sandbox,
    ws,
    "setsid sleep 1000 & nohup sleep 1000 >/dev/null 2>&1 & (sh -c 'sleep 1000 &' &) ; sleep 0.2; echo ok",
  );
  assert.equal(result.stdout, "ok\n");
  const before = await processesOf(ws.uid);
  // bwrap, the agent and three sleeps.
  assert.ok(before.length >= 5, `the commands' processes stay between runs: ${before}`);
  if (cgroup) {
    const procs = (await readFile(cgroup.procsFiles[0] as string, "utf8")).split("\n").filter(Boolean).map(Number);
    for (const pid of before) assert.ok(procs.includes(pid), `${pid} is in the slot's cgroup`);
  }
  await sandbox.close();
  assert.deepEqual(await processesOf(ws.uid), [], "close() leaves no process");
  if (cgroup) {
    const procs = (await readFile(cgroup.procsFiles[0] as string, "utf8")).split("\n").filter(Boolean).map(Number);
    for (const pid of before) assert.ok(!procs.includes(pid), `${pid} left the cgroup`);
  }
  assert.equal(await exists(stateDir), false, "close() removes the sandbox's directory");
  assert.equal(await exists(ws.inputRoot), true, "the input root is the caller's");
});

test("a run says whether anything was left running: never while a process the command started lives on, wherever it went", {
  skip: !isRoot,
}, async (t) => {
  const ws = await workspace(t);
  const sandbox = await start(t, ws);
  assert.equal((await run(sandbox, ws, ["/bin/true"])).aloneAfter, true, "/bin/true leaves nothing");
  const waited = await sh(sandbox, ws, "sleep 0.05 & wait; echo done");
  assert.equal(waited.aloneAfter, true, "a child the command waited for is gone");
  const leftovers = {
    "a background process": "sleep 1000 >/dev/null 2>&1 &",
    "a session of its own": "setsid sleep 1000 >/dev/null 2>&1 &",
    "an orphan (double fork)": "(sh -c 'sleep 1000 >/dev/null 2>&1 &' &)",
    "a process that exits a moment later": "(sleep 0.3; echo late > late.txt) >/dev/null 2>&1 &",
  };
  for (const [what, script] of Object.entries(leftovers)) {
    const left = await sh(sandbox, ws, script);
    assert.equal(left.exitCode, 0, left.stderr);
    assert.equal(left.aloneAfter, false, `${what} is still running`);
  }
  await sandbox.close();
  assert.deepEqual(await processesOf(ws.uid), [], "close() leaves no process");

  // Once what the last command left has ended on its own, the next command's end is seen alone again.
  const ws2 = await workspace(t);
  const second = await start(t, ws2);
  assert.equal((await sh(second, ws2, "sleep 0.2 >/dev/null 2>&1 &")).aloneAfter, false);
  await sleep(400);
  assert.equal((await run(second, ws2, ["/bin/true"])).aloneAfter, true, "the sleep ended and was reaped");
});

test("hostile: a command cannot reach the agent's pipes or its descriptors, trace it, kill it or stop it", {
  skip: !isRoot,
}, async (t) => {
  const ws = await workspace(t);
  const sandbox = await start(t, ws);
  const attack = [
    // What the command holds: its three standard descriptors, and the directory perl lists them with.
    `perl -e 'opendir D, "/proc/self/fd"; print join(" ", sort grep /^\\d+$/, readdir D), "\\n"'`,
    "ls /proc/1/fd 2>&1 | sed 's/^ls: //'",
    "cat /proc/1/fd/4 2>&1 | sed 's/^cat: //'",
    "echo forged > /proc/1/fd/1 2>/dev/null || echo 'cannot write the reply pipe'",
    "readlink /proc/1/root || echo 'cannot see the agent root'",
    `perl -e 'print syscall(${PTRACE}, 16, 1, 0, 0) == 0 ? "attached\\n" : "ptrace refused: $!\\n"'`,
    // Named pipes anywhere the command can see: the agent's are unlinked.
    "find / -xdev -type p 2>/dev/null | wc -l",
    "grep CapEff /proc/self/status",
    "kill -KILL 1; kill -STOP 1; kill -TERM 1; echo signals sent",
  ].join("; ");
  const result = await sh(sandbox, ws, attack);
  assert.equal(result.exitCode, 0, result.stderr);
  assert.deepEqual(result.stdout.trim().split("\n"), [
    "0 1 2 3",
    "cannot open directory '/proc/1/fd': Permission denied",
    "/proc/1/fd/4: Permission denied",
    "cannot write the reply pipe",
    "cannot see the agent root",
    "ptrace refused: Operation not permitted",
    "0",
    "CapEff:\t0000000000000000",
    "signals sent",
  ]);
  // Its stdout file lies in the sandbox's io directory: replaced by a link to a host file only root may read,
  // or by a FIFO, it must not make the worker read that file, or hang.
  const secret = join(ws.dir, "secret");
  await writeFile(secret, "root's secret\n", { mode: 0o600 });
  const linked = await sh(sandbox, ws, `f=$(readlink /proc/$$/fd/1); rm "$f"; ln -s ${secret} "$f"`);
  assert.equal(linked.exitCode, 0, linked.stderr);
  assert.equal(linked.stdout, "", "the worker did not follow the command's link");
  const fifo = await sh(sandbox, ws, 'f=$(readlink /proc/$$/fd/2); rm "$f"; mkfifo "$f"');
  assert.equal(fifo.exitCode, 0);
  assert.equal(fifo.stderr, "");
  const directory = await sh(sandbox, ws, 'f=$(readlink /proc/$$/fd/1); rm "$f"; mkdir "$f"; echo more > "$f/x"');
  assert.equal(directory.exitCode, 0, directory.stderr);
  assert.equal(directory.stdout, "");
  // The same link, when the worker's file is on another file system (copied rather than moved).
  const elsewhere = await mkdtemp(join("/dev/shm", "berth-resident-"));
  t.after(() => rm(elsewhere, { recursive: true, force: true }));
  const copied = await sh(sandbox, ws, `f=$(readlink /proc/$$/fd/1); rm "$f"; ln -s ${secret} "$f"`, {
    stdoutPath: join(elsewhere, "out"),
  });
  assert.equal(copied.stdout, "");
  const plain = await sh(sandbox, ws, "echo copied", { stdoutPath: join(elsewhere, "plain") });
  assert.equal(plain.stdout, "copied\n");
  // The agent ignored the signals (a PID namespace's first process gets none from inside) and still works.
  await sleep(100);
  assert.equal(sandbox.usable, true);
  const after = await run(sandbox, ws, ["echo", "still here"]);
  assert.equal(after.stdout, "still here\n");
});

test("hostile: a FIFO or a link planted where the next command's output goes fails that command, not the agent", {
  skip: !isRoot,
}, async (t) => {
  const ws = await workspace(t);
  const sandbox = await start(t, ws);
  // Commands on the host's root see the agent's io directory; ids go up by one (this run is 0). The FIFO at
  // 3.out has a reader that stays, the command's own sleep.
  const planted = await sh(
    sandbox,
    ws,
    "cd /run/berth/io && mkfifo 1.out 3.out && ln -s /etc/hostname 2.err && (sleep 1000 <>3.out >/dev/null 2>&1 &) && " +
      "{ mv /run/berth /run/moved 2>&1 || echo /run/berth stays; }",
  );
  assert.equal(planted.exitCode, 0, planted.stderr);
  // Nor can the command move the agent's io and working directories away and put its own in their place.
  assert.match(planted.stdout, /Read-only file system\n\/run\/berth stays\n$/);
  // No reader will ever come to the FIFO: the agent does not wait for one.
  await assert.rejects(run(sandbox, ws, ["true"]), /could not start the command: cannot open .*No such device/);
  await assert.rejects(run(sandbox, ws, ["true"]), /could not start the command: cannot open .*symbolic links/);
  await assert.rejects(run(sandbox, ws, ["true"]), /could not start the command: cannot open .*not a regular file/);
  const after = await run(sandbox, ws, ["sh", "-c", "echo still runs; pwd"]);
  assert.equal(after.stdout, `still runs\n${INPUT_ROOT_MOUNT}\n`);
});

test("hostile: a process that stops the next command before its exec costs that command, not the agent", {
  skip: !isRoot,
  // An agent held in its start would never answer this run (it has no timeout of its own).
  timeout: 30_000,
}, async (t) => {
  const ws = await workspace(t);
  const sandbox = await start(t, ws);
  // Waits for the next pid of the sandbox and stops it while it is still the agent's child before its exec.
  const stopper =
    'open(L, ">", "/tmp/stopper.log"); my $n; { open(F, "<", "/proc/sys/kernel/ns_last_pid"); $n = <F> + 1; close F } ' +
    'open(R, ">", "ready"); close R; ' +
    'for (;;) { next unless kill("STOP", $n); open(C, "<", "/proc/$n/comm"); my $c = <C>; close C; ' +
    'if ($c eq "berth-agent\\n") { print L "stopped $n\\n"; close L; exit 0 } kill("CONT", $n); $n++ }';
  const started = await sh(sandbox, ws, `perl -e '${stopper}' </dev/null >/dev/null 2>&1 &`);
  assert.equal(started.exitCode, 0, started.stderr);
  // Waited for from outside: a command would start processes of its own, which the stopper would watch.
  while (!(await exists(join(ws.inputRoot, "ready")))) await sleep(10);
  // A long PATH to search keeps the child before its exec for milliseconds: the stopper cannot miss it.
  const dirs = Array.from({ length: 4000 }, (_, i) => `/nonexistent/${i}`).join(":");
  const slowPath = { name: "PATH", value: `${dirs}:/usr/bin:/bin` };
  const held = await run(sandbox, ws, ["echo", "never"], { timeoutMs: 0, env: [slowPath] });
  assert.equal(held.exitCode, 128 + 9, held.stderr);
  assert.match(held.stderr, /held before it could start/);
  assert.equal(held.stdout, "");
  const log = await run(sandbox, ws, ["cat", "/tmp/stopper.log"]);
  assert.match(log.stdout, /^stopped \d+$/m, "the stopper did stop the command before its exec");
  const after = await run(sandbox, ws, ["echo", "still runs"]);
  assert.equal(after.stdout, "still runs\n");
});

test("hostile: an agent that dies mid-command fails that run cleanly, and close() leaves nothing", {
  skip: !isRoot,
}, async (t) => {
  const ws = await workspace(t);
  const sandbox = await start(t, ws);
  const pending = sh(sandbox, ws, "sleep 1000 & sleep 1000");
  await sleep(200);
  // As if it crashed: only the host can kill it.
  process.kill(sandbox.agentPid as number, "SIGKILL");
  await assert.rejects(pending, /the resident sandbox ended/);
  assert.equal(sandbox.usable, false);
  await sandbox.close();
  assert.deepEqual(await processesOf(ws.uid), []);
});

test("hostile: a fork bomb stops at the slot's process limit, breaks only its own sandbox, and is gone after close()", {
  skip: !isRoot,
}, async (t) => {
  const ws = await workspace(t);
  const limits = { ...DEFAULT_LIMITS, maxProcesses: 40 };
  const sandbox = await start(t, ws, { limits });
  const other = await workspace(t);
  const neighbour = await start(t, other, { limits });
  // The command returns at once; what it left forks until the limit refuses, its children staying, and says
  // so in a file of the input root. The run's own process is gone by then, so every process is taken.
  const bombScript =
    "exit 0 if fork; sleep 0.05 while getppid() != 1; sleep 0.2; my $n = 0; " +
    "while (1) { my $p = fork; last unless defined $p; if ($p == 0) { sleep 1000; exit 0 } $n++ } " +
    'my $why = "$!"; open(my $f, ">", "refused.tmp"); print $f "refused after $n: $why\n"; close $f; ' +
    'rename "refused.tmp", "refused"; sleep 1000';
  const bomb = await run(sandbox, ws, ["perl", "-e", bombScript]);
  assert.equal(bomb.exitCode, 0);
  const report = join(ws.inputRoot, "refused");
  while (!(await exists(report))) await sleep(20);
  assert.match(await readFile(report, "utf8"), /^refused after \d+: Resource temporarily unavailable$/m);
  const count = (await processesOf(ws.uid)).length;
  assert.ok(count <= limits.maxProcesses, `${count} processes, within the limit of ${limits.maxProcesses}`);
  // With every process taken, the agent cannot start the next command: that run fails, clearly.
  await assert.rejects(
    run(sandbox, ws, ["true"]),
    /could not start the command: fork: Resource temporarily unavailable/,
  );
  // Another slot's sandbox (another uid) is untouched.
  assert.equal((await run(neighbour, other, ["echo", "fine"])).stdout, "fine\n");
  await sandbox.close();
  assert.deepEqual(await processesOf(ws.uid), []);
});

test("a command that fails at the slot cgroup's process limit is told so, and its sandbox then runs the next", {
  skip: !isRoot,
}, async (t) => {
  const limits = { ...DEFAULT_LIMITS, maxProcesses: 48 };
  const cgroup = openSlotCgroup(95, { memoryBytes: 512 * 1024 ** 2, processes: limits.maxProcesses });
  if (!cgroup) return t.skip("no writable cgroup with the memory and pids controllers on this host");
  t.after(() => removeSlotCgroup(cgroup));
  const ws = await workspace(t);
  const sandbox = await start(t, ws, { limits, cgroup });
  // Forks until refused, then exits 1 with its children: the cgroup counted the refusal.
  const bomb = await run(sandbox, ws, [
    "perl",
    "-e",
    "my @kids; while (1) { my $p = fork; last unless defined $p; if ($p == 0) { sleep 1000; exit 0 } push @kids, $p } " +
      'print "refused after ", scalar(@kids), ": $!\n"; kill "KILL", @kids; waitpid($_, 0) for @kids; exit 1',
  ]);
  assert.equal(bomb.exitCode, 1);
  assert.match(bomb.stdout, /^refused after \d+: Resource temporarily unavailable\n$/);
  assert.equal(bomb.limitReached?.limit, "maxProcesses");
  assert.match(bomb.limitReached?.message ?? "", /worker\.limits\.maxProcesses/);
  const procs = (await readFile(cgroup.procsFiles.at(-1) as string, "utf8")).split("\n").filter(Boolean);
  assert.ok(procs.length <= limits.maxProcesses, `${procs.length} processes in the slot's cgroup`);
  // What it started is gone; the sandbox goes on.
  assert.equal((await run(sandbox, ws, ["echo", "next"])).stdout, "next\n");
});

test("a command past the disk limit is stopped with its sandbox, and the result names the limit", {
  skip: !isRoot,
}, async (t) => {
  const ws = await workspace(t);
  const limits = { ...DEFAULT_LIMITS, diskBytes: 1_000_000 };
  const sandbox = await start(t, ws, { limits });
  // Written by a process the command leaves behind, which counts as much as the command's own writes, into
  // the sandbox's io directory, which is on the host's disk as much as the input root.
  const result = await sh(sandbox, ws, `(head -c 3000000 /dev/zero > ${IO_MOUNT}/big; sleep 1000) & sleep 1000`, {
    timeoutMs: 20_000,
  });
  assert.equal(result.limitReached?.limit, "diskBytes");
  assert.match(result.limitReached?.message ?? "", /worker\.limits\.diskBytes/);
  assert.equal(result.exitCode, 137);
  assert.equal(result.timedOut, false);
  assert.equal(sandbox.usable, false);
  assert.deepEqual(await processesOf(ws.uid), []);
});

test("spawnPiped: a long-lived process talks to the worker through pipes, and kill() ends it", {
  skip: !isRoot,
}, async (t) => {
  const ws = await workspace(t);
  const sandbox = await start(t, ws);
  const echo = await sandbox.spawnPiped(
    ["perl", "-e", '$| = 1; while (<STDIN>) { print "echo: $_" } print STDERR "stdin closed\\n"'],
    [PATH],
    "",
  );
  const stdout: Buffer[] = [];
  const stderr: Buffer[] = [];
  echo.stdout.on("data", (chunk: Buffer) => stdout.push(chunk));
  echo.stderr.on("data", (chunk: Buffer) => stderr.push(chunk));
  echo.stdin.write("one\n");
  while (!Buffer.concat(stdout).toString().includes("echo: one\n")) await sleep(5);
  echo.stdin.write("two\n");
  while (!Buffer.concat(stdout).toString().includes("echo: two\n")) await sleep(5);
  echo.stdin.end();
  assert.equal(await echo.exited, 0);
  assert.equal(Buffer.concat(stderr).toString(), "stdin closed\n");
  // Its pipes have no name left in the io directory.
  assert.deepEqual(await readdir(join(ws.dir, "state", "io")), []);

  const sleeper = await sandbox.spawnPiped(["sleep", "1000"], [PATH], "");
  sleeper.kill();
  assert.equal(await sleeper.exited, 137);
  assert.equal((await run(sandbox, ws, ["echo", "next"])).stdout, "next\n");
});

test("network access is the sandbox's, for every command: its own loopback without, a slirp4netns interface with", {
  skip: !isRoot,
}, async (t) => {
  const interfaces = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ' '";
  const ws = await workspace(t);
  const closed = await start(t, ws);
  assert.equal((await sh(closed, ws, interfaces)).stdout, "lo ");
  const other = await workspace(t);
  const open = await start(t, other, { network: true });
  assert.equal((await sh(open, other, interfaces)).stdout, "lo tap0 ");
  // The host's loopback, where the farm listens, stays out of reach (slirp4netns --disable-host-loopback),
  // here a listener of the test's own.
  const listener = createServer((socket) => socket.end("host\\n"));
  await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve));
  t.after(() => listener.close());
  const port = (listener.address() as AddressInfo).port;
  const probe = await run(open, other, [
    "perl",
    "-MIO::Socket::INET",
    "-e",
    `print IO::Socket::INET->new(PeerAddr => "10.0.2.2:${port}", Timeout => 2) ? "reached\\n" : "refused\\n"`,
  ]);
  assert.equal(probe.stdout, "refused\n");
  await open.close();
  assert.deepEqual(await processesOf(other.uid), []);
});

/** A root of busybox alone: `dir` gets bin/busybox and the applets the tests use. */
async function busyboxRoot(dir: string): Promise<void> {
  await mkdir(join(dir, "bin"), { recursive: true });
  await writeFile(join(dir, "bin", "busybox"), await readFile("/usr/bin/busybox"));
  await chmod(join(dir, "bin", "busybox"), 0o755);
  for (const applet of ["sh", "cat", "ls", "sleep", "echo", "grep", "readlink", "chroot", "test", "id", "find", "wc"]) {
    await symlink("busybox", join(dir, "bin", applet));
  }
}

const BUSYBOX_PATH = { name: "PATH", value: "/bin" };

test("an image's overlay root: commands see only the image and the input root, and keep their processes between runs", {
  skip: !isRoot,
}, async (t) => {
  const ws = await workspace(t);
  const layer = join(ws.dir, "layer");
  await busyboxRoot(layer);
  await mkdir(join(layer, "etc"));
  await writeFile(join(layer, "etc", "image-release"), "busybox image\n");
  await mkdir(join(layer, "data"));
  await chmod(join(layer, "data"), 0o777);
  const upperDir = join(ws.dir, "upper");
  const workDir = join(ws.dir, "work");
  await mkdir(upperDir);
  await mkdir(workDir);
  const overlay = overlayMountArgs([layer], upperDir, workDir, join(ws.dir, "links"));
  await writeLayerLinks(overlay);
  const root: OverlayRoot = {
    kind: "overlay",
    overlayOptions: overlay.options,
    overlayCwd: overlay.cwd,
    upperDir,
    inputRootPath: "/workspace",
  };
  const sandbox = await start(t, ws, { root });
  await writeFile(join(ws.inputRoot, "input.txt"), "an input\n");
  const env = [BUSYBOX_PATH];
  const first = await sh(
    sandbox,
    ws,
    "cat /etc/image-release input.txt; pwd; test -e /usr/bin/perl && echo host visible; ls /run; sleep 1000 & echo $! > /tmp/sleeper",
    { env },
  );
  assert.equal(first.exitCode, 0, first.stderr);
  assert.equal(first.stdout, "busybox image\nan input\n/workspace\n");
  assert.match(first.stderr, /\/run.*No such file or directory/, "the agent's /run is not the command's");
  const second = await sh(
    sandbox,
    ws,
    "test -d /proc/$(cat /tmp/sleeper) && echo sleeper alive; chroot / true 2>/dev/null || echo chroot refused; " +
      "readlink /proc/1/root || echo agent root hidden; grep CapEff /proc/self/status",
    { env },
  );
  assert.equal(second.stdout, "sleeper alive\nchroot refused\nagent root hidden\nCapEff:\t0000000000000000\n");
  // What the command wrote to the image landed in the upper layer, not in the layer.
  assert.equal((await sh(sandbox, ws, "echo written > /data/new", { env })).exitCode, 0);
  assert.equal(await exists(join(layer, "data", "new")), false);
  assert.equal(await readFile(join(upperDir, "data", "new"), "utf8"), "written\n");
  await sandbox.close();
  assert.deepEqual(await processesOf(ws.uid), []);
});

test("a chroot input root laid out after the sandbox started: the input root is the whole of what commands see", {
  skip: !isRoot,
}, async (t) => {
  const ws = await workspace(t);
  const sandbox = await start(t, ws, { root: INPUT_ROOT_AS_ROOT });
  // The whole sysroot arrives with the action.
  await busyboxRoot(ws.inputRoot);
  await mkdir(join(ws.inputRoot, "src"));
  await writeFile(join(ws.inputRoot, "src", "main.c"), "int main() {}\n");
  const result = await sh(sandbox, ws, "ls /; cat main.c; pwd; id -u", {
    env: [BUSYBOX_PATH],
    workingDirectory: "src",
  });
  assert.equal(result.exitCode, 0, result.stderr);
  assert.equal(result.stdout, "bin\ndev\nproc\nsrc\ntmp\nint main() {}\n/src\n65534\n");
  await sandbox.close();
  assert.deepEqual(await processesOf(ws.uid), []);
});
