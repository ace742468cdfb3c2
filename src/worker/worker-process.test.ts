import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { connect, type ServerProcess, spawnBerth } from "../../test/support/farm.js";
import { waitFor } from "../../test/support/wait.js";

const run = promisify(execFile);
let dir: string;
let berth: ServerProcess;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "berth-worker-process-"));
  await chmod(dir, 0o755);
  berth = await spawnBerth(["--data-dir", join(dir, "data"), "--workers", "2"]);
});
after(async () => {
  await berth.stop();
  await rm(dir, { recursive: true, force: true });
});

/** Pids of the processes whose parent is `pid`. */
async function children(pid: number): Promise<number[]> {
  const { stdout } = await run("ps", ["-o", "pid=", "--ppid", String(pid)]).catch(() => ({ stdout: "" }));
  return stdout
    .split("\n")
    .map((line) => Number(line.trim()))
    .filter((n) => n > 0);
}

async function alive(pid: number): Promise<boolean> {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function runEcho(word: string): Promise<string> {
  const clients = connect(berth.address);
  try {
    const digest = await uploadAction(clients, { args: ["/bin/sh", "-c", `echo ${word}`], salt: word });
    const { response } = await execute(clients, digest);
    assert.equal(response.status?.code ?? 0, 0, response.status?.message);
    return await readBlob(clients, response.result?.stdoutDigest);
  } finally {
    clients.close();
  }
}

test("berth serve runs its local workers in a child process, restarts it when it dies, and takes it down when it dies itself", async () => {
  const serverPid = berth.child.pid as number;
  const [first] = await waitFor("the worker process", async () => {
    const pids = await children(serverPid);
    return pids.length === 1 ? pids : undefined;
  });
  assert.equal(await runEcho("before"), "before\n");

  process.kill(first as number, "SIGKILL");
  const second = await waitFor("a new worker process", async () => {
    const pids = await children(serverPid);
    return pids.length === 1 && pids[0] !== first ? pids[0] : undefined;
  });
  assert.equal(await runEcho("after"), "after\n");

  // Killed outright, the server cannot stop its child; the child notices its IPC channel close.
  berth.child.kill("SIGKILL");
  await waitFor("the worker process to exit", async () => ((await alive(second as number)) ? undefined : true));
});
