import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import {
  type BazelWorkerActionSpec,
  bazelWorkerAction,
  PERSISTENT_WORKER_SCRIPT,
} from "../../test/support/persistent-actions.js";
import { Code, type StatusError } from "../status/status.js";
import { ChildProcessLauncher } from "./child-process-launcher.js";
import { type PersistentWorkerSpec, persistentWorkerSpec } from "./persistent-action.js";
import { DEFAULT_WORKER_POOL_LIMITS, PersistentWorkerPool, type WorkerPoolLimits } from "./worker-pool.js";

/** What persistent_worker.py answers: who answered, and what it was sent. */
interface Echo {
  pid: number;
  count: number;
  children: number[];
  startup: string[];
  arguments: string[];
  inputs: Record<string, string>;
}

let baseDir: string;
before(async () => {
  baseDir = await mkdtemp(join(tmpdir(), "berth-persistent-"));
});
after(async () => {
  await rm(baseDir, { recursive: true, force: true });
});

/** A Bazel 6 action's spec, and the way the worker lays out its input root in the process's. */
async function work(spec: BazelWorkerActionSpec) {
  const built = await bazelWorkerAction(spec);
  const persistent = (await persistentWorkerSpec(built.action, built.command, built.inputs)) as PersistentWorkerSpec;
  assert.ok(persistent, "the action is a persistent-worker action");
  return { spec: persistent, prepare: built.writeInputRoot };
}

function newPool(limits: Partial<WorkerPoolLimits> = {}): PersistentWorkerPool {
  return new PersistentWorkerPool(new ChildProcessLauncher(baseDir), { ...DEFAULT_WORKER_POOL_LIMITS, ...limits });
}

function echo(stderr: Buffer): Echo {
  return JSON.parse(stderr.toString()) as Echo;
}

/** Whether `pid` is a live process (a zombie waiting for init to reap it is not). */
function running(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
}

/** Waits (up to 5 s) for `pid` to be gone. */
async function gone(pid: number): Promise<boolean> {
  for (let i = 0; i < 500 && running(pid); i++) await new Promise((r) => setTimeout(r, 10));
  return !running(pid);
}

for (const protocol of ["json", "proto"] as const) {
  describe(`a persistent worker speaking ${protocol}`, () => {
    test("one process answers every request of its key, each with the request's arguments and input digests", async () => {
      const pool = newPool();
      try {
        const answers: Echo[] = [];
        for (const n of [1, 2, 3]) {
          const { spec, prepare } = await work({
            protocol,
            requestArgs: [`--out=bazel-out/k8-fastbuild/bin/pkg/${n}.txt`, `pkg/src${n}.txt`],
            sources: { [`pkg/src${n}.txt`]: `source ${n}\n` },
            name: `out${n}`,
          });
          const result = await pool.run(spec, { prepare });
          assert.equal(result.exitCode, 0);
          assert.equal(result.previousRequests, n - 1);
          const answer = echo(result.stderr);
          answers.push(answer);
          assert.deepEqual(answer.arguments, [`--out=bazel-out/k8-fastbuild/bin/pkg/${n}.txt`, `pkg/src${n}.txt`]);
          // Every input file, tool and flagfile included, with the lowercase hex of its SHA-256.
          const source = spec.request.inputs.find((i) => i.path === `pkg/src${n}.txt`);
          assert.ok(source);
          assert.equal(answer.inputs[`pkg/src${n}.txt`], Buffer.from(source.digest).toString());
          assert.match(answer.inputs[`pkg/src${n}.txt`] as string, /^[0-9a-f]{64}$/);
          assert.ok(`bazel-out/k8-opt-exec/bin/tools/persistent_worker.py` in answer.inputs);
          assert.ok(`bazel-out/k8-fastbuild/bin/pkg/out${n}-0.params` in answer.inputs);
        }
        assert.deepEqual(
          answers.map((a) => [a.pid, a.count]),
          answers.map((_, i) => [answers[0]?.pid, i + 1]),
          "the same process, its count going up",
        );
        // Started with the arguments that are not flagfiles, and --persistent_worker.
        assert.deepEqual(answers[0]?.startup, [`--protocol=${protocol}`, "--persistent_worker"]);
      } finally {
        await pool.close();
      }
    });

    test("a process that crashes is replaced and the request answered by the new one; a second crash fails it", async () => {
      const pool = newPool();
      try {
        const first = await work({ protocol, requestArgs: ["warm"] });
        const warm = echo((await pool.run(first.spec, { prepare: first.prepare })).stderr);
        const crashOnce = await work({ protocol, requestArgs: [`--crash-in-pid=${warm.pid}`] });
        const retried = await pool.run(crashOnce.spec, { prepare: crashOnce.prepare });
        assert.equal(retried.retried, true);
        assert.equal(retried.previousRequests, 0, "a new process answered");
        assert.notEqual(echo(retried.stderr).pid, warm.pid);
        assert.ok(await gone(warm.pid), "the crashed process is gone");

        const crashAlways = await work({ protocol, requestArgs: ["--crash", "--stderr=about to crash"] });
        await assert.rejects(pool.run(crashAlways.spec, { prepare: crashAlways.prepare }), (err: StatusError) => {
          assert.equal(err.code, Code.UNAVAILABLE);
          assert.match(err.message, /failed the request twice/);
          assert.match(err.message, /exit code 3/);
          assert.match(err.message, /about to crash/, "the process's stderr explains it");
          return true;
        });
        assert.deepEqual(pool.processes(), [], "both crashed processes are gone from the pool");
      } finally {
        await pool.close();
      }
    });

    test("a process writing garbage instead of a response is killed, and so is its replacement", async () => {
      const pool = newPool();
      try {
        const { spec, prepare } = await work({ protocol, requestArgs: ["--garbage"] });
        const started = Date.now();
        await assert.rejects(pool.run(spec, { prepare }), (err: StatusError) => {
          assert.equal(err.code, Code.UNAVAILABLE);
          assert.match(err.message, protocol === "json" ? /other than a JSON WorkResponse/ : /not a WorkResponse/);
          return true;
        });
        // The worker sleeps an hour after its garbage: it was killed, not waited for.
        assert.ok(Date.now() - started < 10_000);
        assert.deepEqual(pool.processes(), []);
      } finally {
        await pool.close();
      }
    });

    test("a process that breaks the protocol (stdout banner, wrong request_id, two answers) is killed and replaced", async () => {
      const pool = newPool();
      try {
        for (const [args, startupArgs, message] of [
          [["x"], ["--banner"], /unasked|other than a JSON WorkResponse|not a WorkResponse/],
          [["--request-id=7"], [], /answered request_id 7; request 0 was sent/],
          [["--twice"], [], /a WorkResponse it was not asked for/],
        ] as const) {
          const { spec, prepare } = await work({ protocol, requestArgs: [...args], startupArgs: [...startupArgs] });
          await assert.rejects(pool.run(spec, { prepare }), (err: StatusError) => {
            assert.equal(err.code, Code.UNAVAILABLE);
            assert.match(err.message, message);
            return true;
          });
        }
        assert.deepEqual(pool.processes(), []);
      } finally {
        await pool.close();
      }
    });

    test("a non-zero exit code in the response is the action's, and keeps the process", async () => {
      const pool = newPool();
      try {
        const failing = await work({ protocol, requestArgs: ["--exit-code=2"] });
        const first = await pool.run(failing.spec, { prepare: failing.prepare });
        assert.equal(first.exitCode, 2);
        const second = await pool.run(failing.spec, { prepare: failing.prepare });
        assert.equal(echo(second.stderr).pid, echo(first.stderr).pid);
      } finally {
        await pool.close();
      }
    });

    test("a gigantic response is refused at the cap, without reading it into memory", async () => {
      const cap = 1024 * 1024;
      const pool = newPool({ maxResponseBytes: cap });
      try {
        // 4 GiB announced (proto) or streamed (json): only a little more than the cap is ever read.
        const { spec, prepare } = await work({ protocol, requestArgs: [`--huge=${4 * 1024 ** 3}`] });
        const rssBefore = process.memoryUsage().rss;
        await assert.rejects(pool.run(spec, { prepare }), (err: StatusError) => {
          assert.equal(err.code, Code.UNAVAILABLE);
          assert.match(err.message, new RegExp(`at most ${cap} bytes are accepted`));
          return true;
        });
        assert.ok(process.memoryUsage().rss - rssBefore < 256 * 1024 * 1024, "memory stayed bounded");
      } finally {
        await pool.close();
      }
    });
  });
}

test("a json worker that writes each response's newline on its own keeps its process", async () => {
  const pool = newPool();
  try {
    const { spec, prepare } = await work({ protocol: "json", requestArgs: ["--split-newline"] });
    const first = echo((await pool.run(spec, { prepare })).stderr);
    await new Promise((r) => setTimeout(r, 200));
    const second = echo((await pool.run(spec, { prepare })).stderr);
    assert.deepEqual([second.pid, second.count], [first.pid, 2]);
  } finally {
    await pool.close();
  }
});

test("actions with different tools never share a process, even when they send the same persistentWorkerKey", async () => {
  const pool = newPool();
  try {
    // The hostile client sends one key for three different workers: another tool, other start-up arguments.
    const workerKey = "0".repeat(64);
    const plain = await work({ requestArgs: ["a"], workerKey });
    const tool = `${await readFile(PERSISTENT_WORKER_SCRIPT, "utf8")}\n# another tool\n`;
    const otherTool = await work({ requestArgs: ["b"], workerKey, tool });
    const otherFlags = await work({ requestArgs: ["c"], workerKey, startupArgs: ["--verbose-tool"] });
    assert.equal(new Set([plain, otherTool, otherFlags].map((w) => w.spec.clientKey)).size, 1);
    const a = echo((await pool.run(plain.spec, { prepare: plain.prepare })).stderr);
    const b = echo((await pool.run(otherTool.spec, { prepare: otherTool.prepare })).stderr);
    const c = echo((await pool.run(otherFlags.spec, { prepare: otherFlags.prepare })).stderr);
    assert.equal(new Set([a.pid, b.pid, c.pid]).size, 3);
    assert.equal(pool.processes().length, 3);
  } finally {
    await pool.close();
  }
});

test("a key's requests beyond its cap wait for its process instead of starting more", async () => {
  const pool = newPool({ maxProcessesPerKey: 1 });
  try {
    const slow = await work({ requestArgs: ["--sleep=0.3"] });
    const results = await Promise.all([1, 2, 3].map(() => pool.run(slow.spec, { prepare: slow.prepare })));
    const pids = results.map((r) => echo(r.stderr).pid);
    assert.equal(new Set(pids).size, 1, "one process answered all three");
    assert.deepEqual(results.map((r) => r.previousRequests).sort(), [0, 1, 2]);
  } finally {
    await pool.close();
  }
});

test("at the total cap, the least recently used idle process is stopped to make room for another key", async () => {
  const pool = newPool({ maxProcesses: 2 });
  try {
    const keys = await Promise.all(
      ["a", "b", "c"].map((x) => work({ requestArgs: [x], startupArgs: [`--tool=${x}`] })),
    );
    const [a, b, c] = keys as [
      Awaited<ReturnType<typeof work>>,
      Awaited<ReturnType<typeof work>>,
      Awaited<ReturnType<typeof work>>,
    ];
    const pidA = echo((await pool.run(a.spec, { prepare: a.prepare })).stderr).pid;
    const pidB = echo((await pool.run(b.spec, { prepare: b.prepare })).stderr).pid;
    await pool.run(b.spec, { prepare: b.prepare });
    const pidC = echo((await pool.run(c.spec, { prepare: c.prepare })).stderr).pid;
    assert.ok(await gone(pidA), "a, the least recently used, was stopped");
    assert.ok(running(pidB) && running(pidC));
    assert.deepEqual(
      pool
        .processes()
        .map((p) => p.pid)
        .sort(),
      [pidB, pidC].sort(),
    );
  } finally {
    await pool.close();
  }
});

test("an idle process is stopped after the idle timeout", async () => {
  const pool = newPool({ idleTimeoutMs: 200 });
  try {
    const { spec, prepare } = await work({ requestArgs: ["x"] });
    const { pid } = echo((await pool.run(spec, { prepare })).stderr);
    assert.equal(pool.processes().length, 1);
    assert.ok(await gone(pid));
    for (let i = 0; i < 100 && pool.processes().length > 0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.deepEqual(pool.processes(), []);
  } finally {
    await pool.close();
  }
});

test("a request past its timeout kills the process: DEADLINE_EXCEEDED, not retried", async () => {
  const pool = newPool();
  try {
    const { spec, prepare } = await work({ requestArgs: ["--sleep=30"] });
    const started = Date.now();
    await assert.rejects(pool.run(spec, { prepare, timeoutMs: 300 }), (err: StatusError) => {
      assert.equal(err.code, Code.DEADLINE_EXCEEDED);
      return true;
    });
    assert.ok(Date.now() - started < 5000);
    await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual(pool.processes(), []);
  } finally {
    await pool.close();
  }
});

test("a cancelled request kills its process", async () => {
  const pool = newPool();
  try {
    const { spec, prepare } = await work({ requestArgs: ["--sleep=30"] });
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 200);
    await assert.rejects(pool.run(spec, { prepare, signal: controller.signal }), (err: StatusError) => {
      assert.equal(err.code, Code.CANCELLED);
      return true;
    });
  } finally {
    await pool.close();
  }
});

test("a tool that cannot be started is INVALID_ARGUMENT naming it", async () => {
  const pool = newPool();
  try {
    const { spec, prepare } = await work({ requestArgs: ["x"] });
    spec.launch = { ...spec.launch, argv: ["/nonexistent/tool", "--persistent_worker"] };
    await assert.rejects(pool.run(spec, { prepare }), (err: StatusError) => {
      assert.equal(err.code, Code.INVALID_ARGUMENT);
      assert.match(err.message, /\/nonexistent\/tool/);
      return true;
    });
  } finally {
    await pool.close();
  }
});

test("close() leaves no process behind: busy, idle, and what they started in the background", async () => {
  const pool = newPool();
  const idle = await work({ requestArgs: ["--background"], startupArgs: ["--tool=idle"] });
  const busy = await work({ requestArgs: ["--sleep=30"], startupArgs: ["--tool=busy"] });
  const answer = echo((await pool.run(idle.spec, { prepare: idle.prepare })).stderr);
  const [child] = answer.children;
  assert.ok(child !== undefined && running(child), "the worker left a background process");
  const inFlight = pool.run(busy.spec, { prepare: busy.prepare }).then(
    () => undefined,
    (err: StatusError) => err,
  );
  while (pool.processes().length < 2) await new Promise((r) => setTimeout(r, 10));
  const pids = pool.processes().map((p) => p.pid);
  await pool.close();
  assert.equal((await inFlight)?.code, Code.UNAVAILABLE, "the request in flight fails");
  for (const pid of [...pids, child]) assert.ok(await gone(pid), `process ${pid} still runs`);
  await assert.rejects(
    pool.run(idle.spec, { prepare: idle.prepare }),
    (err: StatusError) => err.code === Code.UNAVAILABLE,
  );
});
