import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { chmod, chown, mkdir, open, stat, writeFile } from "node:fs/promises";
import { cpus } from "node:os";
import { dirname, join } from "node:path";
import type { Readable } from "node:stream";
import type {
  ExecutedActionMetadata,
  ExecuteResponse,
} from "../src/gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Timestamp } from "../src/gen/google/protobuf/timestamp.js";
import { BubblewrapSandbox, INPUT_ROOT_MOUNT } from "../src/sandbox/bubblewrap.js";
import type { SandboxRequest } from "../src/sandbox/sandbox.js";
import { type ActionSpec, execute, uploadAction } from "../test/support/actions.js";
import type { WireDigest } from "../test/support/blobs.js";
import type { BenchContext } from "./context.js";
import { machineCpuSeconds } from "./machine.js";
import { ratio, type Section, verdictAtLeast, verdictAtMost } from "./report.js";
import { measureCpu } from "./server.js";
import { elapsedMs, fmt, fmtList, median, percentile } from "./stats.js";

/** The user Berth's workers run actions as when they run as root, and the sandbox's default. */
export const NOBODY = 65534;
const PATH = { name: "PATH", value: "/usr/bin:/bin" };

const LATENCY_RUNS = 200;
const LATENCY_WARMUP = 20;
/** Berth's p50 may exceed the sandbox's own p50 by this much. */
const LATENCY_TARGET_MS = 10;

const THROUGHPUT_ACTIONS = 1000;
const THROUGHPUT_IN_FLIGHT = 32;
const THROUGHPUT_WORKERS = 2;
const THROUGHPUT_TARGET = 100;
const THROUGHPUT_MAX_ROUNDS = 3;
const UPLOAD_IN_FLIGHT = 16;

/**
 * The inputs of every benchmarked action: ten small source files in three directories, as a small compile
 * might have. They are the same for every action, so after the first one they sit in the worker's file cache
 * and each action only lays out its input root (directories and hard links).
 */
export const INPUT_FILES: Record<string, string> = Object.fromEntries(
  [
    "BUILD",
    "src/main.c",
    "src/util.c",
    "src/util.h",
    "src/io.c",
    "src/io.h",
    "include/config.h",
    "include/version.h",
    "include/types.h",
    "include/macros.h",
  ].map((path, i) => [path, `/* ${path} */\n${"int x;\n".repeat(20 + i * 7)}`]),
);

/**
 * Every directory above `dir` must let uid 65534 through, or Berth's sandbox switches to its slower
 * `unshare … setpriv` path (see BubblewrapSandbox); the same test as the sandbox's own, so that the benchmark
 * fails rather than measure the other path.
 */
export async function assertReachableByNobody(dir: string): Promise<void> {
  for (let d = dir; ; d = dirname(d)) {
    const info = await stat(d);
    const searchable =
      (info.uid === NOBODY && (info.mode & 0o100) !== 0) ||
      (info.gid === NOBODY && (info.mode & 0o010) !== 0) ||
      (info.mode & 0o001) !== 0;
    if (!searchable) {
      throw new Error(`${d} is closed to uid ${NOBODY}: the sandbox would take its unshare … setpriv path`);
    }
    if (d === dirname(d)) return;
  }
}

/** An input root laid out as a worker lays it out: directories owned by 65534, files root's and read-only. */
async function prepareInputRoot(root: string): Promise<void> {
  await mkdir(root, { recursive: true });
  await chown(root, NOBODY, NOBODY);
  for (const [path, content] of Object.entries(INPUT_FILES)) {
    const file = join(root, path);
    for (let dir = dirname(file); dir.length > root.length; dir = dirname(dir)) {
      if ((await mkdir(dir, { recursive: true })) !== undefined) await chown(dir, NOBODY, NOBODY);
    }
    await writeFile(file, content, { mode: 0o444 });
  }
}

/**
 * bwrap's command line as src/sandbox/bubblewrap.ts builds it (bwrapArgs, not exported) for an action whose
 * input root is reachable directly, without network and with the input root as working directory. Keep the
 * two in step.
 */
function bwrapArgs(root: string, argv: string[]): string[] {
  return [
    "--unshare-user",
    "--unshare-pid",
    "--unshare-ipc",
    "--unshare-uts",
    "--unshare-cgroup-try",
    "--unshare-net",
    "--die-with-parent",
    "--json-status-fd",
    "3",
    "--ro-bind",
    "/",
    "/",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "--perms",
    "1777",
    "--tmpfs",
    "/tmp",
    "--tmpfs",
    "/run",
    "--bind",
    root,
    INPUT_ROOT_MOUNT,
    "--chdir",
    INPUT_ROOT_MOUNT,
    "--clearenv",
    "--setenv",
    PATH.name,
    PATH.value,
    "--",
    ...argv,
  ];
}

/** A directory with a prepared input root, where the references run their sandboxes. */
interface SandboxSlot {
  root: string;
  stdoutPath: string;
  stderrPath: string;
}

async function prepareSlot(dir: string): Promise<SandboxSlot> {
  const root = join(dir, "root");
  await prepareInputRoot(root);
  return { root, stdoutPath: join(dir, "stdout"), stderrPath: join(dir, "stderr") };
}

function sandboxRequest(slot: SandboxSlot, argv: string[]): SandboxRequest {
  return {
    inputRoot: slot.root,
    workingDirectory: "",
    argv,
    env: [PATH],
    timeoutMs: 60_000,
    stdoutPath: slot.stdoutPath,
    stderrPath: slot.stderrPath,
  };
}

/**
 * The raw floor: bwrap spawned from Node as uid 65534 with the same command line and stdio as the sandbox
 * uses, awaited until it closes; none of BubblewrapSandbox's checks, file opening or waiting for the sandbox's
 * pid 1 to die. `out` is a file descriptor open for writing, used for stdout and stderr.
 */
async function rawBwrap(root: string, argv: string[], out: number): Promise<number> {
  const child = spawn("bwrap", bwrapArgs(root, argv), {
    stdio: ["ignore", out, out, "pipe"],
    uid: NOBODY,
    gid: NOBODY,
    detached: true,
    cwd: "/",
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
  });
  (child.stdio[3] as Readable | null)?.resume();
  return new Promise((resolve, reject) => {
    child.once("error", reject);
    child.once("close", (code) => resolve(code ?? -1));
  });
}

async function timed<T>(work: () => Promise<T>): Promise<[T, number]> {
  const start = process.hrtime.bigint();
  const result = await work();
  return [result, elapsedMs(start)];
}

/** Runs `work(i)` for i in [0, count) with at most `limit` running at once. */
async function pool(count: number, limit: number, work: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  const lanes = Array.from({ length: Math.min(limit, count) }, async () => {
    while (next < count) await work(next++);
  });
  await Promise.all(lanes);
}

function checkCompleted(response: ExecuteResponse, what: string, stdout?: WireDigest): void {
  const code = response.status?.code ?? 0;
  if (code !== 0) throw new Error(`${what} failed: ${code} ${response.status?.message}`);
  if (response.result?.exitCode !== 0) throw new Error(`${what} exited with ${response.result?.exitCode}`);
  if (response.cachedResult) throw new Error(`${what} came from the action cache`);
  if (stdout !== undefined && response.result.stdoutDigest?.hash !== stdout.hash) {
    throw new Error(`${what} printed something else than expected`);
  }
}

function ms(timestamp: Timestamp | undefined): number {
  return timestamp === undefined ? Number.NaN : timestamp.seconds * 1000 + timestamp.nanos / 1e6;
}

const LATENCY_WHERE =
  "What Berth adds to the sandbox, from the phases above and the code: before queueing, the Execute handler " +
  "reads the Action and the Command from the CAS on disk and checks that the input root is stored " +
  "(src/execution/executor.ts prepare). Before the sandbox starts, the worker fetches the input tree's Directory " +
  "messages from its own server over loopback gRPC, one BatchReadBlobs per tree level (two here; " +
  "src/worker/input-root.ts fetchDirectories, again for every action although a Directory never changes), " +
  "creates and chowns each directory one after the other and hard-links the ten files; BubblewrapSandbox.run " +
  "then opens stdout and stderr and, because its #reachable cache is keyed by the input root's parent, which is " +
  "a new actions/LEASE directory for every action, stats the seven directories up to / again every time (its " +
  "Map also grows by one entry per action). After the sandbox, the worker hashes stdout and stderr, the " +
  "completion travels back on the worker stream and Executor.finish writes the action cache entry (open, write, " +
  "close, rename in src/store/lru-directory.ts) before the operation completes and the client gets its reply.";

const THROUGHPUT_WHERE =
  "Where the time goes (a server CPU profile of this benchmark, `--only execute-throughput --server-cpu-prof " +
  "DIR`, over the timed part, at about 60 actions/s): `berth serve` runs the gRPC services, the scheduler and " +
  "both local workers with their gRPC clients on one Node.js thread, and that thread was about 78 % busy, " +
  "some 13 ms per action, so the workers wait for it (they were busy only 75–82 % of the time with 32 actions " +
  "queued, and their input-root and output phases take twice as long as in the sequential benchmark). " +
  "Per action: garbage collection about 2.2 ms; child_process.spawn of bwrap (src/sandbox/bubblewrap.ts " +
  "#execute) about 1.7 ms, because spawn forks the whole server process synchronously on that thread; grpc-js " +
  "and HTTP/2 about 1.7 ms besides the handlers, for the loopback calls each action makes to its own server " +
  "(the Execute stream, the assignment and completion on the worker stream, two BatchReadBlobs for the input " +
  "tree, then FindMissingBlobs and BatchUpdateBlobs to store a 2-byte stdout in src/worker/remote-cas.ts " +
  "upload); the file system calls of laying out and removing the action directory (mkdir, chown, link, then " +
  "`rm -r`, which Node runs as JavaScript) and of the stores (temporary file, rename) about 2 ms; " +
  "BubblewrapSandbox's #reachable walk (see the latency benchmark) 0.2 ms. The sandbox itself is not the " +
  "limit: inside Berth it takes as long as in the reference, which does 2–3× the throughput on the same cores.";

/** Where one execution's time went, in ms, from the client's clock and the worker's ExecutedActionMetadata. */
interface Phases {
  /** Execute sent → queued: the server reads the action and command and checks the input root. */
  accept: number;
  /** Queued → the worker starts: scheduling and the assignment's trip to the worker. */
  dispatch: number;
  /** Worker start → sandbox start: the input root laid out (input fetch) and the sandbox's own preparation. */
  inputs: number;
  /** BubblewrapSandbox.run as the worker saw it. */
  sandbox: number;
  /** Sandbox end → worker done: outputs collected, stdout and stderr hashed and uploaded. */
  outputs: number;
  /** Worker done → the client has COMPLETED: completion message, action cache write, the operation's last update. */
  reply: number;
}

const PHASE_NAMES: Record<keyof Phases, string> = {
  accept: "Execute received → queued",
  dispatch: "queued → worker starts",
  inputs: "worker starts → sandbox starts (input root laid out)",
  sandbox: "sandbox (as the worker timed it)",
  outputs: "sandbox ends → worker done (outputs, stdout/stderr uploaded)",
  reply: "worker done → COMPLETED at the client (AC write, reply)",
};

function phasesOf(sent: number, received: number, metadata: ExecutedActionMetadata | undefined): Phases {
  const m = metadata;
  return {
    accept: ms(m?.queuedTimestamp) - sent,
    dispatch: ms(m?.workerStartTimestamp) - ms(m?.queuedTimestamp),
    inputs: ms(m?.executionStartTimestamp) - ms(m?.workerStartTimestamp),
    sandbox: ms(m?.executionCompletedTimestamp) - ms(m?.executionStartTimestamp),
    outputs: ms(m?.workerCompletedTimestamp) - ms(m?.executionCompletedTimestamp),
    reply: received - ms(m?.workerCompletedTimestamp),
  };
}

function describePhases(all: Phases[]): string {
  return (Object.keys(PHASE_NAMES) as (keyof Phases)[])
    .map((key) => `${PHASE_NAMES[key]} ${fmt(median(all.map((p) => p[key])))}`)
    .join("; ");
}

export async function benchExecuteLatency(ctx: BenchContext): Promise<Section> {
  const { clients } = ctx;
  const spec: ActionSpec = { args: ["/bin/true"], files: INPUT_FILES, salt: randomBytes(8).toString("hex") };
  const digest = await uploadAction(clients, spec);
  const refDir = join(ctx.scratchDir, "execute-latency");
  await mkdir(refDir);
  await assertReachableByNobody(refDir);
  const slot = await prepareSlot(refDir);
  const sandbox = new BubblewrapSandbox();
  const rawOut = await open(join(refDir, "raw-out"), "w");
  ctx.defer(() => rawOut.close());

  const berthRun = async () => {
    const sent = Date.now();
    const [{ response }, took] = await timed(() => execute(clients, digest, { skipCacheLookup: true }));
    checkCompleted(response, "the /bin/true action");
    return { took, phases: phasesOf(sent, Date.now(), response.result?.executionMetadata) };
  };
  const sandboxRun = async () => {
    const [result, took] = await timed(() => sandbox.run(sandboxRequest(slot, ["/bin/true"])));
    if (result.exitCode !== 0) throw new Error(`/bin/true in BubblewrapSandbox exited with ${result.exitCode}`);
    return took;
  };
  const rawRun = async () => {
    const [code, took] = await timed(() => rawBwrap(slot.root, ["/bin/true"], rawOut.fd));
    if (code !== 0) throw new Error(`/bin/true in bwrap exited with ${code}`);
    return took;
  };

  for (let i = 0; i < LATENCY_WARMUP; i++) {
    await berthRun();
    await sandboxRun();
    await rawRun();
  }
  const berth: number[] = [];
  const phases: Phases[] = [];
  const floor: number[] = [];
  const raw: number[] = [];
  const perBlock = Math.ceil(LATENCY_RUNS / ctx.rounds);
  const blockP50s: { berth: number[]; floor: number[] } = { berth: [], floor: [] };
  const [, cpu] = await measureCpu(ctx.serverPid, async () => {
    for (let i = 0; i < LATENCY_RUNS; i++) {
      const run = await berthRun();
      berth.push(run.took);
      phases.push(run.phases);
      floor.push(await sandboxRun());
      raw.push(await rawRun());
      if ((i + 1) % perBlock === 0 || i === LATENCY_RUNS - 1) {
        const from = blockP50s.berth.length * perBlock;
        blockP50s.berth.push(median(berth.slice(from)));
        blockP50s.floor.push(median(floor.slice(from)));
      }
    }
  });
  const [p50, p99] = [median(berth), percentile(berth, 99)];
  const [floorP50, floorP99] = [median(floor), percentile(floor, 99)];
  const [rawP50, rawP99] = [median(raw), percentile(raw, 99)];
  ctx.log(
    `  Execute p50 ${fmt(p50)} ms, p99 ${fmt(p99)} ms; BubblewrapSandbox.run p50 ${fmt(floorP50)} ms; ` +
      `bwrap p50 ${fmt(rawP50)} ms`,
  );
  const overhead = p50 - floorP50;
  return {
    title: "Execute round trip of a /bin/true action with cached inputs",
    setup: [
      "One action: `/bin/true` with PATH=/usr/bin:/bin and ten small input files in three directories " +
        "(5 KiB in all), uploaded once. Each Execute sets skip_cache_lookup, so the action really runs every " +
        "time; its inputs are in the worker's file cache after the first run, so each run lays out the input " +
        "root (directories, hard links), runs the sandbox, uploads nothing but checks stdout/stderr, and writes " +
        "the action cache.",
      `berth serve with --workers ${THROUGHPUT_WORKERS}, as a separate process. ${LATENCY_RUNS} sequential ` +
        `Executes after ${LATENCY_WARMUP} warm-up runs, timed at the client from the call until the stream's ` +
        "COMPLETED operation has arrived; each response is checked (status OK, exit code 0, not from the cache).",
      "Reference (the floor): `new BubblewrapSandbox().run(…)` of src/sandbox/bubblewrap.ts, called in the " +
        "benchmark's process on an input root with the same files laid out as a worker lays them out " +
        "(directories owned by 65534, files root's and read-only): exactly the code the worker runs, from " +
        "checking the request to the sandbox's pid 1 having died. Also, for information, a raw " +
        "`spawn('bwrap', …)` as uid 65534 with the same command line, awaited until it exits. Berth, the sandbox " +
        "and raw bwrap alternate run by run.",
      "The temporary directory holding Berth's data directory is made traversable (chmod 0755), so the " +
        "sandbox binds the input root directly and the `unshare … setpriv` path for input roots behind closed " +
        "directories is not what is measured; the benchmark checks this before it starts.",
    ],
    rows: [
      {
        metric: "Latency p50",
        berth: `${fmt(p50)} ms`,
        reference: `${fmt(floorP50)} ms (BubblewrapSandbox.run)`,
        ratio: `${ratio(p50, floorP50)} (+${fmt(overhead)} ms)`,
        target: `≤ floor + ${LATENCY_TARGET_MS} ms`,
        verdict: verdictAtMost(overhead, LATENCY_TARGET_MS),
      },
      {
        metric: "Latency p99",
        berth: `${fmt(p99)} ms`,
        reference: `${fmt(floorP99)} ms (BubblewrapSandbox.run)`,
        ratio: ratio(p99, floorP99),
        target: "none set",
        verdict: "—",
      },
      {
        metric: "Latency p50 vs raw bwrap",
        berth: `${fmt(p50)} ms`,
        reference: `${fmt(rawP50)} ms (bwrap; p99 ${fmt(rawP99)} ms)`,
        ratio: ratio(p50, rawP50),
        target: "none set",
        verdict: "—",
      },
    ],
    notes: [
      `p50 of each block of ${perBlock} consecutive runs, ms: Berth ${fmtList(blockP50s.berth, 1)}; ` +
        `BubblewrapSandbox.run ${fmtList(blockP50s.floor, 1)}.`,
      `Where Berth's time goes (p50 of each phase, ms, from the client's clock and the worker's ` +
        `ExecutedActionMetadata, whose timestamps have 1 ms resolution): ${describePhases(phases)}.`,
      `CPU per run (one Execute, one BubblewrapSandbox.run and one bwrap): server process (gRPC services and ` +
        `both workers) ${fmt((cpu.server * 1000) / LATENCY_RUNS)} ms, benchmark process ` +
        `${fmt((cpu.client * 1000) / LATENCY_RUNS)} ms; the sandboxes' own processes are not counted.`,
      LATENCY_WHERE,
    ],
  };
}

/** Uploads one distinct action per index (untimed); returns their digests and expected stdout digests. */
async function uploadDistinct(ctx: BenchContext, count: number, salt: string) {
  const digests: WireDigest[] = new Array(count);
  await pool(count, UPLOAD_IN_FLIGHT, async (i) => {
    digests[i] = await uploadAction(ctx.clients, {
      args: ["sh", "-c", `echo ${i}`],
      files: INPUT_FILES,
      salt,
    });
  });
  return digests;
}

function stdoutDigest(i: number): WireDigest {
  const data = Buffer.from(`${i}\n`);
  return { hash: createHash("sha256").update(data).digest("hex"), sizeBytes: data.byteLength };
}

/** CPU seconds used while `work` ran: by the server process, by this process and by the whole machine. */
interface CpuSplit {
  server: number;
  client: number;
  machine: number;
}

async function measureCpuSplit<T>(serverPid: number | undefined, work: () => Promise<T>): Promise<[T, CpuSplit]> {
  const machine0 = machineCpuSeconds().busy;
  const [result, use] = await measureCpu(serverPid, work);
  return [result, { ...use, machine: machineCpuSeconds().busy - machine0 }];
}

/** A CPU split as cores' worth (seconds of CPU per second of wall time). */
function describeCpu(cpu: CpuSplit, wallMs: number): string {
  const cores = (seconds: number) => fmt(seconds / (wallMs / 1000), 2);
  const rest = cpu.machine - cpu.server - cpu.client;
  return `machine ${cores(cpu.machine)} of ${cpus().length} cores (server ${cores(cpu.server)}, benchmark process ${cores(cpu.client)}, everything else ${cores(rest)})`;
}

export async function benchExecuteThroughput(ctx: BenchContext): Promise<Section> {
  const { clients } = ctx;
  const rounds = Math.min(ctx.rounds, THROUGHPUT_MAX_ROUNDS);
  const refDir = join(ctx.scratchDir, "execute-throughput");
  await mkdir(refDir);
  await chmod(refDir, 0o755);
  const slots = await Promise.all(
    Array.from({ length: THROUGHPUT_WORKERS }, (_, i) =>
      mkdir(join(refDir, `slot-${i}`)).then(() => prepareSlot(join(refDir, `slot-${i}`))),
    ),
  );
  const sandbox = new BubblewrapSandbox();
  const expected = Array.from({ length: THROUGHPUT_ACTIONS }, (_, i) => stdoutDigest(i));

  /** Worker-side times of every action of the last Berth round, ms. */
  let metadata: ExecutedActionMetadata[] = [];
  const berthRound = async (digests: WireDigest[]) => {
    metadata = [];
    const start = process.hrtime.bigint();
    await pool(THROUGHPUT_ACTIONS, THROUGHPUT_IN_FLIGHT, async (i) => {
      const { response } = await execute(clients, digests[i] as WireDigest);
      checkCompleted(response, `action ${i}`, expected[i]);
      if (response.result?.executionMetadata) metadata.push(response.result.executionMetadata);
    });
    return elapsedMs(start);
  };
  /** Durations of every BubblewrapSandbox.run of the last reference round, ms. */
  let sandboxRuns: number[] = [];
  const sandboxRound = async () => {
    sandboxRuns = [];
    const start = process.hrtime.bigint();
    const free = [...slots];
    await pool(THROUGHPUT_ACTIONS, THROUGHPUT_WORKERS, async (i) => {
      const slot = free.pop() as SandboxSlot;
      try {
        const [result, took] = await timed(() => sandbox.run(sandboxRequest(slot, ["sh", "-c", `echo ${i}`])));
        if (result.exitCode !== 0)
          throw new Error(`sh -c 'echo ${i}' in BubblewrapSandbox exited with ${result.exitCode}`);
        sandboxRuns.push(took);
      } finally {
        free.push(slot);
      }
    });
    return elapsedMs(start);
  };

  // Warm-up: a tenth of the work on each side, with actions of its own.
  const warmup = await uploadDistinct(ctx, THROUGHPUT_ACTIONS / 10, `warmup-${randomBytes(8).toString("hex")}`);
  await pool(THROUGHPUT_ACTIONS / 10, THROUGHPUT_IN_FLIGHT, async (i) => {
    checkCompleted((await execute(clients, warmup[i] as WireDigest)).response, `warm-up action ${i}`, expected[i]);
  });
  await pool(THROUGHPUT_ACTIONS / 10, THROUGHPUT_WORKERS, async (i) => {
    await sandbox.run(sandboxRequest(slots[i % THROUGHPUT_WORKERS] as SandboxSlot, ["sh", "-c", `echo ${i}`]));
  });

  const berth: number[] = [];
  const reference: number[] = [];
  const berthCpu: string[] = [];
  const referenceCpu: string[] = [];
  const workerPhases: string[] = [];
  const sandboxP50s: number[] = [];
  for (let round = 0; round < rounds; round++) {
    const digests = await uploadDistinct(ctx, THROUGHPUT_ACTIONS, `round-${round}-${randomBytes(8).toString("hex")}`);
    const measureBerth = async () => {
      const [took, cpu] = await measureCpuSplit(ctx.serverPid, () => berthRound(digests));
      berth.push(took);
      berthCpu.push(describeCpu(cpu, took));
      workerPhases.push(describeWorkerTime(metadata, took));
    };
    const measureReference = async () => {
      const [took, cpu] = await measureCpuSplit(undefined, sandboxRound);
      reference.push(took);
      referenceCpu.push(describeCpu({ ...cpu, server: 0 }, took));
      sandboxP50s.push(median(sandboxRuns));
    };
    if (round % 2 === 0) {
      await measureBerth();
      await measureReference();
    } else {
      await measureReference();
      await measureBerth();
    }
    ctx.log(
      `  round ${round + 1}/${rounds}: Berth ${fmt(rate(berth.at(-1) as number))} actions/s, ` +
        `BubblewrapSandbox × ${THROUGHPUT_WORKERS} ${fmt(rate(reference.at(-1) as number))} actions/s`,
    );
    ctx.log(`    Berth: ${berthCpu.at(-1)}; ${workerPhases.at(-1)}`);
    ctx.log(`    reference: ${referenceCpu.at(-1)}; BubblewrapSandbox.run p50 ${fmt(sandboxP50s.at(-1) as number)} ms`);
  }
  const berthRate = rate(median(berth));
  const referenceRate = rate(median(reference));
  return {
    title: "Throughput of 1,000 distinct small actions on two workers",
    setup: [
      `${THROUGHPUT_ACTIONS.toLocaleString("en-US")} distinct actions \`sh -c 'echo N'\` (N = 0…999), each with ` +
        "the same ten input files as the latency benchmark (in the worker's file cache after the first " +
        "action), new ones every round (a new salt), all uploaded before the clock starts.",
      `berth serve with --workers ${THROUGHPUT_WORKERS} (one slot each). The client keeps ${THROUGHPUT_IN_FLIGHT} ` +
        "Execute calls in flight (normal calls: the action cache is looked up and misses) and the clock runs " +
        "from the first Execute to the last COMPLETED; every response is checked (status OK, exit code 0, " +
        "stdout digest of `N\\n`).",
      `Reference (the ceiling of this sandbox on this machine): the same ${THROUGHPUT_ACTIONS.toLocaleString("en-US")} ` +
        `commands run by \`BubblewrapSandbox.run\` in the benchmark's process, ${THROUGHPUT_WORKERS} at a time, ` +
        "each in its own prepared input root; nothing is laid out, uploaded or cached.",
      `${rounds} rounds after a warm-up of ${THROUGHPUT_ACTIONS / 10} actions on each side; Berth and the reference ` +
        "alternate in going first.",
    ],
    rows: [
      {
        metric: "Throughput",
        berth: `${fmt(berthRate)} actions/s`,
        reference: `${fmt(referenceRate)} actions/s (BubblewrapSandbox × ${THROUGHPUT_WORKERS})`,
        ratio: ratio(berthRate, referenceRate),
        target: `≥ ${THROUGHPUT_TARGET} actions/s`,
        verdict: verdictAtLeast(berthRate, THROUGHPUT_TARGET),
      },
      {
        metric: `Time for ${THROUGHPUT_ACTIONS.toLocaleString("en-US")} actions`,
        berth: `${fmt(median(berth) / 1000)} s`,
        reference: `${fmt(median(reference) / 1000)} s`,
        ratio: ratio(median(berth), median(reference)),
        target: "none set",
        verdict: "—",
      },
    ],
    notes: [
      `Per round, actions/s: Berth ${fmtList(berth.map(rate), 0)}; BubblewrapSandbox × ${THROUGHPUT_WORKERS} ` +
        `${fmtList(reference.map(rate), 0)}.`,
      `CPU while Berth ran, per round: ${berthCpu.join("; ")}.`,
      `CPU while the reference ran, per round: ${referenceCpu.join("; ")}.`,
      `Berth's workers, per round (from ExecutedActionMetadata): ${workerPhases.join("; ")}. The reference's ` +
        `BubblewrapSandbox.run took ${fmtList(sandboxP50s, 1)} ms (p50 per round) with two running at once.`,
      THROUGHPUT_WHERE,
    ],
  };
}

/** How busy the workers were and where their time went, from the actions' ExecutedActionMetadata. */
function describeWorkerTime(all: ExecutedActionMetadata[], wallMs: number): string {
  const busy = all.reduce((sum, m) => sum + ms(m.workerCompletedTimestamp) - ms(m.workerStartTimestamp), 0);
  const p50 = (f: (m: ExecutedActionMetadata) => number) => fmt(median(all.map(f)), 1);
  return (
    `busy ${fmt((100 * busy) / (THROUGHPUT_WORKERS * wallMs), 0)} % of the time; p50 per action: ` +
    `${p50((m) => ms(m.workerCompletedTimestamp) - ms(m.workerStartTimestamp))} ms in all, input root ` +
    `${p50((m) => ms(m.executionStartTimestamp) - ms(m.workerStartTimestamp))} ms, sandbox ` +
    `${p50((m) => ms(m.executionCompletedTimestamp) - ms(m.executionStartTimestamp))} ms, outputs ` +
    `${p50((m) => ms(m.workerCompletedTimestamp) - ms(m.executionCompletedTimestamp))} ms`
  );
}

function rate(msFor1000: number): number {
  return THROUGHPUT_ACTIONS / (msFor1000 / 1000);
}
