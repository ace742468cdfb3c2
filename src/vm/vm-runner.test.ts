import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chown, lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, writeFile } from "node:fs/promises";
import { release, tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { busyboxRootFolder, testGuestAssets } from "../../test/support/guest.js";
import { VmUsed } from "../gen/berth/vm/v1/vm.js";
import type { LayeredRunRoot, RunRequest } from "../runner/runner.js";
import { RunnerIdentities } from "../runner/warm-pool.js";
import { Code, StatusError } from "../status/status.js";
import type { GuestAssets } from "./guest-assets.js";
import { RecyclingVmRunner, WarmVms } from "./recycling-vm-runner.js";
import { RootDisks } from "./root-disks.js";
import { coldStarter, VmRunner, type VmSizing, vmSize } from "./vm-runner.js";
import { VmSnapshots } from "./vm-snapshots.js";

// Each test boots a VM under TCG (seconds of CPU): few tests, each asserting much.

/** The host ids QEMU runs as in these tests: no account of this machine has them. */
const IDENTITY = { uid: 61_234, gid: 61_234 };
const SIZING: VmSizing = {
  memoryBytes: 256 * 1024 ** 2,
  vcpus: 1,
  scratchDiskBytes: 256 * 1024 ** 2,
  maxMemoryBytes: 1024 ** 3,
  maxVcpus: 2,
  maxScratchDiskBytes: 1024 ** 3,
};
const hostToken = `host-${randomBytes(12).toString("hex")}`;
let dir: string;
let hostMarker: string;
let assets: GuestAssets;
let disks: RootDisks;
let runner: VmRunner;
let root: LayeredRunRoot;
let actions = 0;

before(async () => {
  assets = await testGuestAssets();
  dir = await mkdtemp(join(tmpdir(), "berth-vm-runner-"));
  hostMarker = join(dir, "host-marker");
  await writeFile(hostMarker, hostToken);
  // Two layers as the layer store keeps them: the second adds a file, deletes one of the first (a whiteout)
  // and has a /tmp whose image mode (1777) the store tamed to 1755.
  const base = join(dir, "layers", "base");
  await busyboxRootFolder(base, { "etc/base-file": "from the base layer\n", "etc/deleted": "gone\n" });
  const top = join(dir, "layers", "top");
  await mkdir(join(top, "etc"), { recursive: true });
  await mkdir(join(top, "tmp"), { mode: 0o755 });
  await writeFile(join(top, "etc", "top-file"), "from the top layer\n");
  execFileSync("mknod", [join(top, "etc", "deleted"), "c", "0", "0"]);
  disks = await RootDisks.open({ dir: join(dir, "disks"), maxBytes: 1024 ** 3 });
  root = {
    kind: "layers",
    layerDirs: [base, top],
    upperDirectories: [{ path: "tmp", mode: 0o1777, uid: 0, gid: 0 }],
    inputRootPath: "/run/berth/execroot",
  };
  runner = new VmRunner({
    assets,
    accelerator: "tcg",
    disks,
    sizing: SIZING,
    starter: coldStarter,
    identity: IDENTITY,
    bootTimeoutMs: 120_000,
  });
});

after(async () => {
  await disks?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** A laid-out input root (input.txt, an out/ directory the action may write), as the worker leaves it. */
async function action(
  script: string,
  more: Partial<RunRequest> = {},
): Promise<{ request: RunRequest; directory: string }> {
  const directory = join(dir, `action-${++actions}`);
  const inputRoot = join(directory, "root");
  await mkdir(join(inputRoot, "out"), { recursive: true });
  await writeFile(join(inputRoot, "input.txt"), "an input file\n", { mode: 0o444 });
  await chown(inputRoot, IDENTITY.uid, IDENTITY.gid);
  await chown(join(inputRoot, "out"), IDENTITY.uid, IDENTITY.gid);
  const request: RunRequest = {
    inputRoot,
    scratchDir: directory,
    root,
    workingDirectory: "",
    argv: ["sh", "-c", script],
    env: [{ name: "PATH", value: "/bin" }],
    timeoutMs: 120_000,
    stdoutPath: join(directory, "stdout"),
    stderrPath: join(directory, "stderr"),
    network: false,
    user: { uid: 0, gid: 0 },
    signal: new AbortController().signal,
    ...more,
  };
  return { request, directory };
}

/** QEMU processes this test started (its children) still running as the test's identity. */
function qemusLeft(): Promise<number[]> {
  return qemusLeftAs(IDENTITY.uid);
}

/** QEMU processes this test started still running as uids from `uid` on (warm VMs have ids of their own). */
async function qemusLeftAs(uid: number): Promise<number[]> {
  const found: number[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const status = await readFile(`/proc/${entry}/status`, "utf8").catch(() => "");
    if (
      /^Name:\s*qemu/m.test(status) &&
      new RegExp(`^PPid:\\s+${process.pid}\\b`, "m").test(status) &&
      Number(/^Uid:\s+(\d+)/m.exec(status)?.[1]) >= uid &&
      Number(/^Uid:\s+(\d+)/m.exec(status)?.[1]) < uid + 100 &&
      !/^State:\s*Z/m.test(status)
    ) {
      found.push(Number(entry));
    }
  }
  return found;
}

test("an action runs on the guest's kernel in its image, reads its inputs, and its outputs come back", async () => {
  const { request, directory } = await action(
    [
      "uname -r",
      "cat /etc/base-file /etc/top-file",
      "test -e /etc/deleted && echo the whiteout did not hide it",
      "stat -c %a /tmp",
      "cat input.txt",
      `test -e ${hostMarker} && echo the host marker is visible`,
      "ls /",
      "echo an output > out/file.txt",
      "mkdir out/dir && echo in a directory > out/dir/nested.txt",
      "ln -s file.txt out/link",
      "echo a complaint >&2",
      "exit 3",
    ].join("; "),
  );
  const result = await runner.run(request);
  assert.equal(result.exitCode, 3, await readFile(request.stderrPath, "utf8"));
  const stdout = (await readFile(request.stdoutPath, "utf8")).split("\n");
  assert.notEqual(stdout[0], release(), "the guest has its own kernel");
  assert.equal(stdout[0], assets.kernelRelease);
  assert.deepEqual(stdout.slice(1), [
    "from the base layer",
    "from the top layer",
    "1777",
    "an input file",
    // Nothing of the host: the image's folders, the guest's own /proc, /sys, /dev, and the input root's /run.
    "bin",
    "dev",
    "etc",
    "proc",
    "run",
    "sys",
    "tmp",
    "",
  ]);
  assert.equal(await readFile(request.stderrPath, "utf8"), "a complaint\n");
  // The outputs are on the host, owned by the slot's ids (QEMU's), never root's.
  const out = join(request.inputRoot, "out");
  assert.equal(await readFile(join(out, "file.txt"), "utf8"), "an output\n");
  assert.equal(await readFile(join(out, "dir", "nested.txt"), "utf8"), "in a directory\n");
  assert.equal(await readlink(join(out, "link")), "file.txt");
  for (const name of ["file.txt", "dir", "link"]) {
    assert.equal((await lstat(join(out, name))).uid, IDENTITY.uid, name);
  }
  const [used] = result.auxiliaryMetadata ?? [];
  assert.equal(used?.typeUrl, "type.googleapis.com/berth.vm.v1.VmUsed");
  const vm = VmUsed.decode(used?.value ?? new Uint8Array());
  assert.deepEqual(
    [vm.accelerator, vm.kernelRelease, vm.vcpus, vm.memoryBytes, vm.start],
    ["tcg", assets.kernelRelease, 1, SIZING.memoryBytes, "cold"],
  );
  assert.deepEqual(await qemusLeft(), []);
  assert.deepEqual(await readdir(directory).then((names) => names.sort()), ["root", "stderr", "stdout"]);
});

test("a hostile action: device nodes, setuid files and links through the share make nothing of the host's", async () => {
  const { request } = await action(
    [
      "mknod out/disk b 8 0 2>/dev/null && echo made a device",
      "echo x > out/suid && chmod 4755 out/suid",
      `ln -s ${hostMarker} out/to-host`,
      "cat out/to-host 2>/dev/null",
      "chown 0:0 out/suid 2>/dev/null",
      "echo changed >> input.txt 2>/dev/null && echo wrote an input",
      "true",
    ].join("; "),
  );
  const result = await runner.run(request);
  assert.equal(result.exitCode, 0, await readFile(request.stderrPath, "utf8"));
  assert.equal(await readFile(request.stdoutPath, "utf8"), "");
  const out = join(request.inputRoot, "out");
  await assert.rejects(lstat(join(out, "disk")), { code: "ENOENT" });
  // A set-user-ID file is its maker's: the slot's ids, which no chown in the guest changes.
  const suid = await stat(join(out, "suid"));
  assert.equal(suid.uid, IDENTITY.uid);
  assert.equal(await readFile(join(request.inputRoot, "input.txt"), "utf8"), "an input file\n");
  // The link is a link on the host, never followed by the share.
  assert.equal(await readlink(join(out, "to-host")), hostMarker);
  assert.equal(await readFile(hostMarker, "utf8"), hostToken);
});

test("a command past its timeout is killed with its VM: 137, timed out, no QEMU left", async () => {
  const { request } = await action("echo started; sleep 1000", { timeoutMs: 1500 });
  const result = await runner.run(request);
  assert.deepEqual([result.exitCode, result.timedOut, result.cancelled], [137, true, false]);
  assert.equal(await readFile(request.stdoutPath, "utf8"), "started\n");
  assert.deepEqual(await qemusLeft(), []);
});

test("the next VM of a shape resumes a snapshot that holds nothing of any action, each on its own disk", async () => {
  // The snapshot-making QEMU runs as ids of its own (the warm runners' set), never as root.
  const makerIds = { uid: 61_400, gid: 61_400 };
  const errors: string[] = [];
  const snapshots = await VmSnapshots.open({
    dir: join(dir, "snapshots"),
    maxBytes: 1024 ** 3,
    cold: coldStarter,
    identities: { acquire: () => makerIds, release: () => {} },
    onError: (err) => errors.push((err as Error).message),
  });
  const resuming = new VmRunner({
    assets,
    accelerator: "tcg",
    disks,
    sizing: SIZING,
    starter: snapshots,
    identity: IDENTITY,
    bootTimeoutMs: 120_000,
  });
  const script = "cat /tmp/left 2>/dev/null; echo left by an action > /tmp/left; cat input.txt; echo out > out/o.txt";
  const first = await action(script);
  const cold = await resuming.run(first.request);
  assert.equal(cold.exitCode, 0, await readFile(first.request.stderrPath, "utf8"));
  assert.equal(VmUsed.decode(cold.auxiliaryMetadata?.[0]?.value ?? new Uint8Array()).start, "cold");
  // The snapshot is made beside the first VM, by a VM of its own.
  const [snapshotDir] = await readdir(join(dir, "snapshots"));
  assert.ok(snapshotDir, "a snapshot is being made");
  const qemuUids = new Set<string>();
  await waitFor(async () => {
    for (const line of execFileSync("ps", ["-o", "uid=,ppid=,args=", "-e"]).toString().split("\n")) {
      const [uid, ppid] = line.trim().split(/\s+/);
      if (ppid === String(process.pid) && line.includes("qemu-system")) qemuUids.add(uid ?? "");
    }
    return (await readdir(join(dir, "snapshots"))).every((name) => !name.endsWith(".partial"));
  });
  assert.deepEqual(errors, [], "the snapshot was made");
  assert.ok(!qemuUids.has("0"), "no QEMU of this process ran as root while the snapshot was made");
  assert.ok(
    [...qemuUids].every((uid) => uid === String(makerIds.uid)),
    `QEMU ran as ${[...qemuUids]}`,
  );
  const [made] = await readdir(join(dir, "snapshots"));
  const scratch = join(dir, "snapshots", made as string, "scratch.img");
  const before = execFileSync("sha256sum", [scratch]).toString();
  for (let i = 0; i < 2; i++) {
    const next = await action(script);
    const resumed = await resuming.run(next.request);
    assert.equal(resumed.exitCode, 0, await readFile(next.request.stderrPath, "utf8"));
    assert.equal(VmUsed.decode(resumed.auxiliaryMetadata?.[0]?.value ?? new Uint8Array()).start, "snapshot");
    // Nothing of the earlier actions (their /tmp): every resumed VM starts from the same idle guest.
    assert.equal(await readFile(next.request.stdoutPath, "utf8"), "an input file\n");
    assert.equal(await readFile(join(next.request.inputRoot, "out", "o.txt"), "utf8"), "out\n");
  }
  assert.equal(execFileSync("sha256sum", [scratch]).toString(), before, "the snapshot's disk is never written");
  assert.deepEqual(await qemusLeft(), []);
  await snapshots.close();
});

async function waitFor(condition: () => Promise<boolean>): Promise<void> {
  for (let i = 0; i < 600; i++) {
    if (await condition()) return;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error("timed out waiting");
}

test("recycle-runner: a process one action left in its VM answers the next of the key; another key gets a fresh VM", async () => {
  const warmIds = { uid: 61_300, gid: 61_300 };
  const identities = new RunnerIdentities((index) => ({
    index,
    uid: warmIds.uid + index,
    gid: warmIds.gid + index,
    cgroup: undefined,
  }));
  const warmVms = new WarmVms(runner, {
    dir: join(dir, "warm"),
    maxRunners: 2,
    maxMemoryBytes: 1024 ** 3,
    idleMillis: 600_000,
    identities,
  });
  await warmVms.open();
  const recycling = new RecyclingVmRunner(runner, warmVms);
  const recycle = (key: string) => ({ key, preserveWorkspace: false, cleanInputs: [], outputs: ["out"] });
  const run = async (script: string, key: string) => {
    const { request } = await action(script, { recycle: recycle(key) });
    const result = await recycling.run(request);
    const out = await readFile(request.stdoutPath, "utf8");
    const err = await readFile(request.stderrPath, "utf8");
    const outputs = await readdir(join(result.inputRoot ?? request.inputRoot, "out"));
    await result.finish?.();
    return {
      result,
      out,
      err,
      outputs,
      start: VmUsed.decode(result.auxiliaryMetadata?.[0]?.value ?? new Uint8Array()).start,
    };
  };
  // A server: answers each line written to /tmp/q with "pong LINE" in /tmp/a, kept running after the action.
  const server =
    "mkfifo /tmp/q /tmp/a; setsid sh -c 'while :; do read x < /tmp/q; echo pong $x > /tmp/a; done' </dev/null >/dev/null 2>&1 & echo first > out/first.txt; echo started";
  const first = await run(server, "key-a");
  assert.deepEqual([first.result.exitCode, first.out, first.start], [0, "started\n", "cold"]);
  assert.deepEqual(first.outputs, ["first.txt"]);
  // The same key: the same VM, its server still running; the workspace holds only this action's inputs.
  const second = await run("echo hi > /tmp/q; cat /tmp/a; ls out", "key-a");
  assert.deepEqual([second.result.exitCode, second.out, second.start], [0, "pong hi\n", "recycled"]);
  // Another key: a fresh VM, without the server.
  const other = await run("test -p /tmp/q && echo a VM of another key; echo fresh", "key-b");
  assert.deepEqual([other.result.exitCode, other.out, other.start], [0, "fresh\n", "cold"], other.err);
  // A failed action's VM is not kept: the next of its key starts fresh.
  const failed = await run("exit 1", "key-a");
  assert.equal(failed.result.exitCode, 1);
  const after = await run("test -p /tmp/q && echo kept; echo after", "key-a");
  assert.deepEqual([after.out, after.start], ["after\n", "cold"]);
  await warmVms.close();
  assert.deepEqual(await qemusLeftAs(warmIds.uid), []);
  assert.deepEqual(await readdir(join(dir, "warm")), []);
});

test("a program that does not exist is exit code 127 with the reason on stderr", async () => {
  const { request } = await action("", { argv: ["/no/such/tool"] });
  const result = await runner.run(request);
  assert.equal(result.exitCode, 127);
  assert.match(await readFile(request.stderrPath, "utf8"), /\/no\/such\/tool.*No such file/);
});

test("an action without an image is refused: a VM boots only from one", async () => {
  const { request } = await action("true", { root: { kind: "host" } });
  await assert.rejects(
    runner.run(request),
    (err: unknown) => err instanceof StatusError && err.code === Code.FAILED_PRECONDITION,
  );
});

test("vmSize: the estimates within the caps, the defaults where absent", () => {
  assert.deepEqual(vmSize(undefined, SIZING), {
    vcpus: 1,
    memoryBytes: 256 * 1024 ** 2,
    scratchDiskBytes: 256 * 1024 ** 2,
  });
  assert.deepEqual(vmSize({ cpuMillis: 1500, memoryBytes: 512 * 1024 ** 2, freeDiskBytes: 10 ** 8 }, SIZING), {
    vcpus: 2,
    memoryBytes: 512 * 1024 ** 2,
    scratchDiskBytes: 10 ** 8,
  });
  assert.deepEqual(vmSize({ cpuMillis: 64_000, memoryBytes: 10 ** 12, freeDiskBytes: 10 ** 13 }, SIZING), {
    vcpus: 2,
    memoryBytes: 1024 ** 3,
    scratchDiskBytes: 1024 ** 3,
  });
  assert.deepEqual(vmSize({ cpuMillis: 1, memoryBytes: 1, freeDiskBytes: 1 }, SIZING), {
    vcpus: 1,
    memoryBytes: 128 * 1024 ** 2,
    scratchDiskBytes: 64 * 1024 ** 2,
  });
});
