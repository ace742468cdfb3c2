import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { after, before, describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { Code } from "../status/status.js";

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

/** Sandbox agents (perl, the resident sandboxes' pid 1) on the host running as a uid in [from, from + count). */
function agentsOf(from: number, count: number): string[] {
  return readdirSync("/proc").filter((pid) => {
    if (!/^\d+$/.test(pid)) return false;
    try {
      const status = readFileSync(`/proc/${pid}/status`, "utf8");
      const uid = Number(/^Uid:\s+(\d+)/m.exec(status)?.[1]);
      return /^Name:\s+perl$/m.test(status) && uid >= from && uid < from + count;
    } catch {
      return false;
    }
  });
}

describe("sandboxes made ahead (worker.sandboxesAhead) on a real farm", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm({ worker: { sandboxesAhead: true } }, undefined, { workers: 1 });
  });
  after(() => farm?.close());

  let salt = 0;
  async function run(script: string, platform: { name: string; value: string }[] = []) {
    const action = await uploadAction(farm.clients, { args: ["sh", "-c", script], platform, salt: String(salt++) });
    const { response } = await execute(farm.clients, action, { skipCacheLookup: true });
    assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
    assert.equal(response.result?.exitCode, 0, await readBlob(farm.clients, response.result?.stderrDigest));
    return readBlob(farm.clients, response.result?.stdoutDigest);
  }

  test("each action runs in a sandbox of its own, started before it arrived, with nothing of the one before", async () => {
    await run("echo first; echo left > /tmp/mark");
    for (let i = 0; i < 3; i++) {
      // pid 1 is the resident sandbox's agent (perl), not bwrap: the sandbox was made ahead.
      const seen = await run("cat /proc/1/comm; cat /tmp/mark 2>/dev/null || echo clean; pwd");
      assert.equal(seen, "perl\nclean\n/run/berth/execroot\n", `action ${i}`);
    }
  });

  test("a process the action leaves running is gone before its outputs are read, as in a fresh sandbox", async () => {
    const argv = ["sleep", "4242"];
    // No pause after the response: a used sandbox is ended off the action's path only when nothing ran on in it.
    await run("sleep 4242 >/dev/null 2>&1 & echo started");
    assert.deepEqual(hostProcesses(argv), [], "the action's background process outlived it");
    await run("setsid sleep 4242 >/dev/null 2>&1 & (sh -c 'sleep 4242 >/dev/null 2>&1 &' &); echo started");
    assert.deepEqual(hostProcesses(argv), [], "a process of another session, or an orphan, outlived the action");
  });

  test("the sandboxes used end after their actions: of five, none is left, only the one made for the next", async () => {
    for (let i = 0; i < 5; i++) assert.equal(await run("echo used"), "used\n");
    // The farm's slots run as uids from sandboxUidBase on (test/support/farm.ts gives each farm 16).
    const sandboxes = () => agentsOf(farm.config.worker.sandboxUidBase, 16);
    for (let waited = 0; waited < 2000 && sandboxes().length !== 1; waited += 50) await sleep(50);
    assert.equal(sandboxes().length, 1, "the agents of this farm's sandboxes, one per sandbox");
  });

  test("an action of another shape (other ids inside) runs in a fresh sandbox; the next of that shape in one made ahead", async () => {
    const ids = [{ name: "unixUID", value: "1234" }];
    const fresh = await run("cat /proc/1/comm; id -u", ids);
    assert.notEqual(fresh.split("\n")[0], "perl");
    assert.equal(fresh.split("\n")[1], "1234");
    assert.equal(await run("cat /proc/1/comm; id -u", ids), "perl\n1234\n");
  });
});
