import assert from "node:assert/strict";
import { chmod, chown, mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { BubblewrapSandbox } from "./bubblewrap.js";
import { openSlotCgroup, removeSlotCgroup } from "./cgroups.js";

const isRoot = process.getuid?.() === 0;
/** A uid of this test's own, so that any process of it was started here. */
const UID = 2_098_000_000 + (process.pid % 100_000);

function pidsIn(procsFile: string): Promise<number[]> {
  return readFile(procsFile, "utf8").then((text) => text.split("\n").filter(Boolean).map(Number));
}

test("a slot's actions are born in its cgroup, as the OOM killer's first choice, and its launcher outlives each", {
  skip: !isRoot,
}, async (t) => {
  const cgroup = openSlotCgroup(98, { memoryBytes: 256 * 1024 ** 2, processes: 64 });
  if (!cgroup) return t.skip("no writable cgroup with the memory and pids controllers on this host");
  t.after(() => removeSlotCgroup(cgroup));
  const dir = await mkdtemp(join(tmpdir(), "berth-slot-launcher-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await chmod(dir, 0o755);
  const sandbox = new BubblewrapSandbox({ uid: UID, gid: UID, cgroup });

  const run = async (name: string, script: string) => {
    const inputRoot = join(dir, name);
    await mkdir(inputRoot);
    await chown(inputRoot, UID, UID);
    const stdoutPath = join(dir, `${name}.out`);
    const result = await sandbox.run({
      inputRoot,
      workingDirectory: "",
      argv: ["/bin/sh", "-c", script],
      env: [{ name: "PATH", value: "/usr/bin:/bin" }],
      timeoutMs: 60_000,
      stdoutPath,
      stderrPath: join(dir, `${name}.err`),
    });
    return { result, stdout: await readFile(stdoutPath, "utf8") };
  };

  // While the action sleeps, every cgroup.procs file of the slot lists its processes: it never had to join.
  const first = run("first", "cat /proc/self/oom_score_adj; sleep 1 & wait");
  let during: number[][] = [];
  for (let i = 0; i < 100; i++) {
    await new Promise((resolve) => setTimeout(resolve, 20));
    during = await Promise.all(cgroup.procsFiles.map(pidsIn));
    if (during.every((pids) => pids.length >= 3)) break;
  }
  const { result, stdout } = await first;
  assert.equal(result.exitCode, 0);
  assert.equal(stdout.trim(), "1000", "an action's processes are the OOM killer's first choice");
  for (const pids of during) assert.ok(pids.length >= 3, `the launcher, bwrap and the action in ${pids}`);

  // After the action, only the launcher is left in the cgroup, and it starts the next action.
  const after = await Promise.all(cgroup.procsFiles.map(pidsIn));
  for (const pids of after) assert.equal(pids.length, 1, `only the slot's launcher is left: ${pids}`);
  const launcherPid = after[0]?.[0] as number;
  const cmdline = await readFile(`/proc/${launcherPid}/cmdline`, "utf8");
  assert.match(cmdline, /launcher\.pl/);
  assert.equal((await readFile(`/proc/${launcherPid}/oom_score_adj`, "utf8")).trim(), "0");

  // A process that left the sandbox's process group is killed with the action; the launcher is not.
  const second = await run("second", "setsid sleep 300 & echo started");
  assert.equal(second.result.exitCode, 0);
  const left = await Promise.all(cgroup.procsFiles.map(pidsIn));
  for (const pids of left) assert.deepEqual(pids, [launcherPid]);
});
