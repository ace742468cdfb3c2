import assert from "node:assert/strict";
import { chmod, chown, mkdir, mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { Code, StatusError } from "../status/status.js";
import { BubblewrapSandbox } from "./bubblewrap.js";
import { openSlotCgroup, removeSlotCgroup } from "./cgroups.js";

const isRoot = process.getuid?.() === 0;
/** A uid of this test's own, so that any process of it was started here. */
const UID = 2_099_000_000 + (process.pid % 100_000);

test("a sandbox whose set-up fails is an error naming the cause, and leaves no process behind", {
  skip: !isRoot,
}, async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "berth-setup-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await chmod(dir, 0o755);
  const inputRoot = join(dir, "input");
  await mkdir(inputRoot);
  await chown(inputRoot, UID, UID);
  const cgroup = openSlotCgroup(99, { memoryBytes: 64 * 1024 ** 2, processes: 32 });
  t.after(() => cgroup && removeSlotCgroup(cgroup));
  const sandbox = new BubblewrapSandbox({ uid: UID, gid: UID, cgroup, slirp4netnsPath: "/nonexistent/slirp4netns" });
  await assert.rejects(
    sandbox.run({
      inputRoot,
      workingDirectory: "",
      argv: ["sleep", "300"],
      env: [{ name: "PATH", value: "/usr/bin:/bin" }],
      timeoutMs: 60_000,
      stdoutPath: join(dir, "stdout"),
      stderrPath: join(dir, "stderr"),
      network: true,
    }),
    (err: unknown) => {
      assert.ok(err instanceof StatusError);
      assert.equal(err.code, Code.FAILED_PRECONDITION);
      assert.match(
        err.message,
        /network: this worker cannot give the action a network of its own: .*\/nonexistent\/slirp4netns/,
      );
      return true;
    },
  );
  assert.deepEqual(await processesOf(UID), []);
  // And a sandbox of that slot still starts: nothing of the failed one is in its way.
  const healthy = new BubblewrapSandbox({ uid: UID, gid: UID, cgroup });
  const result = await healthy.run({
    inputRoot,
    workingDirectory: "",
    argv: ["sh", "-c", "echo fine"],
    env: [{ name: "PATH", value: "/usr/bin:/bin" }],
    timeoutMs: 60_000,
    stdoutPath: join(dir, "stdout"),
    stderrPath: join(dir, "stderr"),
  });
  assert.equal(result.exitCode, 0);
  assert.equal(await readFile(join(dir, "stdout"), "utf8"), "fine\n");
});

async function processesOf(uid: number): Promise<string[]> {
  const found: string[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const status = await readFile(`/proc/${entry}/status`, "utf8");
      if (Number(/^Uid:\s+(\d+)/m.exec(status)?.[1]) !== uid || /^State:\s+Z/m.test(status)) continue;
      found.push(`${entry} ${(await readFile(`/proc/${entry}/cmdline`, "utf8")).split("\0").join(" ")}`);
    } catch {
      // Exited while we looked.
    }
  }
  return found;
}
