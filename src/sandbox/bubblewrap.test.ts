import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { chmod, chown, mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, writeFile } from "node:fs/promises";
import { createServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { BubblewrapSandbox, INPUT_ROOT_MOUNT } from "./bubblewrap.js";
import type { SandboxRequest, SandboxResult } from "./sandbox.js";

const NOBODY = 65534;
const PATH = { name: "PATH", value: "/usr/bin:/bin" };
const sandbox = new BubblewrapSandbox();

interface Workspace {
  dir: string;
  inputRoot: string;
}

/** Laid out the way a worker does it: directories the action may write in, inputs owned by root and read-only. */
async function workspace(t: TestContext): Promise<Workspace> {
  const dir = await mkdtemp(join(tmpdir(), "berth-sandbox-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await chmod(dir, 0o755);
  const inputRoot = join(dir, "input");
  await mkdir(inputRoot);
  await chown(inputRoot, NOBODY, NOBODY);
  return { dir, inputRoot };
}

async function inputDir(ws: Workspace, path: string): Promise<void> {
  await mkdir(join(ws.inputRoot, path), { recursive: true });
  await chown(join(ws.inputRoot, path), NOBODY, NOBODY);
}

async function inputFile(ws: Workspace, path: string, content: string, mode: number): Promise<void> {
  await writeFile(join(ws.inputRoot, path), content);
  await chmod(join(ws.inputRoot, path), mode);
}

interface Run extends SandboxResult {
  stdout: string;
  stderr: string;
}

async function run(ws: Workspace, argv: string[], options: Partial<SandboxRequest> = {}): Promise<Run> {
  const request: SandboxRequest = { ...baseRequest(ws), argv, ...options };
  const result = await sandbox.run(request);
  const [stdout, stderr] = await Promise.all([
    readFile(request.stdoutPath, "utf8"),
    readFile(request.stderrPath, "utf8"),
  ]);
  return { ...result, stdout, stderr };
}

const sh = (ws: Workspace, script: string, options?: Partial<SandboxRequest>) => run(ws, ["sh", "-c", script], options);

interface HostProcess {
  pid: number;
  pgrp: number;
  command: string;
}

async function processes(pattern: RegExp): Promise<HostProcess[]> {
  const found: HostProcess[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const command = (await readFile(`/proc/${entry}/cmdline`, "utf8")).split("\0").join(" ").trim();
      if (!pattern.test(command)) continue;
      const procStat = await readFile(`/proc/${entry}/stat`, "utf8");
      const pgrp = Number(procStat.slice(procStat.lastIndexOf(")") + 2).split(" ")[2]);
      found.push({ pid: Number(entry), pgrp, command });
    } catch {
      // Exited while we looked.
    }
  }
  return found;
}

function alive(pid: number): boolean {
  try {
    const procStat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return procStat.slice(procStat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
}

async function waitForProcesses(pattern: RegExp, count: number): Promise<HostProcess[]> {
  for (let i = 0; i < 200; i++) {
    const found = await processes(pattern);
    if (found.length >= count) return found;
    await sleep(10);
  }
  assert.fail(`fewer than ${count} processes match ${pattern}`);
}

test("output, exit code, exact environment, working directory and argv[0] lookup", async (t) => {
  const ws = await workspace(t);
  const result = await sh(ws, "echo out; echo err >&2; exit 3");
  assert.deepEqual(
    { exitCode: result.exitCode, stdout: result.stdout, stderr: result.stderr },
    { exitCode: 3, stdout: "out\n", stderr: "err\n" },
  );
  assert.equal(result.timedOut, false);
  assert.equal(result.cancelled, false);
  assert.ok(result.startedAt <= result.completedAt);

  await inputDir(ws, "pkg/sub");
  // The action sees its input root at a fixed path, whichever host directory holds it.
  const workDir = join(INPUT_ROOT_MOUNT, "pkg/sub");
  const env = [
    { name: "ZED", value: "first" },
    PATH,
    { name: "SPACED", value: " a = b " },
    { name: "EMPTY", value: "" },
  ];
  const envRun = await run(ws, ["env"], { workingDirectory: "pkg/sub", env });
  // PWD is bubblewrap's only addition.
  assert.equal(envRun.stdout, `ZED=first\nPATH=/usr/bin:/bin\nSPACED= a = b \nEMPTY=\nPWD=${workDir}\n`);

  assert.equal((await run(ws, ["pwd"], { workingDirectory: "pkg/sub" })).stdout, `${workDir}\n`);

  await inputFile(ws, "pkg/sub/hello.sh", '#!/bin/sh\necho hello "$@"\n', 0o555);
  const script = await run(ws, ["./hello.sh", "world"], { workingDirectory: "pkg/sub" });
  assert.deepEqual([script.exitCode, script.stdout], [0, "hello world\n"]);
});

test("read-only host, writable input root, private /tmp, unprivileged user, protected inputs", async (t) => {
  const ws = await workspace(t);
  await inputFile(ws, "input.txt", "cached\n", 0o444);
  const hostMarker = join(ws.dir, "host-only");
  await writeFile(hostMarker, "");
  const tmpName = `berth-sandbox-private-${process.pid}-${Date.now()}`;

  const result = await sh(
    ws,
    `id -u; id -G
    echo x > /usr/x || echo usr read-only
    echo x > /etc/x || echo etc read-only
    echo new > new.txt && mkdir -p out/dir && echo o > out/dir/o.txt && echo outputs written
    echo t > /tmp/${tmpName} && echo tmp written
    test -e ${hostMarker} || echo host tmp hidden
    echo changed >> input.txt || echo write refused
    chmod 644 input.txt || echo chmod refused
    cat input.txt`,
  );
  assert.equal(
    result.stdout,
    "65534\n65534\nusr read-only\netc read-only\noutputs written\ntmp written\nhost tmp hidden\n" +
      "write refused\nchmod refused\ncached\n",
  );
  assert.equal(result.exitCode, 0);
  assert.equal(await readFile(join(ws.inputRoot, "new.txt"), "utf8"), "new\n");
  assert.equal(await readFile(join(ws.inputRoot, "out/dir/o.txt"), "utf8"), "o\n");
  await assert.rejects(stat(join(tmpdir(), tmpName)), { code: "ENOENT" });
  const input = await stat(join(ws.inputRoot, "input.txt"));
  assert.deepEqual([input.uid, input.mode & 0o7777], [0, 0o444]);
  assert.equal(await readFile(join(ws.inputRoot, "input.txt"), "utf8"), "cached\n");
});

test("no network unless requested", async (t) => {
  const ws = await workspace(t);
  const sockets: Socket[] = [];
  const server = createServer((socket) => sockets.push(socket.end()));
  await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
  t.after(() => new Promise((done) => server.close(done)));
  const address = server.address();
  assert.ok(address !== null && typeof address === "object");
  const connect = ["bash", "-c", `exec 3<>/dev/tcp/127.0.0.1/${address.port} && echo connected`];

  const isolated = await run(ws, connect);
  assert.notEqual(isolated.exitCode, 0);
  assert.equal(isolated.stdout, "");
  assert.equal(sockets.length, 0);
  const interfaces = await sh(ws, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '");
  assert.equal(interfaces.stdout, "lo\n");

  // With network access the action has a namespace of its own, reaching out through slirp4netns: the
  // host's loopback is not its loopback, and slirp4netns's way to it (10.0.2.2) is refused.
  const networked = await run(ws, connect, { network: true });
  assert.notEqual(networked.exitCode, 0);
  assert.equal(networked.stdout, "");
  const viaGateway = ["bash", "-c", `exec 3<>/dev/tcp/10.0.2.2/${address.port} && echo connected`];
  const gateway = await run(ws, viaGateway, { network: true });
  assert.notEqual(gateway.exitCode, 0);
  assert.equal(gateway.stdout, "");
  assert.equal(sockets.length, 0);
  const networkedInterfaces = await sh(ws, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort", {
    network: true,
  });
  assert.equal(networkedInterfaces.stdout, "lo\ntap0\n");
});

test("slirp4netns writes nothing to a networked action's stderr and holds none of its files", async (t) => {
  const ws = await workspace(t);
  const running = run(ws, ["sh", "-c", "echo own >&2; sleep 3"], { network: true });
  // The sandbox's bwrap names the input root on its command line; slirp4netns names bwrap's pid (its target).
  const bwraps = await waitForProcesses(new RegExp(`^bwrap .*${ws.inputRoot}`), 1);
  const targets = new Set(bwraps.map((bwrap) => String(bwrap.pid)));
  let slirp: HostProcess | undefined;
  for (let i = 0; i < 200 && slirp === undefined; i++) {
    slirp = (await processes(/^slirp4netns /)).find((p) => targets.has(p.command.split(" ").at(-2) ?? ""));
    if (slirp === undefined) await sleep(10);
  }
  assert.ok(slirp, "the action's slirp4netns is running");
  const held = new Map<number, string>();
  for (const fd of await readdir(`/proc/${slirp.pid}/fd`)) {
    held.set(Number(fd), await readlink(`/proc/${slirp.pid}/fd/${fd}`).catch(() => "(gone)"));
  }
  for (const fd of [0, 1, 2]) assert.equal(held.get(fd), "/dev/null", `slirp4netns's descriptor ${fd}`);
  for (const [fd, target] of held) {
    assert.ok(!target.startsWith(ws.dir), `slirp4netns holds the action's ${target} as descriptor ${fd}`);
    assert.ok(fd <= 2 || !/^\/(?!dev\/net\/tun$)/.test(target), `slirp4netns holds ${target} as descriptor ${fd}`);
  }
  const result = await running;
  assert.equal(result.exitCode, 0);
  assert.equal(result.stderr, "own\n");
});

test("a masked secret file cannot be read inside the sandbox on the host root, even where its modes would allow it", async (t) => {
  const ws = await workspace(t);
  // Outside /tmp and /run, which the sandbox covers anyway; readable by anyone, as a careless operator left it.
  const hostDir = await mkdtemp("/var/tmp/berth-masked-");
  t.after(() => rm(hostDir, { recursive: true, force: true }));
  await chmod(hostDir, 0o755);
  const secret = join(hostDir, "worker.token");
  await writeFile(secret, "s3cret\n", { mode: 0o644 });
  const gone = join(hostDir, "removed.token");
  const read = ["sh", "-c", `cat ${secret} 2>&1; echo "[$?]"`];

  assert.equal((await run(ws, read)).stdout, "s3cret\n[0]\n", "control: unmasked, the file is readable");
  const masking = new BubblewrapSandbox({ maskedFiles: [secret, gone] });
  const request: SandboxRequest = { ...baseRequest(ws), argv: read };
  const result = await masking.run(request);
  assert.equal(result.exitCode, 0);
  // /dev/null bound over it, on a nodev mount: opening it is refused, whatever the file's own modes.
  assert.equal(await readFile(request.stdoutPath, "utf8"), `cat: ${secret}: Permission denied\n[1]\n`);
});

test("own PID namespace", async (t) => {
  const ws = await workspace(t);
  // pid 1 is bubblewrap's reaper.
  assert.equal((await sh(ws, "echo $$")).stdout, "2\n");
});

test("a timeout kills the whole process tree, setsid escapees included, and keeps partial output", async (t) => {
  const ws = await workspace(t);
  const leftovers = /^sleep 424[234]$/;
  const started = Date.now();
  const running = sh(ws, "echo started; sleep 4242 & setsid sleep 4243 & sleep 4244", { timeoutMs: 500 });
  const tree = await waitForProcesses(leftovers, 3);
  // One of them really left the process group that the sandbox kills.
  assert.equal(new Set(tree.map((p) => p.pgrp)).size, 2);
  const result = await running;
  assert.equal(result.timedOut, true);
  assert.equal(result.cancelled, false);
  assert.equal(result.exitCode, 137);
  assert.ok(Date.now() - started < 5000);
  assert.equal(result.stdout, "started\n");
  assert.deepEqual(await processes(leftovers), []);
});

test("cancellation kills the whole process tree", async (t) => {
  const ws = await workspace(t);
  const leftovers = /^sleep 425[234]$/;
  const controller = new AbortController();
  const running = sh(ws, "sleep 4252 & setsid sleep 4253 & sleep 4254", { signal: controller.signal });
  await waitForProcesses(leftovers, 3);
  controller.abort();
  const result = await running;
  assert.deepEqual([result.cancelled, result.timedOut, result.exitCode], [true, false, 137]);
  assert.deepEqual(await processes(leftovers), []);

  const early = await sh(ws, "echo never", { signal: AbortSignal.abort() });
  assert.deepEqual([early.cancelled, early.stdout], [true, ""]);
});

test("background processes do not outlive a command that exits normally", async (t) => {
  const ws = await workspace(t);
  // The command ends only once the test has seen both background processes (it writes `seen`), so that
  // however slowly the machine lists processes, it sees them before the command ends.
  const running = sh(ws, "sleep 4262 & setsid sleep 4263 & while [ ! -e seen ]; do sleep 0.02; done; echo done");
  const tree = await waitForProcesses(/^sleep 426[23]$/, 2);
  await writeFile(join(ws.inputRoot, "seen"), "");
  const result = await running;
  // Checked synchronously right away: the tree must be gone when run() resolves, not some time later.
  assert.deepEqual(
    tree.filter((p) => alive(p.pid)),
    [],
  );
  assert.deepEqual([result.exitCode, result.stdout], [0, "done\n"]);
});

test("a command that cannot be executed is a result; a broken sandbox is an error", async (t) => {
  const ws = await workspace(t);
  const missing = await run(ws, ["no-such-command"]);
  assert.equal(missing.exitCode, 127);
  assert.match(missing.stderr, /no-such-command: No such file or directory/);

  await inputFile(ws, "data.txt", "", 0o444);
  const notExecutable = await run(ws, ["./data.txt"]);
  assert.equal(notExecutable.exitCode, 127);
  assert.match(notExecutable.stderr, /data\.txt: Permission denied/);

  const noBwrap = new BubblewrapSandbox({ bwrapPath: "/nonexistent/bwrap" });
  await assert.rejects(
    noBwrap.run({ ...baseRequest(ws), argv: ["true"] }),
    /cannot start bubblewrap \(\/nonexistent\/bwrap\): cannot run \/nonexistent\/bwrap: No such file or directory/,
  );
  await assert.rejects(sandbox.run({ ...baseRequest(ws), workingDirectory: "nope" }), /does not exist/);
  await assert.rejects(sandbox.run({ ...baseRequest(ws), workingDirectory: "../.." }), /not inside the input root/);
});

function baseRequest(ws: Workspace): SandboxRequest {
  return {
    inputRoot: ws.inputRoot,
    workingDirectory: "",
    argv: ["true"],
    env: [PATH],
    timeoutMs: 30_000,
    stdoutPath: join(ws.dir, "stdout"),
    stderrPath: join(ws.dir, "stderr"),
  };
}
