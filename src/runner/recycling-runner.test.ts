import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { after, before, describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { Code } from "../status/status.js";

type Property = { name: string; value: string };
const RECYCLE: Property = { name: "recycle-runner", value: "true" };

/**
 * A server in the sandbox's own network namespace, on its loopback: it
 * answers each connection with the count of connections so far. Started in
 * the background by one action, it outlives it only in a warm runner.
 */
const START_SERVER = [
  "python3 -c '",
  "import socket, os",
  "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)",
  's.bind(("127.0.0.1", 7777)); s.listen()',
  'open("/tmp/server.pid", "w").write(str(os.getpid()))',
  "n = 0",
  "while True:",
  "    c, _ = s.accept(); n += 1; c.sendall(str(n).encode()); c.close()",
  "' >/dev/null 2>&1 &",
  "while ! test -s /tmp/server.pid; do sleep 0.02; done; echo started",
].join("\n");

/** Asks the server; "none" when nothing listens. */
const ASK_SERVER = `python3 -c '
import socket
try:
    c = socket.create_connection(("127.0.0.1", 7777), timeout=2); print(c.recv(16).decode())
except OSError:
    print("none")
'`;

describe("warm runners (recycle-runner) on a real farm", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm({ worker: { warmRunners: { maxRunners: 2 } } }, undefined, { workers: 1 });
  });
  after(() => farm?.close());

  let salt = 0;
  /** Runs `script` with these properties; its stdout (the action must succeed unless `exitCode` says). */
  async function run(
    script: string,
    platform: Property[],
    options: { instance?: string; files?: Record<string, string>; outputs?: string[] } = {},
  ) {
    const action = await uploadAction(farm.clients, {
      args: ["sh", "-c", script],
      platform,
      salt: String(salt++),
      doNotCache: true,
      files: options.files,
      outputFiles: options.outputs,
    });
    const { response } = await execute(farm.clients, action);
    assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
    return {
      exitCode: response.result?.exitCode,
      stdout: await readBlob(farm.clients, response.result?.stdoutDigest),
      stderr: await readBlob(farm.clients, response.result?.stderrDigest),
    };
  }

  test("a server started by one action answers the next action with the same key, and no action of another key", async () => {
    const key = [RECYCLE, { name: "runner-recycling-key", value: "server" }];
    assert.equal((await run(START_SERVER, key)).stdout, "started\n");
    assert.equal((await run(ASK_SERVER, key)).stdout, "1\n");
    assert.equal((await run(ASK_SERVER, key)).stdout, "2\n", "the same server, still counting");
    // Another recycling key, and no recycling at all: a sandbox of their own, where nothing listens.
    assert.equal((await run(ASK_SERVER, [RECYCLE, { name: "runner-recycling-key", value: "other" }])).stdout, "none\n");
    assert.equal((await run(ASK_SERVER, [])).stdout, "none\n");
    assert.equal((await run(ASK_SERVER, key)).stdout, "3\n");
  });

  test("a failed action, or one that leaves .BERTH_DO_NOT_RECYCLE, is not followed in its runner", async () => {
    for (const [i, ending] of ["exit 3", "touch .BERTH_DO_NOT_RECYCLE"].entries()) {
      const key = [RECYCLE, { name: "runner-recycling-key", value: `end-${i}` }];
      assert.equal((await run("echo kept > /tmp/state; echo ok", key)).stdout, "ok\n");
      assert.equal((await run("cat /tmp/state", key)).stdout, "kept\n");
      const ended = await run(ending, key);
      assert.equal(ended.exitCode, i === 0 ? 3 : 0);
      assert.equal((await run("cat /tmp/state 2>/dev/null || echo gone", key)).stdout, "gone\n", ending);
    }
  });

  test("between actions the workspace is emptied; with preserve-workspace it is kept but for the outputs and the clean-workspace-inputs", async () => {
    const plain = [RECYCLE, { name: "runner-recycling-key", value: "plain" }];
    await run("mkdir -p cache && echo 1 > cache/state", plain, { files: { "in/a.txt": "a" } });
    assert.equal((await run("ls -A", plain)).stdout, "", "nothing of the previous action");

    const preserve = [
      RECYCLE,
      { name: "runner-recycling-key", value: "keep" },
      { name: "preserve-workspace", value: "true" },
    ];
    const cleaning = [...preserve, { name: "clean-workspace-inputs", value: "gen/**" }];
    await run("mkdir -p cache out && echo 1 > cache/state && echo o > out/result", cleaning, {
      files: { "src/a.txt": "a", "gen/old.txt": "old" },
      outputs: ["out/result"],
    });
    const second = await run("find . -type f | sort; cat cache/state", cleaning, { files: { "src/b.txt": "b" } });
    assert.equal(
      second.stdout,
      "./cache/state\n./src/a.txt\n./src/b.txt\n1\n",
      "the cache and the old input stay; the output and the inputs matching gen/** go",
    );
  });

  test("past maxRunners the least recently used idle runner is stopped, leaving no process", async () => {
    const started: string[] = [];
    for (const name of ["cap-a", "cap-b", "cap-c"]) {
      const key = [RECYCLE, { name: "runner-recycling-key", value: name }];
      await run("sleep 1000 >/dev/null 2>&1 & echo $! > /tmp/sleeper; echo ok", key);
      started.push(name);
    }
    // Three runners were made, two are kept: cap-a's was stopped with its sleeper.
    const gone = await run("cat /tmp/sleeper 2>/dev/null || echo gone", [
      RECYCLE,
      { name: "runner-recycling-key", value: "cap-a" },
    ]);
    assert.equal(gone.stdout, "gone\n");
    const kept = await run("kill -0 $(cat /tmp/sleeper) && echo alive", [
      RECYCLE,
      { name: "runner-recycling-key", value: "cap-c" },
    ]);
    assert.equal(kept.stdout, "alive\n");
    await sleep(200);
    // Host-wide: sleepers of stopped runners are gone (one per idle runner at most is left).
    const sleepers = readdirSync("/proc")
      .filter((pid) => /^\d+$/.test(pid))
      .filter((pid) => {
        try {
          return readFileSync(`/proc/${pid}/cmdline`, "utf8") === "sleep\u00001000\u0000";
        } catch {
          return false;
        }
      });
    assert.ok(sleepers.length <= 2, `${sleepers.length} sleepers left`);
  });
});
