import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { chmod, chown, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { release, tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { busyboxRootFolder, testGuestAssets } from "../../test/support/guest.js";
import { Code, StatusError } from "../status/status.js";
import type { GuestCommand } from "./agent-protocol.js";
import { buildRootDisk, createScratchDisk } from "./disk-image.js";
import type { GuestAssets } from "./guest-assets.js";
import { kernelCommandLine, QemuVm } from "./qemu-vm.js";

// One VM booted under TCG (seconds of CPU on a shared machine) serves every test of this file, in order; the
// last ones snapshot it, resume copies and kill them all.

const IMAGE_FILE = "etc/berth-vm-image-file";
const imageToken = `image-${randomBytes(8).toString("hex")}`;
const hostToken = `host-${randomBytes(12).toString("hex")}`;
let dir: string;
let hostMarker: string;
let assets: GuestAssets;
let rootDisk: string;
let vm: QemuVm;
const extraVms: QemuVm[] = [];

function command(argv: string[], more: Partial<GuestCommand> = {}): GuestCommand {
  return { argv, env: { PATH: "/bin" }, workingDirectory: "/", uid: 0, gid: 0, ...more };
}

async function sh(script: string, more: Partial<GuestCommand> = {}) {
  return vm.run(command(["sh", "-c", script], more), { timeoutMs: 30_000 });
}

function sha256(path: string): Promise<string> {
  return readFile(path).then((data) => createHash("sha256").update(data).digest("hex"));
}

/** Process ids whose command line holds `needle` (QEMU's names the VM's run directory). */
async function _processesMentioning(needle: string): Promise<number[]> {
  const found: number[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const cmdline = await readFile(`/proc/${entry}/cmdline`, "latin1").catch(() => "");
    if (cmdline.includes(needle)) found.push(Number(entry));
  }
  return found;
}

async function runDir(name: string): Promise<string> {
  const path = join(dir, name);
  await mkdir(path, { mode: 0o700 });
  return path;
}

before(async () => {
  assets = await testGuestAssets();
  dir = await mkdtemp(join(tmpdir(), "berth-vm-"));
  hostMarker = join(dir, "host-marker");
  await writeFile(hostMarker, hostToken);
  await busyboxRootFolder(join(dir, "root"), { [IMAGE_FILE]: imageToken, "etc/owned": "secret\n" });
  await chown(join(dir, "root", "etc", "owned"), 4321, 8765);
  await chmod(join(dir, "root", "etc", "owned"), 0o640);
  rootDisk = join(dir, "root.erofs");
  await buildRootDisk(join(dir, "root"), rootDisk);
  await createScratchDisk(join(dir, "scratch.img"), 128 * 1024 ** 2);
  vm = await QemuVm.start({
    assets,
    runDir: await runDir("vm"),
    rootDisk,
    scratchDisk: join(dir, "scratch.img"),
    consoleLogMaxBytes: 32 * 1024,
  });
});

after(async () => {
  for (const each of [vm, ...extraVms]) await each?.kill();
  if (dir) await rm(dir, { recursive: true, force: true });
});

test("the command runs on the guest's own kernel, not the host's", async () => {
  const result = await sh("uname -r");
  assert.equal(result.exitCode, 0);
  const guestRelease = result.stdout.toString().trim();
  assert.equal(guestRelease, assets.kernelRelease);
  assert.notEqual(guestRelease, release());
  assert.equal(vm.kernelRelease, assets.kernelRelease);
});

test("under TCG the guest does not randomize addresses, so QEMU reuses the code it translated; under KVM it does", async () => {
  // The test VM runs under TCG (QemuVm's default accelerator).
  const result = await sh("cat /proc/sys/kernel/randomize_va_space");
  assert.equal(result.stdout.toString().trim(), "0");
  assert.match(kernelCommandLine("tcg", "erofs"), / norandmaps /);
  assert.doesNotMatch(kernelCommandLine("kvm", "erofs"), /norandmaps/);
});

test("QEMU itself runs under a seccomp filter", async () => {
  const status = await readFile(`/proc/${vm.pid}/status`, "utf8");
  assert.match(status, /^Seccomp:\s+2$/m);
});

test("the image's file is readable, with the command's environment, directory and user", async () => {
  const result = await sh(`cat /${IMAGE_FILE}; echo "$GREETING"; pwd; id -u; id -g`, {
    env: { PATH: "/bin", GREETING: "hi there" },
    workingDirectory: "/etc",
    uid: 1234,
    gid: 5678,
  });
  assert.equal(result.stderr.toString(), "");
  assert.equal(result.stdout.toString(), `${imageToken}hi there\n/etc\n1234\n5678\n`);
});

test("the root disk keeps the folder's ownership and modes, and the guest enforces them", async () => {
  const owned = await sh("stat -c '%u:%g %a' /etc/owned");
  assert.equal(owned.stdout.toString(), "4321:8765 640\n");
  const other = await sh("cat /etc/owned", { uid: 1234, gid: 1234 });
  assert.notEqual(other.exitCode, 0);
  assert.match(other.stderr.toString(), /Permission denied/);
  const owner = await sh("cat /etc/owned", { uid: 4321, gid: 1 });
  assert.equal(owner.stdout.toString(), "secret\n");
});

test("stdout, stderr and the exit code come back apart, binary output intact", async () => {
  const result = await sh("printf 'out\\0put'; printf err >&2; exit 7");
  assert.equal(result.exitCode, 7);
  assert.equal(result.signal, 0);
  assert.deepEqual(result.stdout, Buffer.from("out\0put"));
  assert.equal(result.stderr.toString(), "err");
  const large = await sh("head -c 3000000 /dev/zero | tr '\\0' x");
  assert.equal(large.stdout.length, 3_000_000);
  assert.ok(large.stdout.every((byte) => byte === 0x78));
  const signalled = await sh("kill -TERM $$");
  assert.equal(signalled.exitCode, -1);
  assert.equal(signalled.signal, 15);
});

test("output is streamed as the command writes it", async () => {
  const chunks: [string, string, number][] = [];
  const result = await vm.run(command(["sh", "-c", "echo first; sleep 1; echo second >&2"]), {
    onOutput: (stream, chunk) => chunks.push([stream, chunk.toString(), performance.now()]),
  });
  const ended = performance.now();
  assert.deepEqual(
    chunks.map(([stream, text]) => [stream, text]),
    [
      ["stdout", "first\n"],
      ["stderr", "second\n"],
    ],
  );
  assert.ok(ended - (chunks[0]?.[2] ?? ended) > 800, "the first line came only with the end");
  assert.equal(result.stdout.toString(), "first\n");
});

test("output past the limit kills the command with RESOURCE_EXHAUSTED, and the agent serves the next", async () => {
  await assert.rejects(
    vm.run(command(["sh", "-c", "while :; do echo flood; done"]), { maxOutputBytes: 100_000, timeoutMs: 30_000 }),
    (error: unknown) =>
      error instanceof StatusError && error.code === Code.RESOURCE_EXHAUSTED && /100000 bytes/.test(error.message),
  );
  assert.equal((await sh("echo still here")).stdout.toString(), "still here\n");
});

test("a command that cannot start is refused naming the program and directory", async () => {
  await assert.rejects(
    vm.run(command(["/no/such/program"])),
    (error: unknown) =>
      error instanceof StatusError &&
      error.code === Code.FAILED_PRECONDITION &&
      /\/no\/such\/program/.test(error.message) &&
      /No such file/.test(error.message),
  );
  await assert.rejects(
    vm.run(command(["true"], { workingDirectory: "/no/such/dir" })),
    (error: unknown) => error instanceof StatusError && /\/no\/such\/dir/.test(error.message),
  );
});

test("a command past its timeout is killed with its process group; the VM answers the next one", async () => {
  const started = performance.now();
  const result = await vm.run(command(["sh", "-c", "sleep 1000 & sleep 1000"]), { timeoutMs: 500 });
  assert.ok(performance.now() - started < 5_000);
  assert.equal(result.timedOut, true);
  assert.equal(result.signal, 9);
  const left = await sh("ps -o comm | grep -c '^sleep' || true");
  assert.equal(left.stdout.toString().trim(), "0");
});

test("a cancelled command is killed the same way", async () => {
  const controller = new AbortController();
  const running = vm.run(command(["sleep", "1000"]), { signal: controller.signal });
  setTimeout(() => controller.abort(), 200);
  const result = await running;
  assert.equal(result.cancelled, true);
  assert.equal(result.signal, 9);
});

test("root in the guest cannot write the root disk; its writes land on the scratch disk", async () => {
  const before = await sha256(rootDisk);
  const attack = await sh(
    "dd if=/dev/zero of=/dev/vda bs=4096 count=16 conv=fsync 2>&1; echo dd=$?; echo ro=$(blockdev --getro /dev/vda); " +
      "blockdev --setrw /dev/vda; dd if=/dev/zero of=/dev/vda bs=4096 count=16 conv=fsync 2>&1; echo dd-after-setrw=$?",
  );
  assert.match(attack.stdout.toString(), /^dd=[1-9]/m);
  assert.match(attack.stdout.toString(), /^ro=1$/m);
  assert.match(attack.stdout.toString(), /^dd-after-setrw=[1-9]/m);
  const write = await sh(
    `echo changed > /${IMAGE_FILE} && echo new > /etc/new-file && cat /${IMAGE_FILE} /etc/new-file`,
  );
  assert.equal(write.stdout.toString(), "changed\nnew\n");
  const mounts = (await sh("cat /proc/mounts")).stdout.toString();
  assert.match(mounts, /^overlay \/ overlay /m);
  assert.equal(await sha256(rootDisk), before);
});

test("nothing of the host's file system is visible in the guest", async () => {
  assert.ok(existsSync(hostMarker));
  const result = await sh(
    `test -e ${hostMarker} && echo visible; ` +
      `grep -l ${hostToken} /dev/vda; grep -rl ${hostToken} /etc /tmp 2>/dev/null; ` +
      "ls /sys/block; cut -d' ' -f3 /proc/mounts | sort -u; ls /sys/class/net | sed 's/^/net:/'",
  );
  const output = result.stdout.toString();
  assert.doesNotMatch(output, /visible/);
  assert.doesNotMatch(output, new RegExp(hostToken));
  // No network: no interface but loopback (-nic none, and no virtio_net in the guest).
  assert.deepEqual(
    output.split("\n").filter((line) => line.startsWith("net:")),
    ["net:lo"],
  );
  const lines = output
    .trim()
    .split("\n")
    .filter((line) => !line.startsWith("net:"));
  // Only its two disks, and no shared file system (9p, virtiofs, nfs, fuse) of any kind.
  assert.deepEqual(
    lines.filter((line) => /^(vd|sd|nvme|pmem)/.test(line)),
    ["vda", "vdb"],
  );
  assert.deepEqual(
    lines.filter((line) => !/^(vd|sd|nvme|pmem)/.test(line)),
    ["devtmpfs", "overlay", "proc", "sysfs"],
  );
});

test("a guest flooding its console fills at most the console log's cap on the host", async () => {
  const flood = await sh("head -c 100000 /dev/zero | tr '\\0' x > /dev/console; echo done");
  assert.equal(flood.stdout.toString(), "done\n");
  // The serial port is slow under emulation: wait until the host has read past the cap.
  let log = "";
  for (let i = 0; i < 200 && !log.includes("the rest was dropped"); i++) {
    await new Promise((resolve) => setTimeout(resolve, 50));
    log = await readFile(vm.consoleLogFile, "utf8");
  }
  assert.match(log, /the console wrote more than 32768 bytes; the rest was dropped/);
  assert.ok((await stat(vm.consoleLogFile)).size < 33 * 1024);
  assert.equal((await stat(vm.consoleLogFile)).mode & 0o777, 0o600);
  assert.equal((await sh("echo still answering")).stdout.toString(), "still answering\n");
});

test("disks plugged into the running VM carry inputs in (read-only) and outputs out", async () => {
  const inputs = join(dir, "inputs");
  await mkdir(inputs);
  await writeFile(join(inputs, "hello"), `${imageToken}-input`);
  await buildRootDisk(inputs, join(dir, "inputs.erofs"));
  await createScratchDisk(join(dir, "outputs.img"), 64 * 1024 ** 2);
  const inputsBefore = await sha256(join(dir, "inputs.erofs"));
  const input = await vm.attachDisk(join(dir, "inputs.erofs"));
  const output = await vm.attachDisk(join(dir, "outputs.img"), { writable: true });
  const device = (serial: string) =>
    `$(for d in /sys/block/vd*; do [ "$(cat $d/serial)" = ${serial} ] && echo /dev/\${d##*/}; done)`;
  const result = await sh(
    `i=0; while [ -z "${device(output.serial)}" ] && [ $i -lt 500 ]; do usleep 10000; i=$((i+1)); done; ` +
      `in=${device(input.serial)}; out=${device(output.serial)}; mkdir -p /in /out && ` +
      "mount -t erofs -o ro $in /in && mount -t ext4 $out /out && cat /in/hello && " +
      "cat /in/hello > /out/result && umount /out && " +
      "dd if=/dev/zero of=$in bs=4096 count=1 conv=fsync 2>/dev/null; r=$?; echo; echo dd=$r; umount /in",
  );
  assert.equal(result.stdout.toString(), `${imageToken}-input\ndd=1\n`, result.stderr.toString());
  await vm.detachDisk(input);
  await vm.detachDisk(output);
  assert.equal((await sh("ls /sys/block")).stdout.toString(), "vda\nvdb\n");
  const { stdout } = await promisify(execFile)("debugfs", ["-R", "cat /result", join(dir, "outputs.img")]);
  assert.equal(stdout, `${imageToken}-input`);
  assert.equal(await sha256(join(dir, "inputs.erofs")), inputsBefore);
});

test("a snapshot of the booted VM resumes with its memory, processes and disk, each copy on its own", async (t) => {
  // The guest's clock is set 20 years back before the snapshot: a resumed copy must run on the host's time.
  await sh("echo before-snapshot > /tmp/state; setsid sleep 100000 </dev/null >/dev/null 2>&1 & date -s @1000000000");
  const sleeper = (await sh("pidof sleep")).stdout.toString().trim();
  assert.match(sleeper, /^\d+$/);
  const snapshot = join(dir, "snapshot");
  await vm.snapshot(snapshot);
  await vm.kill();
  // The guest's memory and the agent's socket are the farm user's alone.
  assert.equal((await stat(snapshot)).mode & 0o777, 0o600);
  assert.equal((await stat(join(dir, "vm"))).mode & 0o777, 0o700);
  const resumed: QemuVm[] = [];
  const timings: number[] = [];
  for (const name of ["a", "b"]) {
    const overlay = join(dir, `scratch-${name}.qcow2`);
    await promisify(execFile)("qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-b",
      join(dir, "scratch.img"),
      "-F",
      "raw",
      overlay,
    ]);
    const started = performance.now();
    const copy = await QemuVm.start({
      assets,
      runDir: await runDir(`resumed-${name}`),
      rootDisk,
      scratchDisk: overlay,
      scratchFormat: "qcow2",
      resumeFrom: snapshot,
    });
    extraVms.push(copy);
    resumed.push(copy);
    const answer = await copy.run(command(["sh", "-c", "cat /tmp/state; pidof sleep; date +%s"]));
    timings.push(performance.now() - started);
    const [state, pid, clock] = answer.stdout.toString().trim().split("\n");
    assert.deepEqual([state, pid], ["before-snapshot", sleeper]);
    assert.ok(Math.abs(Number(clock) - Date.now() / 1000) < 5, `the resumed guest's clock says ${clock}`);
    await copy.run(command(["sh", "-c", `echo ${name} > /tmp/state`]));
  }
  // Each copy wrote its own overlay: neither sees the other's write.
  for (const [index, name] of ["a", "b"].entries()) {
    const state = await resumed[index]?.run(command(["cat", "/tmp/state"]));
    assert.equal(state?.stdout.toString(), `${name}\n`);
  }
  // An action that powers its VM off ends it: its command fails, QEMU is gone.
  const victim = resumed[1];
  await assert.rejects(victim?.run(command(["poweroff", "-f"])) ?? Promise.resolve(), /the VM is gone|closed/);
  await victim?.exited;
  assert.equal(existsSync(`/proc/${victim?.pid}`), false);
  // Resuming is no cold boot (about 5 s here under TCG): it answers in well under one.
  assert.ok(Math.min(...timings) < 3_000, `resumes took ${timings.map(Math.round).join(", ")} ms`);
  t.diagnostic(`resume to first answer: ${timings.map(Math.round).join(", ")} ms`);
});

test("kill() leaves no QEMU process behind", async () => {
  for (const each of [vm, ...extraVms]) {
    const pid = each.pid;
    await each.kill();
    assert.equal(existsSync(`/proc/${pid}`), false, `QEMU ${pid} still runs`);
  }
  const qemus = [];
  for (const pid of await childrenOf(process.pid)) {
    if ((await readFile(`/proc/${pid}/comm`, "latin1").catch(() => "")).startsWith("qemu") && (await running(pid))) {
      qemus.push(pid);
    }
  }
  assert.deepEqual(qemus, []);
});

test("an ext4 root disk (mkfs.ext4 -d) boots as well, read-only", async () => {
  const ext4 = join(dir, "root.ext4");
  await buildRootDisk(join(dir, "root"), ext4, { format: "ext4" });
  await createScratchDisk(join(dir, "scratch-ext4.img"), 64 * 1024 ** 2);
  const before = await sha256(ext4);
  const other = await QemuVm.start({
    assets,
    runDir: await runDir("ext4"),
    rootDisk: ext4,
    rootFormat: "ext4",
    scratchDisk: join(dir, "scratch-ext4.img"),
  });
  extraVms.push(other);
  const result = await other.run(
    command([
      "sh",
      "-c",
      `cat /${IMAGE_FILE}; stat -c '%u:%g %a' /etc/owned; grep ' /lower\\| / ' /proc/mounts | cut -d' ' -f3; ` +
        "dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null; echo dd=$?",
    ]),
  );
  assert.equal(result.stdout.toString(), `${imageToken}4321:8765 640\noverlay\ndd=1\n`);
  await other.kill();
  assert.equal(existsSync(`/proc/${other.pid}`), false);
  assert.equal(await sha256(ext4), before);
});

test("QEMU dies with the process that started it, even one killed with SIGKILL", async () => {
  await createScratchDisk(join(dir, "scratch-owner.img"), 64 * 1024 ** 2);
  const owned = await runDir("owner");
  const owner = spawn(
    process.execPath,
    [
      fileURLToPath(new URL("../../test/support/vm-owner.js", import.meta.url)),
      dirname(assets.kernel),
      owned,
      rootDisk,
      join(dir, "scratch-owner.img"),
    ],
    { stdio: "ignore" },
  );
  try {
    // QEMU names its files by inherited descriptors: it is found as the owner's child.
    let qemu: number[] = [];
    for (let i = 0; i < 200 && qemu.length === 0; i++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      qemu = await childrenOf(owner.pid ?? -1);
    }
    assert.equal(qemu.length, 1, "the owner started no QEMU");
    owner.kill("SIGKILL");
    const alive = async () => (await Promise.all(qemu.map(running))).some(Boolean);
    for (let i = 0; i < 100 && (await alive()); i++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    assert.equal(await alive(), false, "QEMU outlived its owner");
  } finally {
    owner.kill("SIGKILL");
  }
});

/** Processes whose parent is `pid`. */
async function childrenOf(pid: number): Promise<number[]> {
  const found: number[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = await readFile(`/proc/${entry}/stat`, "latin1").catch(() => "");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    if (Number(fields[1]) === pid) found.push(Number(entry));
  }
  return found;
}

/** Whether `pid` still runs (a zombie waiting for its reaper has ended). */
async function running(pid: number): Promise<boolean> {
  const stat = await readFile(`/proc/${pid}/stat`, "latin1").catch(() => "");
  return stat !== "" && stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
}
