/**
 * Berth's benchmarks: `npm run build && npm run bench`.
 *
 * Starts `berth serve` as a separate process on a temporary data directory, measures ByteStream
 * throughput, BatchUpdateBlobs, FindMissingBlobs and GetActionResult against references measured
 * in the same run, prints a summary and rewrites docs/benchmarks.md.
 */
import { execFile } from "node:child_process";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs, promisify } from "node:util";
import { benchBatchUpdate } from "./batch.js";
import { benchByteStream } from "./bytestream.js";
import type { BenchContext } from "./context.js";
import { benchFindMissing, benchGetActionResult } from "./latency.js";
import { describeMachine } from "./machine.js";
import { renderMarkdown, type Section } from "./report.js";
import { type BenchServer, startBenchServer } from "./server.js";

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const DOC = join(REPO_ROOT, "docs", "benchmarks.md");
const COMMAND = "npm run build && npm run bench";

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
    },
  });
  const rounds = Number(values.rounds);
  if (!Number.isInteger(rounds) || rounds < 1)
    throw new Error(`--rounds must be a positive integer, not ${values.rounds}`);
  const profileDir = values["server-cpu-prof"] === undefined ? undefined : resolve(values["server-cpu-prof"]);

  const started = process.hrtime.bigint();
  const workDir = await mkdtemp(join(tmpdir(), "berth-bench-"));
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
    console.log(`work directory ${workDir} (${machine.filesystem}), ${rounds} rounds`);
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

    const sections: Section[] = [];
    console.log("1. ByteStream Write/Read of 256 MiB vs cp");
    sections.push(await benchByteStream(ctx));
    await settle();
    console.log("2. BatchUpdateBlobs of 10,000 × 4 KiB vs cp -r");
    const batch = await benchBatchUpdate(ctx);
    sections.push(batch.section);
    await settle();
    console.log("3. FindMissingBlobs of 10,000 digests");
    sections.push(await benchFindMissing(ctx, batch.stored));
    await settle();
    console.log("4. GetActionResult");
    sections.push(await benchGetActionResult(ctx));

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
    const markdown = renderMarkdown({ machine, sections, durationSeconds, command: COMMAND });
    if (values["no-doc"]) {
      console.log("\n(--no-doc: docs/benchmarks.md left as it was)");
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
