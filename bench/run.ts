/**
 * Berth's benchmarks: `npm run build && npm run bench`.
 *
 * Starts `berth serve --workers 2` as a separate process on a temporary data directory, measures ByteStream
 * throughput, BatchUpdateBlobs, FindMissingBlobs, GetActionResult, the Execute round trip, execution
 * throughput, a Bazel build, a cold image pull, the per-action cost of running in an image and the cost of the
 * safety checks (blob verification after a restart, input tree limits, flushes), the Remote Asset API's
 * FetchBlob (cached and cold), a persistent worker's requests (the pool of src/persistent alone) and MicroVMs
 * (actions through the VM runner: first use, cold, resumed from a snapshot; a running VM, against QEMU's boot floor) and
 * Docker in microVMs (`docker run` through Execute cold, resumed and recycled, against a dockerd on the host) against references measured in the
 * same run, prints a summary and rewrites
 * docs/benchmarks.md. `--only NAME[,NAME]` runs a subset (and leaves the document alone).
 */
import { execFile } from "node:child_process";
import { chmod, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs, promisify } from "node:util";
import type { Digest } from "../src/digest/digest.js";
import { benchAsset } from "./asset.js";
import { benchBatchUpdate, getCapabilities, randomBlobs, sendBatches, toBatches } from "./batch.js";
import { benchBazelBuild } from "./bazel-build.js";
import { benchByteStream } from "./bytestream.js";
import type { BenchContext } from "./context.js";
import { benchExecuteLatency, benchExecuteThroughput } from "./execution.js";
import { benchExpand } from "./expand.js";
import { benchImageAction, benchImagePull } from "./images.js";
import { benchFindMissing, benchGetActionResult } from "./latency.js";
import { describeMachine } from "./machine.js";
import { benchPersistentWorker } from "./persistent.js";
import { renderMarkdown, renderSection, type Section } from "./report.js";
import { benchRunnerActions } from "./runner-actions.js";
import { benchRunners } from "./runners.js";
import { benchSafety } from "./safety.js";
import { type BenchServer, startBenchServer } from "./server.js";
import { benchVm } from "./vm.js";
import { benchVmDocker } from "./vm-docker.js";

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const DOC = join(REPO_ROOT, "docs", "benchmarks.md");
const COMMAND = "npm run build && npm run bench";
/** The local workers of the server the benchmarks talk to (one slot each). */
const EXECUTION_WORKERS = 2;

/** Every benchmark, in the order they run, by the name --only takes. */
const BENCHMARKS = {
  bytestream: "ByteStream Write/Read of 256 MiB vs cp",
  batch: "BatchUpdateBlobs of 10,000 × 4 KiB vs cp -r",
  findmissing: "FindMissingBlobs of 10,000 digests",
  getactionresult: "GetActionResult",
  "execute-latency": "Execute round trip of /bin/true vs BubblewrapSandbox.run",
  "execute-throughput": "1,000 distinct actions on two workers vs BubblewrapSandbox × 2",
  runners: "/bin/true in a fresh sandbox, one made ahead, a warm one, and the floor (a fork inside a sandbox)",
  "runner-actions":
    "Through Execute: /bin/true fresh, made ahead and warm; a test-like server fresh vs recycled; persistent workers",
  bazel: "Bazel build of 500 genrules, remote on Berth vs local sandboxed",
  "images-pull": "Cold pull and unpack of a Debian image vs skopeo copy + umoci unpack",
  "images-action": "/bin/true in a cached image vs bubblewrap on the unpacked root and docker run",
  expand: "Expand mode: expansion vs tar -x, the second expansion, /bin/true vs mount mode",
  safety: "Safety checks: blob verification after a restart, input tree limits and flushes vs the unchecked paths",
  asset: "Remote Asset API: FetchBlob of a cached 64 MiB asset vs ByteStream Read, a cold fetch vs curl",
  persistent: "A persistent worker with a 1 s start-up answering 50 requests vs the tool started per action",
  vm: "MicroVMs: /bin/true through the VM runner (first use, cold, snapshot-resumed) and in a running VM vs QEMU's boot floor",
  "vm-docker": "Docker in a microVM: docker run through Execute cold, snapshot-resumed and recycled vs a host dockerd",
} as const;
type BenchName = keyof typeof BENCHMARKS;

/** `--only a,b`: those benchmarks, in the usual order; without it, all of them. */
function parseOnly(value: string | undefined): BenchName[] {
  const all = Object.keys(BENCHMARKS) as BenchName[];
  if (value === undefined) return all;
  const wanted = value.split(",").map((name) => name.trim());
  const unknown = wanted.filter((name) => !(name in BENCHMARKS));
  if (unknown.length > 0 || wanted.length === 0) {
    throw new Error(`--only takes names among ${all.join(", ")}; not ${unknown.join(", ") || "nothing"}`);
  }
  return all.filter((name) => wanted.includes(name));
}

/** The blobs the FindMissingBlobs benchmark expects to find, when the BatchUpdateBlobs benchmark did not run. */
async function storeBlobs(ctx: BenchContext): Promise<Digest[]> {
  const caps = await getCapabilities(ctx.clients);
  const blobs = randomBlobs(10_000, 4096);
  await sendBatches(ctx.clients, toBatches(blobs, caps.cacheCapabilities?.maxBatchTotalSizeBytes ?? 0), 4);
  return blobs.map((b) => b.digest);
}

/**
 * Lets the previous benchmark's writes reach the disk before the next one starts, so that
 * writeback does not compete with it for the two cores. Files are deleted only at the end, for
 * the same reason.
 */
async function settle(): Promise<void> {
  await promisify(execFile)("sync", []);
  await new Promise((resolve) => setTimeout(resolve, 1000));
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      rounds: { type: "string", default: "5" },
      "no-doc": { type: "boolean", default: false },
      "server-cpu-prof": { type: "string" },
      only: { type: "string" },
    },
  });
  const only = parseOnly(values.only);
  // A partial run would replace the whole document with a part of it.
  const writeDoc = !values["no-doc"] && values.only === undefined;
  const rounds = Number(values.rounds);
  if (!Number.isInteger(rounds) || rounds < 1)
    throw new Error(`--rounds must be a positive integer, not ${values.rounds}`);
  const profileDir = values["server-cpu-prof"] === undefined ? undefined : resolve(values["server-cpu-prof"]);

  const started = process.hrtime.bigint();
  const workDir = await mkdtemp(join(tmpdir(), "berth-bench-"));
  // mkdtemp makes it private to root; the references (the sandbox floor, Bazel's local sandbox) lay out input
  // roots here that uid 65534 must reach directly, as on a user's machine. Berth's own data directories below
  // are made private (0700) by Berth itself.
  await chmod(workDir, 0o755);
  let server: BenchServer | undefined;
  const deferred: (() => Promise<void>)[] = [];
  let cleaning: Promise<void> | undefined;
  const cleanup = () => {
    cleaning ??= (async () => {
      for (const work of deferred.reverse()) {
        await work().catch((err: unknown) => console.error(`cleaning up failed: ${String(err)}`));
      }
      await server?.stop().catch((err: unknown) => console.error(`stopping the server failed: ${String(err)}`));
      await rm(workDir, { recursive: true, force: true });
    })();
    return cleaning;
  };
  const onSignal = (signal: NodeJS.Signals) => {
    console.error(`\n${signal}: stopping the server and removing ${workDir}`);
    void cleanup().finally(() => process.exit(130));
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);

  try {
    const machine = describeMachine(workDir, REPO_ROOT);
    console.log(`Berth benchmarks: ${machine.cpuModel}, ${machine.cores} cores, Node ${machine.node}, ${machine.date}`);
    console.log(`work directory ${workDir} (${machine.filesystem}), ${rounds} rounds, running ${only.join(", ")}`);
    if (profileDir !== undefined) await mkdir(profileDir, { recursive: true });
    const scratchDir = join(workDir, "scratch");
    await mkdir(scratchDir);
    server = await startBenchServer({ workDir, casMaxSizeBytes: "4GiB", cpuProfileDir: profileDir });
    console.log(`berth serve (pid ${server.pid}) listening on ${server.address}`);
    const ctx: BenchContext = {
      clients: server.clients,
      serverPid: server.pid,
      scratchDir,
      rounds,
      log: (message) => console.log(message),
      defer: (work) => {
        deferred.push(work);
      },
    };

    // The execution benchmarks get a server of their own, started when the first of them runs, so that they
    // do not depend on what the CAS benchmarks left in the first one (its heap makes every fork slower).
    let execution: { ctx: BenchContext; server: BenchServer } | undefined;
    const executionContext = async (): Promise<BenchContext> => {
      if (execution) return execution.ctx;
      const dir = join(workDir, "execution");
      await mkdir(dir);
      const executionServer = await startBenchServer({
        workDir: dir,
        casMaxSizeBytes: "4GiB",
        cpuProfileDir: profileDir,
        workers: EXECUTION_WORKERS,
      });
      deferred.push(() => executionServer.stop());
      console.log(
        `berth serve --workers ${EXECUTION_WORKERS} (pid ${executionServer.pid}) for the execution benchmarks`,
      );
      // The workers' input roots are below the data directory, which Berth keeps private (0700): the sandbox
      // reaches them through a bind mount in its own mount namespace (BubblewrapSandbox's staged path), and
      // that cost is part of what is measured; the floor's input roots are reachable directly.
      execution = {
        ctx: { ...ctx, clients: executionServer.clients, serverPid: executionServer.pid },
        server: executionServer,
      };
      return execution.ctx;
    };

    const sections: Section[] = [];
    let stored: Digest[] | undefined;
    const steps: Record<BenchName, () => Promise<void>> = {
      bytestream: async () => {
        sections.push(await benchByteStream(ctx));
      },
      batch: async () => {
        const batch = await benchBatchUpdate(ctx);
        stored = batch.stored;
        sections.push(batch.section);
      },
      findmissing: async () => {
        // Without the BatchUpdateBlobs benchmark, the blobs it would have left behind are uploaded here.
        stored ??= await storeBlobs(ctx);
        sections.push(await benchFindMissing(ctx, stored));
      },
      getactionresult: async () => {
        sections.push(await benchGetActionResult(ctx));
      },
      "execute-latency": async () => {
        sections.push(await benchExecuteLatency(await executionContext()));
      },
      "execute-throughput": async () => {
        sections.push(await benchExecuteThroughput(await executionContext()));
      },
      // The sandbox library alone, in this process: no server involved.
      runners: async () => {
        await execution?.server.stop();
        sections.push(await benchRunners(ctx));
      },
      // Two servers of their own (one worker each), fresh and with sandboxes made ahead and warm runners.
      "runner-actions": async () => {
        await execution?.server.stop();
        sections.push(...(await benchRunnerActions(ctx)));
      },
      bazel: async () => {
        // It starts servers of its own; the execution benchmarks' one would only sit beside them.
        await execution?.server.stop();
        sections.push(await benchBazelBuild(ctx, { dir: join(workDir, "bazel"), cpuProfileDir: profileDir }));
      },
      // Both start servers of their own (one worker each) and share one Debian image and loopback registry.
      "images-pull": async () => {
        await execution?.server.stop();
        sections.push(await benchImagePull(ctx));
      },
      "images-action": async () => {
        await execution?.server.stop();
        sections.push(await benchImageAction(ctx));
      },
      expand: async () => {
        await execution?.server.stop();
        sections.push(await benchExpand(ctx));
      },
      // A server of its own (no workers), restarted on its data directory; the rest runs in this process.
      safety: async () => {
        await execution?.server.stop();
        sections.push(await benchSafety(ctx));
      },
      // A server of its own, allowed to fetch from the benchmark's loopback HTTP server.
      asset: async () => {
        await execution?.server.stop();
        sections.push(await benchAsset(ctx, { cpuProfileDir: profileDir }));
      },
      // No server: the pool of worker processes alone (it is not on the Execute path yet).
      persistent: async () => {
        sections.push(await benchPersistentWorker(ctx));
      },
      // No server: QEMU guests started by this process (src/vm), each against the boot floor.
      vm: async () => {
        await execution?.server.stop();
        sections.push(await benchVm(ctx));
      },
      // Two servers of its own (one worker each, microVMs), a loopback registry and a dockerd on the host.
      "vm-docker": async () => {
        await execution?.server.stop();
        sections.push(await benchVmDocker(ctx));
      },
    };
    for (const [i, name] of only.entries()) {
      if (i > 0) await settle();
      console.log(`${i + 1}. ${BENCHMARKS[name]}`);
      await steps[name]();
    }

    await server.stop();
    const durationSeconds = Number(process.hrtime.bigint() - started) / 1e9;
    console.log("");
    for (const section of sections) {
      console.log(section.title);
      for (const row of section.rows) {
        console.log(
          `  ${row.metric}: ${row.berth} | reference ${row.reference} | ${row.ratio} | target ${row.target} | ${row.verdict}`,
        );
      }
      for (const note of section.notes) console.log(`  · ${note}`);
    }
    const markdown = renderMarkdown({
      machine,
      sections,
      durationSeconds,
      command: COMMAND,
      benchmarkNames: Object.keys(BENCHMARKS),
    });
    if (!writeDoc) {
      // The sections as docs/benchmarks.md would have them (numbered as in this run), to paste by hand.
      console.log("");
      for (const [i, section] of sections.entries()) console.log(renderSection(section, i + 1).join("\n"));
      console.log(`(${values["no-doc"] ? "--no-doc" : "--only"}: docs/benchmarks.md left as it was)`);
    } else {
      await writeFile(DOC, markdown);
      console.log(`\nwrote ${DOC} (${durationSeconds.toFixed(0)} s)`);
    }
    if (profileDir !== undefined) console.log(`server CPU profile in ${profileDir}`);
  } finally {
    await cleanup();
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? (err.stack ?? err.message) : String(err));
  process.exitCode = 1;
});
