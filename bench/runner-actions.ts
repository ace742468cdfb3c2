/**
 * Issue #14's runners through the whole farm: the Execute round trip of /bin/true in a fresh sandbox, in a
 * sandbox made ahead and in a warm runner; a test-like action whose server needs 1 s to come up, fresh and
 * recycled; and Bazel 6 persistent-worker actions against the same tool started once per action. Two
 * `berth serve --workers 1` of their own, one with worker.sandboxesAhead on (the other is the fresh side).
 */
import { createHash, randomBytes } from "node:crypto";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { Action } from "../src/gen/build/bazel/remote/execution/v2/remote_execution.js";
import { IDLE_BEFORE_MAKING_MS } from "../src/runner/ahead-runner.js";
import { type ActionSpec, execute, uploadAction, uploadBlobs } from "../test/support/actions.js";
import type { Clients } from "../test/support/farm.js";
import { bazelWorkerAction } from "../test/support/persistent-actions.js";
import type { BenchContext } from "./context.js";
import { INPUT_FILES } from "./execution.js";
import { ratio, type Section, verdictAtLeast, verdictAtMost } from "./report.js";
import { startBenchServer } from "./server.js";
import { elapsedMs, fmt, fmtList, median, percentile } from "./stats.js";

const RUNS = 100;
const WARMUP = 10;
const AHEAD_TARGET = 0.6;
/**
 * Between two Executes of the idle-arrival measurement: longer than what a worker does in the background
 * after an action with sandboxes made ahead (IDLE_BEFORE_MAKING_MS, then the next sandbox's start), so that
 * each action arrives at an idle worker; the kernel's teardown of a fresh sandbox is over by then too.
 */
const IDLE_GAP_MS = 60;
/** Back to back: this many Executes of one kind one right after the other, fresh and made-ahead blocks taking turns. */
const BLOCK = 10;
const SERVER_RUNS = 6;
const SERVER_TARGET = 0.1;
const PERSISTENT_REQUESTS = 50;
const ONE_SHOT_RUNS = 8;
const PERSISTENT_TARGET = 10;

/** A server that needs 1 s to come up, then counts the connections it answered (a test's database, say). */
const SERVER_TEST = [
  "if ! test -s /tmp/server.pid; then",
  "python3 -c '",
  "import socket, os, time",
  'open("/tmp/server.pid", "w").write(str(os.getpid()))',
  "time.sleep(1)",
  "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)",
  's.bind(("127.0.0.1", 7777)); s.listen()',
  "while True:",
  '    c, _ = s.accept(); c.sendall(b"pong"); c.close()',
  "' >/dev/null 2>&1 &",
  "fi",
  "python3 -c '",
  "import socket, time",
  "while True:",
  "    try:",
  '        c = socket.create_connection(("127.0.0.1", 7777)); print(c.recv(8).decode()); break',
  "    except OSError:",
  "        time.sleep(0.01)",
  "'",
].join("\n");

async function timedExecute(clients: Clients, digest: { hash: string; sizeBytes: number }, what: string) {
  return (await executeWithMetadata(clients, digest, what)).took;
}

type Stamp = { seconds: number; nanos: number } | undefined;
const stampMs = (t: Stamp) => (t ? Number(t.seconds) * 1000 + t.nanos / 1e6 : Number.NaN);

/** The round trip at the client, and what the worker says of it (ExecutedActionMetadata, in whole ms). */
async function executeWithMetadata(clients: Clients, digest: { hash: string; sizeBytes: number }, what: string) {
  const start = process.hrtime.bigint();
  const { response } = await execute(clients, digest, { skipCacheLookup: true });
  const took = elapsedMs(start);
  if ((response.status?.code ?? 0) !== 0) throw new Error(`${what}: ${response.status?.message}`);
  if (response.result?.exitCode !== 0) throw new Error(`${what} exited with ${response.result?.exitCode}`);
  const m = response.result?.executionMetadata;
  return {
    took,
    /** From the worker's receipt of the assignment to its completion. */
    worker: stampMs(m?.workerCompletedTimestamp) - stampMs(m?.workerStartTimestamp),
    /** The runner's run: the command in its sandbox (a fresh one's making and end included). */
    run: stampMs(m?.executionCompletedTimestamp) - stampMs(m?.executionStartTimestamp),
  };
}

export async function benchRunnerActions(ctx: BenchContext): Promise<Section[]> {
  const start = async (name: string, extraConfig: string) => {
    const dir = join(ctx.scratchDir, name);
    await mkdir(dir, { recursive: true });
    const server = await startBenchServer({ workDir: dir, casMaxSizeBytes: "4GiB", workers: 1, extraConfig });
    ctx.defer(() => server.stop());
    return server;
  };
  const freshServer = await start("runners-fresh", "");
  const server = await start("runners-ahead", "worker:\n  sandboxesAhead: true\n");
  const salt = randomBytes(8).toString("hex");
  const trueSpec: ActionSpec = { args: ["/bin/true"], files: INPUT_FILES, salt };
  const recycle = [
    { name: "recycle-runner", value: "true" },
    { name: "runner-recycling-key", value: salt },
  ];
  const fresh = await uploadAction(freshServer.clients, trueSpec);
  const ahead = await uploadAction(server.clients, trueSpec);
  const warm = await uploadAction(server.clients, { ...trueSpec, platform: recycle });
  const kinds = {
    fresh: () => executeWithMetadata(freshServer.clients, fresh, "/bin/true, fresh"),
    ahead: () => executeWithMetadata(server.clients, ahead, "/bin/true, made ahead"),
    warm: () => executeWithMetadata(server.clients, warm, "/bin/true, warm"),
  };
  const KINDS = ["fresh", "ahead", "warm"] as const;
  for (let i = 0; i < WARMUP; i++) {
    for (const kind of KINDS) {
      await kinds[kind]();
      await sleep(IDLE_GAP_MS);
    }
  }
  // Idle arrival: the kinds interleaved run by run, each Execute after IDLE_GAP_MS of quiet.
  const times = { fresh: [] as number[], ahead: [] as number[], warm: [] as number[] };
  const workerMs = { fresh: [] as number[], ahead: [] as number[], warm: [] as number[] };
  const runMs = { fresh: [] as number[], ahead: [] as number[], warm: [] as number[] };
  const perRound = Math.ceil(RUNS / ctx.rounds);
  const roundP50s = { fresh: [] as number[], ahead: [] as number[], warm: [] as number[] };
  const roundRatios: number[] = [];
  for (let round = 0; round < ctx.rounds; round++) {
    const from = { fresh: times.fresh.length, ahead: times.ahead.length, warm: times.warm.length };
    for (let i = 0; i < perRound; i++) {
      for (const kind of KINDS) {
        const measured = await kinds[kind]();
        times[kind].push(measured.took);
        workerMs[kind].push(measured.worker);
        runMs[kind].push(measured.run);
        await sleep(IDLE_GAP_MS);
      }
    }
    for (const kind of KINDS) roundP50s[kind].push(median(times[kind].slice(from[kind])));
    roundRatios.push((roundP50s.ahead.at(-1) ?? 0) / (roundP50s.fresh.at(-1) ?? 1));
  }
  const p50 = { fresh: median(times.fresh), ahead: median(times.ahead), warm: median(times.warm) };
  ctx.log(
    `  Execute /bin/true p50, idle arrival: fresh ${fmt(p50.fresh)} ms, made ahead ${fmt(p50.ahead)} ms, warm ` +
      `${fmt(p50.warm)} ms`,
  );

  // Back to back: blocks of one kind, each Execute sent as soon as the last has answered.
  const b2b = { fresh: [] as number[], ahead: [] as number[] };
  for (let round = 0; round < ctx.rounds; round++) {
    for (const kind of ["fresh", "ahead"] as const) {
      for (let i = 0; i < BLOCK; i++) b2b[kind].push((await kinds[kind]()).took);
      await sleep(IDLE_GAP_MS);
    }
  }
  const b2bP50 = { fresh: median(b2b.fresh), ahead: median(b2b.ahead) };
  ctx.log(`  Execute /bin/true p50, back to back: fresh ${fmt(b2bP50.fresh)} ms, made ahead ${fmt(b2bP50.ahead)} ms`);

  // The test-like action: fresh every time, or recycled (the server left by the first answers the next).
  const serverFresh = await uploadAction(server.clients, { args: ["sh", "-c", SERVER_TEST], salt: `${salt}-s` });
  const serverRecycled = await uploadAction(server.clients, {
    args: ["sh", "-c", SERVER_TEST],
    salt: `${salt}-s`,
    platform: [
      { name: "recycle-runner", value: "true" },
      { name: "runner-recycling-key", value: `${salt}-server` },
    ],
  });
  const firstRecycled = await timedExecute(server.clients, serverRecycled, "the test-like action, recycled");
  const serverTimes = { fresh: [] as number[], recycled: [] as number[] };
  for (let i = 0; i < SERVER_RUNS; i++) {
    serverTimes.fresh.push(await timedExecute(server.clients, serverFresh, "the test-like action, fresh"));
    serverTimes.recycled.push(await timedExecute(server.clients, serverRecycled, "the test-like action, recycled"));
  }
  const serverP50 = { fresh: median(serverTimes.fresh), recycled: median(serverTimes.recycled) };
  ctx.log(`  test-like action p50: fresh ${fmt(serverP50.fresh)} ms, recycled ${fmt(serverP50.recycled)} ms`);

  // Bazel 6 persistent-worker actions, the tool needing 1 s to start, against the same Command run as a plain
  // process (its persistentWorkerKey left out: then every action starts the tool).
  const persistent = await persistentTimes(server.clients, salt);
  ctx.log(
    `  persistent worker: ${PERSISTENT_REQUESTS} actions in ${fmt(persistent.totalMs / 1000, 2)} s; one-shot ` +
      `p50 ${fmt(persistent.oneShotP50)} ms per action`,
  );
  const perRequest = persistent.totalMs / PERSISTENT_REQUESTS;
  const persistentRatio = persistent.oneShotP50 / perRequest;

  const p90 = (values: number[]) => fmt(percentile(values, 90));
  return [
    {
      title: "Runners through Execute: /bin/true fresh, in a sandbox made ahead, and in a warm runner",
      setup: [
        "Two `berth serve --workers 1` of their own: one as configured by default, where every action gets a " +
          "fresh bubblewrap sandbox (a); one with `worker.sandboxesAhead: true`, where each slot keeps a " +
          "resident sandbox started for its next action (b), and where an action with `recycle-runner=true` " +
          "runs in a warm runner kept from the previous one with the same key (c; warm runners need no setting).",
        "The action of the Execute round-trip benchmark (`/bin/true`, ten small input files), each Execute with " +
          "skip_cache_lookup, timed at the client until the COMPLETED operation has arrived and checked " +
          "(status OK, exit code 0).",
        `Idle arrival (the target's row): ${RUNS} runs of each after ${WARMUP} of warm-up, interleaved run by ` +
          `run in ${ctx.rounds} rounds, each Execute sent ${IDLE_GAP_MS} ms after the last answer, the same ` +
          "pause for every kind, so that it arrives at an idle worker: with sandboxes made ahead, a slot makes " +
          `its next sandbox once it has had no action for ${IDLE_BEFORE_MAKING_MS} ms, which then takes 15 to ` +
          '30 ms here. This is the case of issue #14\'s "a fresh action should not wait for its sandbox".',
        `Back to back: blocks of ${BLOCK} Executes of one kind, each sent as soon as the last has answered, ` +
          `fresh and made-ahead blocks taking turns, ${ctx.rounds} of each. The made-ahead slot is then never ` +
          `idle for ${IDLE_BEFORE_MAKING_MS} ms, so its actions run in fresh sandboxes, but the first of a ` +
          "block and any that arrives while a sandbox is being started, which waits for it; a used sandbox " +
          "still ends in the background.",
        "The floor of issue #14, `/bin/true` forked by a process already inside a sandbox, is measured without " +
          "a server in the `runners` benchmark (the sandbox library alone); an Execute adds the farm's own " +
          "round trip (gRPC, scheduling, the input layout, the result's upload and caching) to every kind.",
      ],
      rows: [
        {
          metric: "Made ahead (b) vs fresh (a), Execute p50, idle arrival",
          berth: `${fmt(p50.ahead)} ms`,
          reference: `${fmt(p50.fresh)} ms (fresh)`,
          ratio: ratio(p50.ahead, p50.fresh),
          target: `≤ ${AHEAD_TARGET}× fresh`,
          verdict: verdictAtMost(p50.ahead / p50.fresh, AHEAD_TARGET),
        },
        {
          metric: "Warm runner (c) vs fresh (a), Execute p50, idle arrival",
          berth: `${fmt(p50.warm)} ms`,
          reference: `${fmt(p50.fresh)} ms (fresh)`,
          ratio: ratio(p50.warm, p50.fresh),
          target: "none set here (see the runners benchmark for the floor)",
          verdict: "—",
        },
        {
          metric: "Made ahead (b) vs fresh (a), Execute p50, back to back",
          berth: `${fmt(b2bP50.ahead)} ms`,
          reference: `${fmt(b2bP50.fresh)} ms (fresh)`,
          ratio: ratio(b2bP50.ahead, b2bP50.fresh),
          target: "reported (the target is for idle arrival)",
          verdict: "—",
        },
      ],
      notes: [
        `Idle arrival, p90: fresh ${p90(times.fresh)} ms, made ahead ${p90(times.ahead)} ms, warm ${p90(times.warm)} ms.`,
        `Idle arrival, per round p50, ms: fresh ${fmtList(roundP50s.fresh)}; made ahead ${fmtList(roundP50s.ahead)}; ` +
          `warm ${fmtList(roundP50s.warm)}; made ahead / fresh per round ${fmtList(roundRatios, 2)}.`,
        "Where the time goes (idle arrival, p50 from each result's ExecutedActionMetadata, whole milliseconds): " +
          KINDS.map(
            (kind) =>
              `${{ fresh: "fresh", ahead: "made ahead", warm: "warm" }[kind]}: the runner's run ` +
              `${fmt(median(runMs[kind]), 0)} ms, the worker's whole part ${fmt(median(workerMs[kind]), 0)} ms, ` +
              `the rest (gRPC, scheduling, the server's checks and cache write, the worker protocol) ` +
              `${fmt(median(times[kind].map((t, i) => t - (workerMs[kind][i] ?? 0))))} ms`,
          ).join("; ") +
          ".",
        `Back to back, p90: fresh ${p90(b2b.fresh)} ms, made ahead ${p90(b2b.ahead)} ms.`,
      ],
    },
    {
      title: "A test-like action whose server needs 1 s to come up: fresh vs recycled",
      setup: [
        "An action that starts a Python TCP server in the background unless one runs already (it sleeps 1 s " +
          "before it listens on the sandbox's own loopback), then connects until the server answers. Fresh: a " +
          "new sandbox each time, so each run waits for a new server. Recycled: `recycle-runner=true`, so the " +
          "server left by the first run answers the next ones at once.",
        `${SERVER_RUNS} runs of each, alternating, after one recycled run that starts the server ` +
          `(${fmt(firstRecycled)} ms); Execute round trips timed at the client.`,
      ],
      rows: [
        {
          metric: "Test-like action, p50",
          berth: `${fmt(serverP50.recycled)} ms (recycled)`,
          reference: `${fmt(serverP50.fresh)} ms (fresh)`,
          ratio: ratio(serverP50.recycled, serverP50.fresh),
          target: `≤ ${SERVER_TARGET}× fresh`,
          verdict: verdictAtMost(serverP50.recycled / serverP50.fresh, SERVER_TARGET),
        },
      ],
      notes: [`ms: fresh ${fmtList(serverTimes.fresh, 0)}; recycled ${fmtList(serverTimes.recycled, 0)}.`],
    },
    {
      title: "Remote persistent workers through Execute: a tool with a 1 s start-up, 50 actions",
      setup: [
        "Bazel 6 persistent-worker actions as test/support/persistent-actions.ts builds them (flagfile, tool " +
          "inputs marked bazel_tool_input, persistentWorkerKey), the tool test/support/persistent_worker.py " +
          `with --startup-delay=1, each action a distinct request; ${PERSISTENT_REQUESTS} of them executed one ` +
          "after the other: the first starts the worker process (in its own sandbox), the others are " +
          "WorkRequests to it.",
        `Reference: the same actions without persistentWorkerKey, ${ONE_SHOT_RUNS} of them: each runs the ` +
          "tool as a plain process (it reads its flagfile itself), paying its start-up every time. The ratio " +
          "is the one-shot action's p50 over the persistent actions' mean (total / count).",
      ],
      rows: [
        {
          metric: "Per action",
          berth: `${fmt(perRequest)} ms (persistent, ${PERSISTENT_REQUESTS} in ${fmt(persistent.totalMs / 1000, 2)} s)`,
          reference: `${fmt(persistent.oneShotP50)} ms (tool started per action, p50)`,
          ratio: `${fmt(persistentRatio, 1)}× faster`,
          target: `≥ ${PERSISTENT_TARGET}× faster`,
          verdict: verdictAtLeast(persistentRatio, PERSISTENT_TARGET),
        },
      ],
      notes: [`One-shot ms: ${fmtList(persistent.oneShot, 0)}.`],
    },
  ];
}

async function persistentTimes(clients: Clients, salt: string) {
  const digestOf = (action: Action) => {
    const encoded = Buffer.from(Action.encode(action).finish());
    return { hash: createHash("sha256").update(encoded).digest("hex"), sizeBytes: encoded.byteLength };
  };
  const make = async (n: number, persistent: boolean) => {
    const built = await bazelWorkerAction({
      requestArgs: [`--try-write=bazel-out/k8-fastbuild/bin/pkg/${salt}-${n}.txt`],
      sources: { [`pkg/src-${n}.txt`]: `source ${n}\n` },
      startupArgs: ["--startup-delay=1"],
      name: `${salt}-${n}`,
      workerKey: persistent ? undefined : "",
    });
    await uploadBlobs(clients, [...built.blobs.values()]);
    return digestOf(built.action);
  };
  const persistentActions = [];
  for (let n = 0; n < PERSISTENT_REQUESTS; n++) persistentActions.push(await make(n, true));
  const oneShotActions = [];
  for (let n = 0; n < ONE_SHOT_RUNS; n++) oneShotActions.push(await make(PERSISTENT_REQUESTS + n, false));
  const start = process.hrtime.bigint();
  for (const digest of persistentActions) await timedExecute(clients, digest, "a persistent-worker action");
  const totalMs = elapsedMs(start);
  const oneShot: number[] = [];
  for (const digest of oneShotActions) oneShot.push(await timedExecute(clients, digest, "a one-shot tool action"));
  return { totalMs, oneShot, oneShotP50: median(oneShot) };
}
