import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { chmod, chown, mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { BubblewrapSandbox } from "../sandbox/bubblewrap.js";
import { Code } from "../status/status.js";
import { AheadRunner, IDLE_BEFORE_MAKING_MS } from "./ahead-runner.js";
import { BubblewrapRunner } from "./bubblewrap-runner.js";

const NOBODY = 65534;

/** Processes on the host whose command line is exactly `argv`. */
function hostProcesses(argv: string[]): string[] {
  const wanted = `${argv.join("\u0000")}\u0000`;
  return readdirSync("/proc").filter((pid) => {
    if (!/^\d+$/.test(pid)) return false;
    try {
      return readFileSync(`/proc/${pid}/cmdline`, "utf8") === wanted;
    } catch {
      return false;
    }
  });
}

/** Sandbox agents (berth-agent, the resident sandboxes' pid 1) on the host running as a uid in [from, from + count). */
function agentsOf(from: number, count: number): string[] {
  return readdirSync("/proc").filter((pid) => {
    if (!/^\d+$/.test(pid)) return false;
    try {
      const status = readFileSync(`/proc/${pid}/status`, "utf8");
      const uid = Number(/^Uid:\s+(\d+)/m.exec(status)?.[1]);
      return /^Name:\s+berth-agent$/m.test(status) && uid >= from && uid < from + count;
    } catch {
      return false;
    }
  });
}

/** Long enough for the slot to be idle, and its next sandbox begun (an action then waits for it to be ready). */
const idle = () => sleep(IDLE_BEFORE_MAKING_MS + 50);

describe("sandboxes made ahead (worker.sandboxesAhead) on a real farm", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm({ worker: { sandboxesAhead: true } }, undefined, { workers: 1 });
  });
  after(() => farm?.close());

  let salt = 0;
  async function run(
    script: string,
    platform: { name: string; value: string }[] = [],
    files: Record<string, string> = {},
  ) {
    const action = await uploadAction(farm.clients, {
      args: ["sh", "-c", script],
      platform,
      files,
      salt: String(salt++),
    });
    const { response } = await execute(farm.clients, action, { skipCacheLookup: true });
    assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
    assert.equal(response.result?.exitCode, 0, await readBlob(farm.clients, response.result?.stderrDigest));
    return readBlob(farm.clients, response.result?.stdoutDigest);
  }

  test("each action runs in a sandbox of its own, started before it arrived, with nothing of the one before", async () => {
    await run("echo first; echo left > /tmp/mark");
    for (let i = 0; i < 3; i++) {
      await idle();
      // pid 1 is the resident sandbox's agent (berth-agent), not bwrap: the sandbox was made ahead.
      const seen = await run("cat /proc/1/comm; cat /tmp/mark 2>/dev/null || echo clean; pwd");
      assert.equal(seen, "berth-agent\nclean\n/run/berth/execroot\n", `action ${i}`);
    }
  });

  test("a sandbox made ahead sees the action's inputs, and only them", async () => {
    await idle();
    const seen = await run("cat /proc/1/comm; cat src/in.txt; ls -A", [], { "src/in.txt": "laid out\n" });
    assert.equal(seen, "berth-agent\nlaid out\nsrc\n");
  });

  test("after an action refused once its inputs were laid out, the next runs made ahead with its own inputs only", async () => {
    await idle();
    // The worker refuses a working directory through a symlink out of the input root, after the layout.
    const refused = await uploadAction(farm.clients, {
      args: ["true"],
      files: { "secret.txt": "the refused action's\n" },
      symlinks: { out: "/etc" },
      workingDirectory: "out",
      salt: String(salt++),
    });
    const { response } = await execute(farm.clients, refused, { skipCacheLookup: true });
    assert.equal(response.status?.code, Code.INVALID_ARGUMENT, response.status?.message);
    // The sandbox made while the slot was idle waited through the refusal: this action has it, and nothing else.
    const script = "cat /proc/1/comm; cat in.txt; ls -A";
    assert.equal(await run(script, [], { "in.txt": "mine\n" }), "berth-agent\nmine\nin.txt\n");
  });

  test("a process the action leaves running is gone before its outputs are read, as in a fresh sandbox", async () => {
    const argv = ["sleep", "4242"];
    // No pause after the response: a used sandbox is ended off the action's path only when nothing ran on in it.
    await idle();
    await run("sleep 4242 >/dev/null 2>&1 & echo started");
    assert.deepEqual(hostProcesses(argv), [], "the action's background process outlived it");
    await idle();
    await run("setsid sleep 4242 >/dev/null 2>&1 & (sh -c 'sleep 4242 >/dev/null 2>&1 &' &); echo started");
    assert.deepEqual(hostProcesses(argv), [], "a process of another session, or an orphan, outlived the action");
  });

  test("the sandboxes used end after their actions: of five, none is left, only the one made for the next", async () => {
    for (let i = 0; i < 5; i++) {
      await idle();
      assert.equal(await run("cat /proc/1/comm"), "berth-agent\n", `action ${i} ran in a sandbox made ahead`);
    }
    // The farm's slots run as uids from sandboxUidBase on (test/support/farm.ts gives each farm 16).
    const sandboxes = () => agentsOf(farm.config.worker.sandboxUidBase, 16);
    for (let waited = 0; waited < 2000 && sandboxes().length !== 1; waited += 50) await sleep(50);
    assert.equal(sandboxes().length, 1, "the agents of this farm's sandboxes, one per sandbox");
  });

  test("an action of another shape (other ids inside) runs in a fresh sandbox; the next of that shape in one made ahead", async () => {
    const ids = [{ name: "unixUID", value: "1234" }];
    const fresh = await run("cat /proc/1/comm; id -u", ids);
    assert.notEqual(fresh.split("\n")[0], "berth-agent");
    assert.equal(fresh.split("\n")[1], "1234");
    await idle();
    assert.equal(await run("cat /proc/1/comm; id -u", ids), "berth-agent\n1234\n");
  });
});

test("back to back, an action runs in a fresh sandbox rather than wait for one; once the slot is idle, in one made ahead", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "berth-ahead-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await chmod(dir, 0o755);
  const fresh = new BubblewrapRunner(new BubblewrapSandbox(), { layeredRoots: true });
  const runner = new AheadRunner(fresh, {
    dir: join(dir, "ahead"),
    uid: NOBODY,
    gid: NOBODY,
    cgroup: undefined,
    settings: {},
  });
  t.after(() => runner.close());
  // Each action's directory is made beforehand: between two actions there is nothing but the run.
  const actions = await Promise.all(
    [0, 1, 2, 3].map(async (n) => {
      const scratchDir = join(dir, `action-${n}`);
      const inputRoot = join(scratchDir, "root");
      await mkdir(inputRoot, { recursive: true });
      await chown(inputRoot, NOBODY, NOBODY);
      return { scratchDir, inputRoot };
    }),
  );
  const pidOne = async (n: number) => {
    const action = actions[n] as (typeof actions)[number];
    const stdoutPath = join(action.scratchDir, "stdout");
    const result = await runner.run({
      ...action,
      root: { kind: "host" },
      workingDirectory: "",
      argv: ["cat", "/proc/1/comm"],
      env: [{ name: "PATH", value: "/bin:/usr/bin" }],
      timeoutMs: 30_000,
      stdoutPath,
      stderrPath: join(action.scratchDir, "stderr"),
      network: false,
      user: { uid: NOBODY, gid: NOBODY },
      signal: new AbortController().signal,
    });
    assert.equal(result.exitCode, 0);
    return (await readFile(stdoutPath, "utf8")).trim();
  };
  // pid 1 of a resident sandbox is its agent (berth-agent); of a fresh one, bwrap.
  assert.equal(await pidOne(0), "berth-agent", "the first sandbox is made as the runner starts");
  assert.equal(await pidOne(1), "bwrap", "right after the last action: a fresh sandbox");
  assert.equal(await pidOne(2), "bwrap", "still back to back");
  await idle();
  assert.equal(await pidOne(3), "berth-agent", "after a pause: the sandbox made meanwhile");
});
