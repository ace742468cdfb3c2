/**
 * A remote persistent worker against the same tool started once per action: the Bazel 6 actions of
 * test/support/persistent-actions.ts, a tool that needs 1 s to start (test/support/persistent_worker.py
 * --startup-delay=1), answered through src/persistent's pool on one side and run as a plain process each
 * time on the other.
 */
import { spawn } from "node:child_process";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { ChildProcessLauncher } from "../src/persistent/child-process-launcher.js";
import { persistentWorkerSpec } from "../src/persistent/persistent-action.js";
import { DEFAULT_WORKER_POOL_LIMITS, PersistentWorkerPool } from "../src/persistent/worker-pool.js";
import { bazelWorkerAction } from "../test/support/persistent-actions.js";
import type { BenchContext } from "./context.js";
import { ratio, type Section, verdictAtLeast } from "./report.js";
import { elapsedMs, fmt, fmtList, median } from "./stats.js";

const REQUESTS = 50;
const STARTUP_SECONDS = 1;
const TARGET = 10;

function action(n: number) {
  return bazelWorkerAction({
    requestArgs: [`--out=bazel-out/k8-fastbuild/bin/pkg/out${n}.txt`, `pkg/src${n}.txt`],
    sources: { [`pkg/src${n}.txt`]: `source ${n}\n` },
    startupArgs: [`--startup-delay=${STARTUP_SECONDS}`],
    name: `out${n}`,
  });
}

/** REQUESTS requests through a fresh pool: the first starts the process, the others find it warm. */
async function throughPool(dir: string, requests: number): Promise<{ totalMs: number; perRequestMs: number[] }> {
  const pool = new PersistentWorkerPool(new ChildProcessLauncher(dir), DEFAULT_WORKER_POOL_LIMITS);
  const perRequestMs: number[] = [];
  const started = process.hrtime.bigint();
  try {
    for (let n = 0; n < requests; n++) {
      const built = await action(n);
      const spec = await persistentWorkerSpec(built.action, built.command, built.inputs);
      if (!spec) throw new Error("not a persistent-worker action");
      const one = process.hrtime.bigint();
      const result = await pool.run(spec, { prepare: built.writeInputRoot });
      if (result.exitCode !== 0) throw new Error(`request ${n} failed: ${result.stderr.toString()}`);
      perRequestMs.push(elapsedMs(one));
    }
    return { totalMs: elapsedMs(started), perRequestMs };
  } finally {
    await pool.close();
  }
}

/** The same actions' Commands run as they are, each in its own laid-out input root. */
async function oncePerAction(dir: string, requests: number): Promise<{ totalMs: number; perRequestMs: number[] }> {
  const perRequestMs: number[] = [];
  const started = process.hrtime.bigint();
  for (let n = 0; n < requests; n++) {
    const built = await action(n);
    const root = await mkdtemp(join(dir, "action-"));
    await built.writeInputRoot(root);
    const [program, ...args] = built.command.arguments;
    const one = process.hrtime.bigint();
    const code = await new Promise<number | null>((resolve, reject) => {
      const child = spawn(program as string, args, {
        cwd: root,
        env: Object.fromEntries(built.command.environmentVariables.map((v) => [v.name, v.value])),
        stdio: ["ignore", "ignore", "ignore"],
      });
      child.once("error", reject);
      child.once("exit", resolve);
    });
    if (code !== 0) throw new Error(`the tool run once exited with ${code}`);
    perRequestMs.push(elapsedMs(one));
    await rm(root, { recursive: true, force: true });
  }
  return { totalMs: elapsedMs(started), perRequestMs };
}

export async function benchPersistentWorker(ctx: BenchContext, requests = REQUESTS): Promise<Section> {
  const dir = join(ctx.scratchDir, "persistent");
  await mkdir(dir, { recursive: true });
  ctx.defer(() => rm(dir, { recursive: true, force: true }));
  const pooled = await throughPool(dir, requests);
  ctx.log(`  persistent worker: ${requests} requests in ${fmt(pooled.totalMs / 1000)} s`);
  const once = await oncePerAction(dir, requests);
  ctx.log(`  tool started per action: ${requests} actions in ${fmt(once.totalMs / 1000)} s`);
  const speedup = once.totalMs / pooled.totalMs;
  const warm = pooled.perRequestMs.slice(1);
  return {
    title: `A persistent worker with a ${STARTUP_SECONDS} s start-up answering ${requests} requests`,
    setup: [
      `${requests} distinct actions built as Bazel 6 builds them with --experimental_remote_mark_tool_inputs ` +
        "(test/support/persistent-actions.ts): `/usr/bin/python3 bazel-out/k8-opt-exec/bin/tools/persistent_worker.py " +
        `--protocol=proto --startup-delay=${STARTUP_SECONDS} @bazel-out/k8-fastbuild/bin/pkg/outN-0.params\`, the ` +
        "tool marked bazel_tool_input, persistentWorkerKey on the platform. The tool (test/support/persistent_worker.py) " +
        `sleeps until ${STARTUP_SECONDS} s after it started, then answers.`,
      "Berth: each action's spec is read (src/persistent/persistent-action.ts: flagfile expanded, every input with its " +
        "digest) and sent through a fresh PersistentWorkerPool (src/persistent/worker-pool.ts) with the host launcher " +
        "(ChildProcessLauncher: no sandbox yet; the worker's action path will start the process in its runner), its " +
        "input root written into the process's directory first; the first request starts the process, the others " +
        "reuse it. Timed from the first spec to the last response.",
      "Reference: the same Commands run as plain processes (the tool without --persistent_worker reads its @flagfile " +
        "itself), one after another, each in a freshly written input root; input roots written outside the timing " +
        "of each process but inside the total.",
      "The pool is not yet on the Execute path: this measures the worker-process side only, not a round trip.",
    ],
    rows: [
      {
        metric: `${requests} requests, total`,
        berth: `${fmt(pooled.totalMs / 1000)} s`,
        reference: `${fmt(once.totalMs / 1000)} s`,
        ratio: `${ratio(pooled.totalMs, once.totalMs)} (${fmt(speedup, 1)}× faster)`,
        target: `≥ ${TARGET}× faster`,
        verdict: verdictAtLeast(speedup, TARGET),
      },
      {
        metric: "one request, median (warm process vs tool started)",
        berth: `${fmt(median(warm))} ms`,
        reference: `${fmt(median(once.perRequestMs))} ms`,
        ratio: `${fmt(median(once.perRequestMs) / median(warm), 0)}× faster`,
        target: "—",
        verdict: "—",
      },
    ],
    notes: [
      `Berth, per request (ms): ${fmtList(pooled.perRequestMs, 1)}.`,
      `Reference, per action (ms): ${fmtList(once.perRequestMs, 0)}.`,
    ],
  };
}
