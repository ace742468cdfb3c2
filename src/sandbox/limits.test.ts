import assert from "node:assert/strict";
import { chmod, chown, mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { BubblewrapSandbox } from "./bubblewrap.js";
import type { SandboxLimits } from "./limits.js";

const isRoot = process.getuid?.() === 0;
/** A uid of this test's own. */
const UID = 2_098_000_000 + (process.pid % 100_000);
const LIMITS: SandboxLimits = {
  maxProcesses: 40,
  maxMemoryBytes: 256 * 1024 ** 2,
  tmpSizeBytes: 1024 ** 2,
  shmSizeBytes: 1024 ** 2,
  maxFileSizeBytes: 3 * 1024 ** 2,
  maxOpenFiles: 200,
  diskBytes: 0,
  diskEntries: 0,
};

/** A sandbox without a cgroup: what a host without a writable memory and pids cgroup gets. */
const sandbox = new BubblewrapSandbox({ uid: UID, gid: UID, limits: LIMITS });

async function sh(t: TestContext, script: string) {
  const dir = await mkdtemp(join(tmpdir(), "berth-limits-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await chmod(dir, 0o755);
  const inputRoot = join(dir, "input");
  await mkdir(inputRoot);
  await chown(inputRoot, UID, UID);
  const result = await sandbox.run({
    inputRoot,
    workingDirectory: "",
    argv: ["sh", "-c", script],
    env: [{ name: "PATH", value: "/usr/bin:/bin" }],
    timeoutMs: 60_000,
    stdoutPath: join(dir, "stdout"),
    stderrPath: join(dir, "stderr"),
  });
  return { ...result, stdout: await readFile(join(dir, "stdout"), "utf8") };
}

test("without a cgroup, rlimits bound the action's processes, memory, files and descriptors", {
  skip: !isRoot,
}, async (t) => {
  const limits = await sh(t, "cat /proc/self/limits");
  const row = (name: string) => new RegExp(`^${name}\\s+(\\d+)\\s+(\\d+)`, "m").exec(limits.stdout)?.slice(1);
  assert.deepEqual(row("Max processes"), ["40", "40"]);
  assert.deepEqual(row("Max address space"), [String(LIMITS.maxMemoryBytes), String(LIMITS.maxMemoryBytes)]);
  assert.deepEqual(row("Max file size"), [String(LIMITS.maxFileSizeBytes), String(LIMITS.maxFileSizeBytes)]);
  assert.deepEqual(row("Max open files"), ["200", "200"]);
  assert.deepEqual(row("Max core file size"), ["0", "0"]);

  // The action can lower them but never raise them again.
  const raise = await sh(t, "ulimit -n 100000 && echo raised");
  assert.notEqual(raise.exitCode, 0);
  assert.equal(raise.stdout, "");

  // Memory without a cgroup: the address space ends at maxMemoryBytes, so the allocation fails.
  const hog = await sh(t, `perl -e '$x = "a" x (400 * 1024 * 1024); print "allocated\\n"'`);
  assert.notEqual(hog.exitCode, 0);
  assert.equal(hog.stdout, "");

  // Processes: the slot's uid holds at most 40.
  const bomb = await sh(t, "i=0; while [ $i -lt 100 ]; do sleep 5 & i=$((i+1)); done; echo started all");
  assert.notEqual(bomb.exitCode, 0);
  assert.equal(bomb.stdout, "");
  assert.equal(bomb.limitReached, undefined, "without a cgroup, no counter says which limit it was");
});
