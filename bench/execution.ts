import { createHash, randomBytes } from "node:crypto";
import { chmod, chown, mkdir, stat, writeFile } from "node:fs/promises";
import { cpus } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { ExecutedActionMetadata } from "../src/gen/build/bazel/remote/execution/v2/remote_execution.js";
import { type ActionSpec, execute, uploadAction } from "../test/support/actions.js";
import type { WireDigest } from "../test/support/blobs.js";
import type { BenchContext } from "./context.js";
import { HelperProcess } from "./helper-process.js";
import { machineCpuSeconds, processCpuSeconds, rssMiB } from "./machine.js";
import { checkCompleted, describePhases, ms, type Phases, phasesOf } from "./phases.js";
import { ratio, type Section, verdictAtLeast, verdictAtMost } from "./report.js";
import { type HelperReply, type HelperRequest, NOBODY, type SandboxSlot } from "./sandbox-helper.js";
import { measureCpu } from "./server.js";
import { elapsedMs, fmt, fmtList, median, percentile } from "./stats.js";

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
 * private-mount-namespace path (see BubblewrapSandbox); the same test as the sandbox's own, so that the benchmark
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
      throw new Error(`${d} is closed to uid ${NOBODY}: the sandbox would take its private-mount-namespace path`);
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

async function prepareSlot(dir: string): Promise<SandboxSlot> {
  await mkdir(dir, { recursive: true });
  await chmod(dir, 0o755);
  const root = join(dir, "root");
  await prepareInputRoot(root);
  return { root, stdoutPath: join(dir, "stdout"), stderrPath: join(dir, "stderr") };
}

const HELPER = join(dirname(fileURLToPath(import.meta.url)), "sandbox-helper.js");

/** bench/sandbox-helper.ts in a process of its own. */
function startSandboxHelper(ctx: BenchContext): HelperProcess<HelperRequest, HelperReply> {
  return HelperProcess.start<HelperRequest, HelperReply>(ctx, HELPER, "sandbox helper");
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

const LATENCY_WHERE =
  "What Berth adds to the sandbox, from the phases above and the code: before queueing, the Execute handler " +
  "reads the Action and the Command from the CAS (from memory: blobs up to 64 KiB recently stored or read are " +
  "kept there, src/cas/memory-cached-blob-store.ts) and checks that the input root is stored " +
  "(src/execution/executor.ts prepare). The local workers run in a child process of `berth serve` " +
  "(src/worker/worker-process.ts), reached over loopback gRPC like any worker. Before the sandbox starts, the " +
  "worker takes the input tree's Directory messages from its cache (fetched once, with one GetTree, " +
  "src/worker/input-root.ts), creates and chowns the directories one depth at a time and hard-links the ten " +
  "files; BubblewrapSandbox.run then asks the launcher (src/process/launcher.pl, a small perl process started " +
  "once) to fork, open stdout and stderr, become uid 65534 and exec bwrap. After the sandbox, the worker looks " +
  "at stdout and stderr (empty here, so nothing is hashed or sent) and sends the completion on the worker " +
  "stream; Executor.finish hands the action cache entry to a write-behind cache (answered from memory until " +
  "its file is written, src/ac/write-behind-action-cache.ts) and the operation completes; the worker renames " +
  "the action's directory into the trash meanwhile (removed later by a batched `rm -rf`).";

const THROUGHPUT_WHERE =
  "Where the time goes: the server process (the CPU line's \"Berth's server\") uses about a fifth of a core; " +
  'the local workers run in a child process of their own (counted under "everything else", with the ' +
  "sandboxes), whose one Node.js thread serves both slots. Three changes since the last measurement took the " +
  "benchmark from about 87 to the figure above. The worker no longer forks itself for every sandbox: " +
  "child_process.spawn copied its address space synchronously (about 2.5 ms a spawn in a CPU profile); a " +
  "perl launcher started once forks its small self instead (src/process/launcher.pl). Files up to 1 MiB are " +
  "hashed from one read, and small blobs are streamed in chunks of their own size: a read stream allocates its " +
  "whole 1 MiB chunk for each read, so hashing each action's stdout made the worker run a full garbage " +
  "collection about ten times a second (`--trace-gc` showed Mark-Compact after Mark-Compact, started by " +
  "external memory pressure). The sandbox itself is not the limit: the reference runs the same commands about " +
  "twice as fast on the same two cores, with none of the laying out, uploading or scheduling.";

export async function benchExecuteLatency(ctx: BenchContext): Promise<Section> {
  const { clients } = ctx;
  const spec: ActionSpec = { args: ["/bin/true"], files: INPUT_FILES, salt: randomBytes(8).toString("hex") };
  const digest = await uploadAction(clients, spec);
  const slot = await prepareSlot(join(ctx.scratchDir, "execute-latency"));
  await assertReachableByNobody(slot.root);
  const helper = startSandboxHelper(ctx);

  const berthRun = async () => {
    const sent = Date.now();
    const [{ response }, took] = await timed(() => execute(clients, digest, { skipCacheLookup: true }));
    checkCompleted(response, "the /bin/true action");
    return { took, phases: phasesOf(sent, Date.now(), response.result?.executionMetadata) };
  };
  const sandboxRun = async () => (await helper.request({ op: "sandbox", slot, argv: ["/bin/true"] })).ms;
  const rawRun = async () => (await helper.request({ op: "raw", slot, argv: ["/bin/true"] })).ms;

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
  const rss = { server: rssMiB(ctx.serverPid), helper: rssMiB(helper.pid) };
  const helperCpu0 = processCpuSeconds(helper.pid);
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
  const helperCpu = processCpuSeconds(helper.pid) - helperCpu0;
  await helper.stop();
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
      `A \`berth serve --workers ${THROUGHPUT_WORKERS}\` of its own, started for the execution benchmarks (not ` +
        `the server the CAS benchmarks used). ${LATENCY_RUNS} sequential Executes after ${LATENCY_WARMUP} ` +
        "warm-up runs, timed at the client from the call until the stream's COMPLETED operation has arrived; " +
        "each response is checked (status OK, exit code 0, not from the cache).",
      "Reference (the floor): `new BubblewrapSandbox().run(…)` of src/sandbox/bubblewrap.ts running `/bin/true` " +
        "on an input root with the same files, laid out as a worker lays them out (directories owned by 65534, " +
        "files root's and read-only): exactly the code the worker runs, from checking the request to the " +
        "sandbox's pid 1 having died. Also, for information, a raw `spawn('bwrap', …)` as uid 65534 with the " +
        "same command line, awaited until it exits. Both run in a small Node.js process of their own " +
        "(bench/sandbox-helper.ts, timed there), as a fresh worker would: spawning forks the calling process, " +
        "and the benchmark's own process, swollen by the CAS benchmarks, made each fork several times slower. " +
        "Berth, the sandbox and raw bwrap alternate run by run.",
      "The temporary directory holding Berth's data directory is made traversable (chmod 0755), so the " +
        "sandbox binds the input root directly and the private-mount-namespace path for input roots behind closed " +
        "directories is not what is measured; the benchmark checks this before it starts.",
    ],
    rows: [
      {
        metric: "Latency p50",
        berth: `${fmt(p50)} ms`,
        reference: `${fmt(floorP50)} ms (BubblewrapSandbox.run)`,
        ratio: `${ratio(p50, floorP50)} (${overhead >= 0 ? "+" : "−"}${fmt(Math.abs(overhead))} ms)`,
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
        `ExecutedActionMetadata, whose timestamps have 1 ms resolution): ${describePhases(phases, 1)}.`,
      `CPU per run: Berth's server process (gRPC services and both workers) ` +
        `${fmt((cpu.server * 1000) / LATENCY_RUNS)} ms per Execute, the benchmark process ` +
        `${fmt((cpu.client * 1000) / LATENCY_RUNS)} ms per Execute, the helper ` +
        `${fmt((helperCpu * 1000) / LATENCY_RUNS)} ms per BubblewrapSandbox.run and bwrap; the sandboxes' own ` +
        `processes are not counted. Resident memory after the warm-up: server ${fmt(rss.server, 0)} MiB, helper ` +
        `${fmt(rss.helper, 0)} MiB.`,
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

/** A CPU split as cores' worth (seconds of CPU per second of wall time); `server` names the measured process. */
function describeCpu(cpu: CpuSplit, wallMs: number, server: string): string {
  const cores = (seconds: number) => fmt(seconds / (wallMs / 1000), 2);
  const rest = cpu.machine - cpu.server - cpu.client;
  return (
    `machine ${cores(cpu.machine)} of ${cpus().length} cores (${server} ${cores(cpu.server)}, benchmark process ` +
    `${cores(cpu.client)}, everything else ${cores(rest)})`
  );
}

export async function benchExecuteThroughput(ctx: BenchContext): Promise<Section> {
  const { clients } = ctx;
  const rounds = Math.min(ctx.rounds, THROUGHPUT_MAX_ROUNDS);
  const slots = await Promise.all(
    Array.from({ length: THROUGHPUT_WORKERS }, (_, i) =>
      prepareSlot(join(ctx.scratchDir, "execute-throughput", `${i}`)),
    ),
  );
  const helper = startSandboxHelper(ctx);
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
  const sandboxRound = async (count = THROUGHPUT_ACTIONS) => {
    const reply = await helper.request({ op: "batch", slots, count });
    sandboxRuns = reply.runs ?? [];
    return reply.ms;
  };

  // Warm-up: a tenth of the work on each side, with actions of its own.
  const warmup = await uploadDistinct(ctx, THROUGHPUT_ACTIONS / 10, `warmup-${randomBytes(8).toString("hex")}`);
  await pool(THROUGHPUT_ACTIONS / 10, THROUGHPUT_IN_FLIGHT, async (i) => {
    checkCompleted((await execute(clients, warmup[i] as WireDigest)).response, `warm-up action ${i}`, expected[i]);
  });
  await sandboxRound(THROUGHPUT_ACTIONS / 10);

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
      berthCpu.push(describeCpu(cpu, took, "Berth's server"));
      workerPhases.push(describeWorkerTime(metadata, took));
    };
    const measureReference = async () => {
      const [took, cpu] = await measureCpuSplit(helper.pid, () => sandboxRound());
      reference.push(took);
      referenceCpu.push(describeCpu(cpu, took, "the helper"));
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
      `The execution benchmarks' \`berth serve --workers ${THROUGHPUT_WORKERS}\` (one slot each). The client keeps ${THROUGHPUT_IN_FLIGHT} ` +
        "Execute calls in flight (normal calls: the action cache is looked up and misses) and the clock runs " +
        "from the first Execute to the last COMPLETED; every response is checked (status OK, exit code 0, " +
        "stdout digest of `N\\n`).",
      `Reference (the ceiling of this sandbox on this machine): the same ${THROUGHPUT_ACTIONS.toLocaleString("en-US")} ` +
        `commands run by \`BubblewrapSandbox.run\` in a helper process like the latency benchmark's (bench/sandbox-helper.ts, timed there), ${THROUGHPUT_WORKERS} at a time, ` +
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
