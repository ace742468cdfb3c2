import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { chmod, chown, link, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { promisify } from "node:util";
import { BubblewrapSandbox } from "./bubblewrap.js";
import { measureDiskUsage } from "./disk-usage.js";
import { DEFAULT_LIMITS } from "./limits.js";
import { measureOpenDeletedFiles, uidProcesses } from "./open-deleted-files.js";

const isRoot = process.getuid?.() === 0;
/** A uid of this test's own. */
const UID = 2_097_000_000 + (process.pid % 100_000);
const MiB = 1024 ** 2;
const run = promisify(execFile);

async function tempDir(t: TestContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "berth-disk-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await chmod(dir, 0o755);
  return dir;
}

test("only the action's own files count: root's (hard-linked inputs) do not", { skip: !isRoot }, async (t) => {
  const root = await tempDir(t);
  const cache = join(root, "cache-file");
  await writeFile(cache, Buffer.alloc(8 * MiB, 1));
  await link(cache, join(root, "input-file"));
  const own = join(root, "own");
  await writeFile(own, Buffer.alloc(3 * MiB, 1));
  await chown(own, UID, UID);
  const usage = await measureDiskUsage([{ dir: root, owner: UID }], { bytes: 0, entries: 0 });
  assert.deepEqual(usage, { bytes: 3 * MiB, entries: 1 });
  // An image's upper layer: everything counts (the directory itself, and both names of the linked file).
  const all = await measureDiskUsage([{ dir: root }], { bytes: 0, entries: 0 });
  assert.equal(all.entries, 4);
  assert.ok(all.bytes >= 19 * MiB, `${all.bytes}`);
});

test("a tree 3,000 levels deep (paths far past PATH_MAX) is counted to its bottom", async (t) => {
  const root = await mkdtemp(join(tmpdir(), "berth-disk-"));
  // Made from inside, relative step by step (perl: a shell's cd re-reads the whole path each time); no path to
  // its bottom fits a system call, so rm -r (which walks like find) removes it.
  t.after(() => run("rm", ["-rf", root]));
  const make =
    'chdir $ARGV[0] or die; for (1 .. 3000) { mkdir "d" or die; chdir "d" or die } open my $f, ">", "leaf" or die';
  await run("/usr/bin/perl", ["-e", make, root]);
  const usage = await measureDiskUsage([{ dir: root }], { bytes: 0, entries: 0 });
  assert.equal(usage.entries, 1 + 3000 + 1);
});

test("the walk stops soon after a bound: a wide tree is not walked to its end", async (t) => {
  const root = await tempDir(t);
  const make = 'chdir $ARGV[0] or die; for my $i (1 .. 100000) { open my $f, ">", "e$i" or die }';
  await run("/usr/bin/perl", ["-e", make, root]);
  const usage = await measureDiskUsage([{ dir: root }], { bytes: 0, entries: 1000 });
  assert.ok(usage.entries > 1000 && usage.entries < 50_000, `${usage.entries} entries counted`);
  const whole = await measureDiskUsage([{ dir: root }], { bytes: 0, entries: 0 });
  assert.equal(whole.entries, 100_001);
});

test("the sandbox stops an action past diskBytes, not one whose inputs alone are larger", {
  skip: !isRoot,
}, async (t) => {
  const sandbox = new BubblewrapSandbox({ uid: UID, gid: UID, limits: { ...DEFAULT_LIMITS, diskBytes: 16 * MiB } });
  const sh = async (script: string) => {
    const dir = await tempDir(t);
    const inputRoot = join(dir, "input");
    await mkdir(inputRoot);
    await chown(inputRoot, UID, UID);
    // A 32 MiB input file, root's and read-only as the worker lays them out.
    await writeFile(join(inputRoot, "input.bin"), Buffer.alloc(32 * MiB, 1), { mode: 0o444 });
    return sandbox.run({
      inputRoot,
      workingDirectory: "",
      argv: ["/bin/bash", "-c", script],
      env: [{ name: "PATH", value: "/usr/bin:/bin" }],
      timeoutMs: 60_000,
      stdoutPath: join(dir, "stdout"),
      stderrPath: join(dir, "stderr"),
    });
  };
  // Sampled (it runs past 1 s) and walked again at its end: its own 4 MiB are within the bound.
  const reader = await sh("sleep 1.5; cat input.bin > copy.head; head -c 4194304 input.bin > copy; rm copy.head");
  assert.deepEqual([reader.exitCode, reader.limitReached], [0, undefined]);
  const writer = await sh("while :; do head -c 1048576 /dev/zero > f$RANDOM$RANDOM; sleep 0.05; done");
  assert.equal(writer.limitReached?.limit, "diskBytes");
  assert.equal(writer.exitCode, 137);
  assert.match(writer.limitReached?.message ?? "", /16777216 bytes \(worker\.limits\.diskBytes\)/);
});

test("a file deleted but held open counts once, by its blocks, and only on the areas' file system", {
  skip: !isRoot,
}, async (t) => {
  const dir = await tempDir(t);
  await chown(dir, UID, UID);
  // As the slot's uid: 8 MiB written to a deleted file held on two descriptors, 1 MiB to a deleted file of
  // /dev/shm (a tmpfs, bounded by its size), and a deleted file of a hard link that still has a name.
  const script = `cd ${dir} && exec 3>big 4<big && rm big && head -c 8388608 /dev/zero >&3 &&
    exec 5>/dev/shm/berth-test-$$ && rm /dev/shm/berth-test-$$ && head -c 1048576 /dev/zero >&5 &&
    exec 6>named && ln named other && rm named && echo ready && sleep 30`;
  const holder = spawn("/bin/bash", ["-c", script], { uid: UID, gid: UID, stdio: ["ignore", "pipe", "inherit"] });
  t.after(() => holder.kill("SIGKILL"));
  await new Promise((resolve) => holder.stdout.once("data", resolve));
  const pids = await uidProcesses(UID)();
  assert.ok(pids.includes(holder.pid ?? -1), `${pids} lists the holder ${holder.pid}`);
  assert.deepEqual(await measureOpenDeletedFiles(pids, [dir]), { bytes: 8 * MiB, entries: 1 });
  // The walk of names sees none of it: only the directory and the linked file's remaining name.
  const named = await measureDiskUsage([{ dir, owner: UID }], { bytes: 0, entries: 0 });
  assert.equal(named.entries, 2);
  assert.ok(named.bytes < MiB, `${named.bytes}`);
});

test("the sandbox without a cgroup stops an action holding a deleted file past diskBytes", {
  skip: !isRoot,
}, async (t) => {
  const sandbox = new BubblewrapSandbox({ uid: UID, gid: UID, limits: { ...DEFAULT_LIMITS, diskBytes: 16 * MiB } });
  const dir = await tempDir(t);
  const inputRoot = join(dir, "input");
  await mkdir(inputRoot);
  await chown(inputRoot, UID, UID);
  const held = await sandbox.run({
    inputRoot,
    workingDirectory: "",
    argv: ["/bin/bash", "-c", "exec 3>big; rm big; head -c 104857600 /dev/zero >&3; echo wrote; sleep 10; echo held"],
    env: [{ name: "PATH", value: "/usr/bin:/bin" }],
    timeoutMs: 60_000,
    stdoutPath: join(dir, "stdout"),
    stderrPath: join(dir, "stderr"),
  });
  assert.equal(held.limitReached?.limit, "diskBytes");
  assert.equal(held.exitCode, 137);
});
