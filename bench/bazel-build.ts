import { existsSync } from "node:fs";
import { chmod, mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { cpus } from "node:os";
import { join } from "node:path";
import { gunzipSync } from "node:zlib";
import {
  assertInstalled,
  BAZEL,
  type CommandResult,
  describeRun,
  processSummary,
  runBazel,
  startupOptions,
} from "../test/e2e/bazel.js";
import type { BenchContext } from "./context.js";
import { assertReachableByNobody } from "./execution.js";
import { machineCpuSeconds, processCpuSeconds } from "./machine.js";
import { ratio, type Section, verdictAtMost } from "./report.js";
import { startBenchServer } from "./server.js";
import { fmt, fmtList, median, percentile } from "./stats.js";

const CHAINS = 50;
const STEPS = 10;
const ACTIONS = CHAINS * STEPS;
const MAX_ROUNDS = 3;
const TARGET_RATIO = 1.5;
const WORKERS = 2;
const BUILD_TIMEOUT_MS = 300_000;

export interface BazelBenchOptions {
  /** An empty directory to create, for the workspace, Bazel's output root and the Berth servers. */
  dir: string;
  cpuProfileDir?: string;
}

type Variant = "remote" | "remote-jobs" | "local" | "local-debug";

/** Options of every timed build besides the strategy: nothing may come from a disk cache. */
const COMMON = ["--color=no", "--curses=no", "--incompatible_strict_action_env", "--disk_cache="];
const LOCAL = ["--spawn_strategy=sandboxed", "--nosandbox_debug"];
/** As Debian's /etc/bazel/bazelrc sets it (`build --sandbox_debug`), spelled out. */
const LOCAL_DEBUG = ["--spawn_strategy=sandboxed", "--sandbox_debug"];
const remote = (address: string) => [`--remote_executor=grpc://${address}`, "--spawn_strategy=remote"];
/** For information: remote with more spawns in flight than the machine has cores, as remote builds usually run. */
const REMOTE_JOBS = 16;

/**
 * Chain `c`: step 0 writes a line, every further step copies its
 * predecessor's output and adds a line. Every line names the workspace's
 * generation, so that each build's actions, inputs and outputs are new to
 * any cache however many builds ran before it.
 */
function buildFile(chain: number, generation: number): string {
  const name = String(chain).padStart(2, "0");
  const rules: string[] = [];
  for (let step = 0; step < STEPS; step++) {
    const line = `echo chain ${name} step ${step} generation ${generation}`;
    rules.push(
      step === 0
        ? `genrule(\n    name = "s0",\n    outs = ["s0.txt"],\n    cmd = "${line} > $@",\n)\n`
        : `genrule(\n    name = "s${step}",\n    srcs = [":s${step - 1}"],\n    outs = ["s${step}.txt"],\n` +
            `    cmd = "(cat $(location :s${step - 1}); ${line}) > $@",\n)\n`,
    );
  }
  return rules.join("\n");
}

function expectedLastOutput(chain: number, generation: number): string {
  const name = String(chain).padStart(2, "0");
  return Array.from({ length: STEPS }, (_, step) => `chain ${name} step ${step} generation ${generation}\n`).join("");
}

async function writeWorkspace(workspace: string, generation: number): Promise<void> {
  await mkdir(workspace, { recursive: true });
  await writeFile(join(workspace, "WORKSPACE"), 'workspace(name = "berth_bench")\n');
  for (let chain = 0; chain < CHAINS; chain++) {
    const dir = join(workspace, "chains", `c${String(chain).padStart(2, "0")}`);
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, "BUILD"), buildFile(chain, generation));
  }
}

const BAZEL_WHERE =
  'Where the time goes: per action, Berth\'s server ("Berth" in the CPU line above) handles about a dozen ' +
  "gRPC calls through grpc-js: eight ByteStream.Write (the Action, the Command and one Directory per level of " +
  "bazel-out/k8-fastbuild/bin/chains/cNN), FindMissingBlobs, GetActionResult, Execute and a Read, with the " +
  "small blobs appended to the CAS's segment log. Its local workers' process and the sandboxes count under " +
  '"everything else": the worker gets the input tree with the assignment and lays it out with a handful of ' +
  "system calls, and bubblewrap plus bash cost a few milliseconds more than Bazel's linux-sandbox. With " +
  '--jobs=2 Bazel waits on each action\'s round trips (its "execute remotely" span above); with --jobs=16 the ' +
  "two cores are the limit. File creation on this machine's ext4 slows down for a minute or more after many " +
  "files were deleted (every freed inode is scanned past), which makes both sides' times vary from build to " +
  "build: Berth's worker therefore removes finished actions' directories only while idle.";

/** Calls by method in Bazel's --experimental_remote_grpc_log: length-delimited LogEntry messages. */
function countRpcs(log: Buffer): Map<string, number> {
  let at = 0;
  const varint = () => {
    let value = 0;
    for (let shift = 0; ; shift += 7) {
      const byte = log[at++] as number;
      value += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) return value;
    }
  };
  const counts = new Map<string, number>();
  while (at < log.length) {
    const end = varint() + at;
    while (at < end) {
      const key = varint();
      const [field, wire] = [Math.floor(key / 8), key % 8];
      if (wire === 0) varint();
      else if (wire === 1) at += 8;
      else if (wire === 5) at += 4;
      else if (wire === 2) {
        const length = varint();
        // LogEntry.method_name (remote_execution_log.proto), e.g. "google.bytestream.ByteStream/Write".
        if (field === 3) {
          const method = log.toString("utf8", at, at + length);
          counts.set(method, (counts.get(method) ?? 0) + 1);
        }
        at += length;
      } else throw new Error(`unexpected wire type ${wire} in Bazel's gRPC log`);
    }
  }
  return counts;
}

/** What Bazel's JSON trace profile (command.profile.gz, written by default) says about one build's spawns. */
interface SpawnProfile {
  /** Name of the span that covers each spawn's execution. */
  span: string;
  count: number;
  p50Ms: number;
  p90Ms: number;
  /** Most spans open at once. */
  concurrency: number;
  /** Other spans of interest: name → p50 ms. */
  extra: Record<string, number>;
}

interface TraceEvent {
  ph?: string;
  name?: string;
  cat?: string;
  ts?: number;
  dur?: number;
}

function spansOf(events: TraceEvent[], name: string): TraceEvent[] {
  return events.filter((e) => e.ph === "X" && e.name === name && e.dur !== undefined);
}

async function readProfile(outputBase: string, variant: Variant): Promise<SpawnProfile | undefined> {
  const file = join(outputBase, "command.profile.gz");
  if (!existsSync(file)) return undefined;
  const parsed = JSON.parse(gunzipSync(await readFile(file)).toString("utf8")) as
    | { traceEvents: TraceEvent[] }
    | TraceEvent[];
  const events = Array.isArray(parsed) ? parsed : parsed.traceEvents;
  // Remote spawns: RemoteSpawnRunner's "execute remotely" spans; local ones: the genrules' action spans.
  const isRemote = variant.startsWith("remote");
  const spans = isRemote
    ? spansOf(events, "execute remotely")
    : events.filter((e) => e.ph === "X" && e.cat === "action processing" && e.name?.startsWith("Executing genrule"));
  if (spans.length === 0) return undefined;
  const durations = spans.map((e) => (e.dur as number) / 1000);
  const edges = spans
    .flatMap((e) => [
      [e.ts as number, 1],
      [(e.ts as number) + (e.dur as number), -1],
    ])
    .sort((a, b) => (a[0] as number) - (b[0] as number) || (a[1] as number) - (b[1] as number));
  let open = 0;
  let concurrency = 0;
  for (const [, delta] of edges) {
    open += delta as number;
    concurrency = Math.max(concurrency, open);
  }
  const extra: Record<string, number> = {};
  for (const name of ["download outputs", "MerkleTree.build(ActionInput)"]) {
    const found = spansOf(events, name);
    if (found.length > 0) extra[name] = median(found.map((e) => (e.dur as number) / 1000));
  }
  return {
    span: isRemote ? "execute remotely" : "Executing genrule (action)",
    count: spans.length,
    p50Ms: median(durations),
    p90Ms: percentile(durations, 90),
    concurrency,
    extra,
  };
}

interface Build {
  variant: Variant;
  ms: number;
  summary: string;
  /** Bazel's own "Elapsed time" and "Critical Path", s. */
  elapsed: number;
  criticalPath: number;
  profile: SpawnProfile | undefined;
  /** CPU seconds while it ran: the Berth server (remote builds), Bazel's server and the whole machine. */
  cpu: { berth: number; bazel: number; machine: number };
}

export async function benchBazelBuild(ctx: BenchContext, options: BazelBenchOptions): Promise<Section> {
  assertInstalled(BAZEL);
  const root = options.dir;
  await mkdir(root);
  await chmod(root, 0o755);
  await assertReachableByNobody(root);
  const workspace = join(root, "workspace");
  let generation = 0;
  await writeWorkspace(workspace, generation);
  const startup = startupOptions(root);
  ctx.defer(async () => {
    await runBazel(workspace, [...startup, "shutdown"], 60_000).catch(() => undefined);
  });
  const bazel = async (args: string[], what: string): Promise<CommandResult> => {
    const full = [...startup, ...args];
    const result = await runBazel(workspace, full, BUILD_TIMEOUT_MS);
    if (result.code !== 0) throw new Error(`${what} failed: ${describeRun(full, result)}`);
    return result;
  };
  let servers = 0;
  const withBerth = async <T>(work: (address: string, pid: number | undefined) => Promise<T>): Promise<T> => {
    const dir = join(root, `berth-${++servers}`);
    await mkdir(dir);
    const server = await startBenchServer({
      workDir: dir,
      casMaxSizeBytes: "4GiB",
      workers: WORKERS,
      cpuProfileDir: options.cpuProfileDir,
    });
    // Stopped below; this is for an interrupt in between (stopping twice is harmless).
    ctx.defer(() => server.stop());
    try {
      return await work(server.address, server.pid);
    } finally {
      await server.stop();
      await rm(dir, { recursive: true, force: true });
    }
  };

  // Warm-up, untimed: the Bazel server starts and loads every package, then builds the first two genrules of
  // one chain locally and on a Berth of its own, so that neither strategy's first timed build pays for starting.
  // The remote one logs its gRPC calls, to count what Bazel asks of Berth per action.
  const warmup = "//chains/c00:s1";
  await bazel(["build", ...COMMON, ...LOCAL, "--nobuild", "//..."], "loading the workspace");
  await bazel(["build", ...COMMON, ...LOCAL, warmup], "the local warm-up build");
  await bazel(["clean"], "bazel clean");
  const grpcLog = join(root, "warmup-grpc.log");
  await withBerth((address) =>
    bazel(
      ["build", ...COMMON, ...remote(address), `--experimental_remote_grpc_log=${grpcLog}`, warmup],
      "the remote warm-up build",
    ),
  );
  const rpcs = countRpcs(await readFile(grpcLog));
  const info = (await bazel(["info", "output_base", "server_pid"], "bazel info")).stdout;
  const outputBase = /^output_base: (.+)$/m.exec(info)?.[1] ?? "";
  const bazelPid = Number(/^server_pid: (\d+)$/m.exec(info)?.[1]);

  const timedBuild = async (variant: Variant): Promise<Build> => {
    const run = async (flags: string[], berthPid?: number) => {
      // Warm-up, untimed: the same build of another generation of the workspace, with the same options and
      // (remote) the same Berth server, so that the timed build runs on warm JITs (Bazel's JVM and Berth's
      // V8) as a developer's builds do, yet nothing of it is in any cache.
      await writeWorkspace(workspace, ++generation);
      await bazel(["clean"], "bazel clean");
      await bazel(["build", ...COMMON, ...flags, "//chains/..."], `the ${variant} warm-up build`);
      await writeWorkspace(workspace, ++generation);
      await bazel(["clean"], "bazel clean");
      const before = {
        berth: processCpuSeconds(berthPid),
        bazel: processCpuSeconds(bazelPid),
        machine: machineCpuSeconds(),
      };
      const start = process.hrtime.bigint();
      const result = await bazel(["build", ...COMMON, ...flags, "//chains/..."], `the ${variant} build`);
      const ms = Number(process.hrtime.bigint() - start) / 1e6;
      const cpu = {
        berth: berthPid === undefined ? 0 : processCpuSeconds(berthPid) - before.berth,
        bazel: processCpuSeconds(bazelPid) - before.bazel,
        machine: machineCpuSeconds().busy - before.machine.busy,
      };
      return { result, ms, cpu };
    };
    const flags: Record<Variant, (address: string) => string[]> = {
      remote,
      "remote-jobs": (address) => [...remote(address), `--jobs=${REMOTE_JOBS}`],
      local: () => LOCAL,
      "local-debug": () => LOCAL_DEBUG,
    };
    const { result, ms, cpu } = variant.startsWith("remote")
      ? await withBerth((address, pid) => run(flags[variant](address), pid))
      : await run(flags[variant](""));
    const { line, counts } = processSummary(result.stderr);
    const expectedKind = variant.startsWith("remote") ? "remote" : undefined;
    const ran = [...counts.entries()].filter(([kind]) => kind !== "internal");
    if (ran.length !== 1 || ran[0]?.[1] !== ACTIONS || (expectedKind && ran[0]?.[0] !== expectedKind)) {
      throw new Error(`the ${variant} build did not run its ${ACTIONS} genrules ${expectedKind ?? "locally"}: ${line}`);
    }
    if (expectedKind === undefined && !/sandbox/.test(ran[0]?.[0] ?? "")) {
      throw new Error(`the ${variant} build did not use a sandbox: ${line}`);
    }
    for (const chain of [0, CHAINS - 1]) {
      const file = join(workspace, "bazel-bin", "chains", `c${String(chain).padStart(2, "0")}`, `s${STEPS - 1}.txt`);
      if ((await readFile(file, "utf8")) !== expectedLastOutput(chain, generation)) throw new Error(`${file} is wrong`);
    }
    const elapsed = Number(/Elapsed time: ([0-9.]+)s/.exec(result.stderr)?.[1] ?? Number.NaN);
    const criticalPath = Number(/Critical Path: ([0-9.]+)s/.exec(result.stderr)?.[1] ?? Number.NaN);
    return {
      variant,
      ms,
      summary: line.replace(/^INFO: /, ""),
      elapsed,
      criticalPath,
      profile: await readProfile(outputBase, variant),
      cpu,
    };
  };

  const rounds = Math.min(ctx.rounds, MAX_ROUNDS);
  const order: Variant[] = ["local", "remote", "local-debug", "remote-jobs"];
  const builds: Build[] = [];
  for (let round = 0; round < rounds; round++) {
    // Each round starts with another variant, so that none is always first or always follows the same one.
    const turn = [...order.slice(round % order.length), ...order.slice(0, round % order.length)];
    const done: string[] = [];
    for (const variant of turn) {
      const build = await timedBuild(variant);
      builds.push(build);
      done.push(`${variant} ${fmt(build.ms / 1000)} s`);
    }
    ctx.log(`  round ${round + 1}/${rounds}: ${done.join(", ")}`);
  }

  const of = (variant: Variant) => builds.filter((b) => b.variant === variant);
  const wall = (variant: Variant) => median(of(variant).map((b) => b.ms / 1000));
  const [remoteS, localS, debugS, jobsS] = [wall("remote"), wall("local"), wall("local-debug"), wall("remote-jobs")];
  const sandboxKind = /(\S+sandbox)/.exec(of("local")[0]?.summary ?? "")?.[1] ?? "sandboxed";
  const label: Record<Variant, string> = {
    remote: "remote",
    "remote-jobs": `remote --jobs=${REMOTE_JOBS}`,
    local: "local",
    "local-debug": "local --sandbox_debug",
  };
  const describeProfiles = (variant: Variant) => {
    const found = of(variant)
      .map((b) => b.profile)
      .filter((p): p is SpawnProfile => p !== undefined);
    if (found.length === 0) return `${label[variant]}: no profile found`;
    const extra = Object.keys(found[0]?.extra ?? {})
      .map((name) => `, "${name}" p50 ${fmt(median(found.map((p) => p.extra[name] ?? Number.NaN)))} ms`)
      .join("");
    return `${label[variant]}: "${found[0]?.span}" p50 ${fmtList(
      found.map((p) => p.p50Ms),
      1,
    )} ms, p90 ${fmtList(
      found.map((p) => p.p90Ms),
      1,
    )} ms, at most ${Math.max(...found.map((p) => p.concurrency))} at once${extra}`;
  };
  /** Median CPU of a variant's builds, as cores' worth over the build's wall time. */
  const describeCpu = (variant: Variant) => {
    const cores = (pick: (b: Build) => number) => fmt(median(of(variant).map((b) => pick(b) / (b.ms / 1000))), 2);
    const berth = variant.startsWith("remote") ? `Berth ${cores((b) => b.cpu.berth)}, ` : "";
    return (
      `${label[variant]}: machine ${cores((b) => b.cpu.machine)} of ${cpus().length} cores (${berth}Bazel's server ` +
      `${cores((b) => b.cpu.bazel)}, everything else ${cores((b) => b.cpu.machine - b.cpu.berth - b.cpu.bazel)}); ` +
      `${fmt(median(of(variant).map((b) => ((b.cpu.machine - b.cpu.bazel) * 1000) / ACTIONS)))} ms of CPU per action ` +
      "besides Bazel's own"
    );
  };
  const perBuild = (variant: Variant) =>
    of(variant)
      .map((b) => `${fmt(b.elapsed)}/${fmt(b.criticalPath)}`)
      .join(", ");
  ctx.log(`  remote ${fmt(remoteS)} s, local ${fmt(localS)} s (${fmt(remoteS / localS, 2)}×)`);
  return {
    title: "Bazel build of 500 genrules, remote on Berth vs local sandboxed",
    setup: [
      `A generated workspace of ${CHAINS} packages, each a chain of ${STEPS} genrules (${ACTIONS} in all): the ` +
        "first writes a line with echo, every other one cats its predecessor's output and adds a line. All " +
        "outputs are deterministic; two chains' last outputs are checked after every build.",
      "Bazel 4.2.3 (Debian's bazel-bootstrap, /usr/bin/bazel) with the startup options of the end-to-end " +
        "tests (test/e2e/bazel.ts: no user or workspace rc, Debian's system rc, one output_user_root for every " +
        "build, so one Bazel server serves them all) and, for every build, " +
        `\`${COMMON.join(" ")}\` and Bazel's default --jobs (auto: ${cpus().length} here). The timed command is ` +
        "`bazel build //chains/...`, run with child_process.spawn and timed until it exits. Every build, timed " +
        "or not, is of a new generation of the workspace (each echo line names it) after a `bazel clean`, so " +
        "its actions, inputs and outputs are in no cache, local or remote.",
      "Remote: `--remote_executor=grpc://ADDRESS --spawn_strategy=remote` against a fresh `berth serve " +
        `--workers ${WORKERS}\` (new data directory; started before the clock starts, stopped after it stops). ` +
        "Every build's process summary " +
        `is checked to show ${ACTIONS} remote (not remote cache hit) spawns.`,
      `Reference: \`--spawn_strategy=sandboxed --nosandbox_debug\` (Bazel's ${sandboxKind}), no remote ` +
        "options. Debian's /etc/bazel/bazelrc adds `build --sandbox_debug`, and the rc cannot be skipped " +
        "because it also sets the --install_base this Bazel needs; `--nosandbox_debug` on the command line " +
        "overrides it and gives Bazel's usual behaviour (each sandbox deleted after its action). For " +
        "information, the same local build with Debian's `--sandbox_debug` (sandboxes kept, linux-sandbox " +
        `writing debug output) and the remote build with \`--jobs=${REMOTE_JOBS}\` (more spawns in flight than ` +
        "cores, as remote builds are usually run) are measured in the same rounds.",
      "Warm-up (untimed): the Bazel server starts and loads the workspace (`--nobuild //...`), then builds " +
        "the first two genrules of one chain once locally and once on a Berth of its own. Then every timed " +
        "build follows an untimed build of the whole workspace (the generation before) with the same options " +
        "and, remote, on the same Berth server: the timed build runs on warm JITs, Bazel's JVM and Berth's V8, " +
        "as a developer's builds and a farm that has served builds before do, yet finds nothing in a cache. " +
        `${rounds} rounds of the four builds, each round starting with a different one.`,
    ],
    rows: [
      {
        metric: "Wall time",
        berth: `${fmt(remoteS)} s (remote)`,
        reference: `${fmt(localS)} s (local ${sandboxKind})`,
        ratio: ratio(remoteS, localS),
        target: `≤ ${TARGET_RATIO}× local`,
        verdict: verdictAtMost(remoteS / localS, TARGET_RATIO),
      },
      {
        metric: "Wall time vs --sandbox_debug",
        berth: `${fmt(remoteS)} s (remote)`,
        reference: `${fmt(debugS)} s (local, Debian's --sandbox_debug)`,
        ratio: ratio(remoteS, debugS),
        target: "none set",
        verdict: "—",
      },
      {
        metric: `Wall time, remote with --jobs=${REMOTE_JOBS}`,
        berth: `${fmt(jobsS)} s (remote --jobs=${REMOTE_JOBS})`,
        reference: `${fmt(localS)} s (local ${sandboxKind})`,
        ratio: ratio(jobsS, localS),
        target: "none set",
        verdict: "—",
      },
      {
        metric: "Actions per second",
        berth: `${fmt(ACTIONS / remoteS)} (remote)`,
        reference: `${fmt(ACTIONS / localS)} (local)`,
        ratio: ratio(localS, remoteS),
        target: "none set",
        verdict: "—",
      },
    ],
    notes: [
      `Every build, s, in the order they ran: ${builds.map((b) => `${label[b.variant]} ${fmt(b.ms / 1000)}`).join(", ")}.`,
      `Bazel's own "Elapsed time" / "Critical Path", s: ${order.map((v) => `${label[v]} ${perBuild(v)}`).join("; ")}.`,
      `gRPC calls Bazel made for the two actions of the remote warm-up build (its --experimental_remote_grpc_log): ` +
        `${[...rpcs.entries()].map(([method, n]) => `${n} ${method.replace(/^.*\./, "")}`).join(", ")}.`,
      `Process summaries: remote "${of("remote")[0]?.summary}"; local "${of("local")[0]?.summary}".`,
      `Bazel's trace profile (command.profile.gz, per build): ${order.map(describeProfiles).join("; ")}.`,
      `CPU while building (median over rounds, cores' worth; "everything else" is mostly the sandboxes' ` +
        `processes and the kernel): ${order.map(describeCpu).join("; ")}.`,
      `Debian's --sandbox_debug changes the local reference: ${fmt(debugS)} s with it against ${fmt(localS)} s ` +
        `without (${ratio(debugS, localS)}); with it, Bazel keeps every action's sandbox directory instead of ` +
        "deleting it. The target is checked against Bazel's usual --nosandbox_debug.",
      BAZEL_WHERE,
    ],
  };
}
