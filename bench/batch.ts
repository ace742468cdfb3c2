import { execFile } from "node:child_process";
import { randomFillSync } from "node:crypto";
import { writeFileSync } from "node:fs";
import { mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import type { Digest } from "../src/digest/digest.js";
import {
  type BatchUpdateBlobsRequest,
  type BatchUpdateBlobsResponse,
  Compressor_Value,
  DigestFunction_Value,
  type ServerCapabilities,
} from "../src/gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Clients } from "../test/support/farm.js";
import { unaryCall } from "../test/support/rpc.js";
import { type BenchContext, sha256Digest, wire } from "./context.js";
import { ratio, type Section } from "./report.js";
import { type CpuUse, measureCpu } from "./server.js";
import { elapsedMs, fmt, fmtList, KiB, max, median, min } from "./stats.js";

const run = promisify(execFile);

const BLOB_COUNT = 10_000;
const BLOB_BYTES = 4 * KiB;
const IN_FLIGHT = 4;
/**
 * Counted against max_batch_total_size_bytes for each blob besides its data: the protobuf framing of
 * the entry and its digest (about 80 bytes for SHA-256), so that a batch also fits when a server
 * counts the whole message.
 */
const PER_BLOB_OVERHEAD = 100;

export interface Blob {
  digest: Digest;
  data: Buffer;
}

/** `count` distinct random blobs of `size` bytes. */
export function randomBlobs(count: number, size: number): Blob[] {
  const bytes = randomFillSync(Buffer.allocUnsafe(count * size));
  const blobs: Blob[] = [];
  for (let i = 0; i < count; i++) {
    const data = bytes.subarray(i * size, (i + 1) * size);
    blobs.push({ digest: sha256Digest(data), data });
  }
  return blobs;
}

/** Splits blobs into batch requests whose counted size stays within `limit` (0: no limit). */
export function toBatches(blobs: readonly Blob[], limit: number): BatchUpdateBlobsRequest[] {
  const batches: BatchUpdateBlobsRequest[] = [];
  let current: BatchUpdateBlobsRequest | undefined;
  let size = 0;
  for (const blob of blobs) {
    const counted = blob.data.byteLength + PER_BLOB_OVERHEAD;
    if (current === undefined || (limit > 0 && size + counted > limit)) {
      current = { instanceName: "", requests: [], digestFunction: DigestFunction_Value.SHA256 };
      batches.push(current);
      size = 0;
    }
    current.requests.push({ digest: wire(blob.digest), data: blob.data, compressor: Compressor_Value.IDENTITY });
    size += counted;
  }
  return batches;
}

/** Sends the batches with up to `inFlight` requests outstanding; throws if any blob was refused. */
export async function sendBatches(clients: Clients, batches: readonly BatchUpdateBlobsRequest[], inFlight: number) {
  let next = 0;
  const worker = async () => {
    for (;;) {
      const batch = batches[next++];
      if (batch === undefined) return;
      const response: BatchUpdateBlobsResponse = await unaryCall(clients.cas.batchUpdateBlobs.bind(clients.cas), batch);
      const failed = response.responses.find((r) => (r.status?.code ?? 0) !== 0);
      if (failed) throw new Error(`BatchUpdateBlobs refused a blob: ${failed.status?.message}`);
      if (response.responses.length !== batch.requests.length) {
        throw new Error(`BatchUpdateBlobs answered ${response.responses.length} of ${batch.requests.length} blobs`);
      }
    }
  };
  await Promise.all(Array.from({ length: inFlight }, worker));
}

export async function getCapabilities(clients: Clients): Promise<ServerCapabilities> {
  return unaryCall(clients.capabilities.getCapabilities.bind(clients.capabilities), { instanceName: "" });
}

export interface BatchResult {
  section: Section;
  /** Blobs that are now stored, for later benchmarks. */
  stored: Digest[];
}

export async function benchBatchUpdate(ctx: BenchContext): Promise<BatchResult> {
  const { clients, serverPid, scratchDir } = ctx;
  const caps = await getCapabilities(clients);
  const limit = caps.cacheCapabilities?.maxBatchTotalSizeBytes ?? 0;

  // Warm-up on a few batches of other blobs.
  await sendBatches(clients, toBatches(randomBlobs(1000, BLOB_BYTES), limit), IN_FLIGHT);

  const berthRates: number[] = [];
  const copyRates: number[] = [];
  const cpu: CpuUse[] = [];
  let stored: Digest[] = [];
  let batchCount = 0;
  let largestBatch = 0;
  // Everything written is kept until the end, as Berth keeps its blobs (see bytestream.ts).
  const copyDir = join(scratchDir, "batch-copies");
  await mkdir(copyDir);
  ctx.defer(() => rm(copyDir, { recursive: true, force: true }));
  let copies = 0;

  for (let round = 0; round < ctx.rounds; round++) {
    const blobs = randomBlobs(BLOB_COUNT, BLOB_BYTES);
    const batches = toBatches(blobs, limit);
    batchCount = batches.length;
    largestBatch = Math.max(...batches.map((b) => b.requests.length));
    const sourceDir = join(copyDir, `source-${round}`);
    await mkdir(sourceDir);
    for (const blob of blobs) writeFileSync(join(sourceDir, blob.digest.hash), blob.data);
    await run("sync", []);

    const copy = async () => {
      const start = process.hrtime.bigint();
      await run("cp", ["-r", "--reflink=never", sourceDir, join(copyDir, `copy-${++copies}`)]);
      copyRates.push(BLOB_COUNT / (elapsedMs(start) / 1000));
    };
    // cp before and after Berth in every round; its speed here changes from one moment to the next.
    await copy();
    const start = process.hrtime.bigint();
    const [, use] = await measureCpu(serverPid, () => sendBatches(clients, batches, IN_FLIGHT));
    const ms = elapsedMs(start);
    berthRates.push(BLOB_COUNT / (ms / 1000));
    cpu.push({ server: use.server / (ms / 1000), client: use.client / (ms / 1000) });
    await copy();
    stored = blobs.map((b) => b.digest);
    ctx.log(
      `  round ${round + 1}/${ctx.rounds}: BatchUpdateBlobs ${fmt(berthRates.at(-1) ?? 0)} blobs/s, ` +
        `cp -r ${fmtList(copyRates.slice(-2), 0)} files/s`,
    );
  }

  const rate = median(berthRates);
  const copyRate = median(copyRates);
  const serverCpu = median(cpu.map((c) => c.server));
  const clientCpu = median(cpu.map((c) => c.client));
  return {
    stored,
    section: {
      title: "BatchUpdateBlobs of 10,000 blobs of 4 KiB",
      setup: [
        `${BLOB_COUNT.toLocaleString("en-US")} distinct blobs of ${BLOB_BYTES / KiB} KiB of random bytes, new ` +
          "ones every round, so the server stores every blob.",
        `Batches respect the server's max_batch_total_size_bytes from GetCapabilities (${limit.toLocaleString("en-US")} ` +
          `bytes), counting ${PER_BLOB_OVERHEAD} bytes of framing per blob besides its data: ${batchCount} batches of ` +
          `up to ${largestBatch} blobs, ${IN_FLIGHT} requests in flight at a time. Timed from the first request ` +
          "until every response has arrived; every blob's status is checked to be OK.",
        "Reference: `cp -r --reflink=never` of a directory holding the same 10,000 blobs as files (written just " +
          "before, so read from the page cache), into the same temporary directory: what creating 10,000 " +
          "small files costs on this disk without a server. It runs right before and right after Berth in " +
          "every round; the median over all those copies is the reference. Copies are kept until the end, " +
          "and each round starts after a `sync` (untimed).",
        `${ctx.rounds} rounds after a warm-up of 1,000 blobs.`,
      ],
      rows: [
        {
          metric: "Upload rate",
          berth: `${fmt(rate)} blobs/s (${fmt((rate * BLOB_BYTES) / 1e6)} MB/s)`,
          reference: `${fmt(copyRate)} files/s (cp -r)`,
          ratio: ratio(rate, copyRate),
          target: "none set",
          verdict: "—",
        },
        {
          metric: "Time for 10,000 blobs",
          berth: `${fmt((BLOB_COUNT / rate) * 1000)} ms`,
          reference: `${fmt((BLOB_COUNT / copyRate) * 1000)} ms`,
          ratio: ratio(copyRate, rate),
          target: "none set",
          verdict: "—",
        },
      ],
      notes: [
        `Per round, blobs/s: Berth ${fmtList(berthRates, 0)}; cp -r ${fmtList(copyRates, 0)}.`,
        `Spread (min–max): Berth ${fmt(min(berthRates))}–${fmt(max(berthRates))} blobs/s, cp -r ` +
          `${fmt(min(copyRates))}–${fmt(max(copyRates))} files/s. cp -r spends nearly all its time in the kernel ` +
          "creating files, and on this VM that cost jumps between levels from one copy to the next.",
        `CPU use while timed (median of rounds): server ${Math.round(serverCpu * 100)} %, client ` +
          `${Math.round(clientCpu * 100)} % of a core.`,
      ],
    },
  };
}
