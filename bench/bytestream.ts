import { execFile } from "node:child_process";
import { randomFillSync, randomUUID } from "node:crypto";
import { once } from "node:events";
import { mkdir, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import type { Digest } from "../src/digest/digest.js";
import { formatReadResourceName, formatWriteResourceName } from "../src/digest/resource-name.js";
import type { WriteResponse } from "../src/gen/google/bytestream/bytestream.js";
import { type Clients, connect } from "../test/support/farm.js";
import { type BenchContext, sha256Digest } from "./context.js";
import { spawnNullServer } from "./null-server.js";
import { ratio, type Section, verdictAtLeast } from "./report.js";
import { type CpuUse, measureCpu } from "./server.js";
import { elapsedMs, fmt, fmtList, MB, MiB, max, median, min } from "./stats.js";

const run = promisify(execFile);

const BLOB_BYTES = 256 * MiB;
const CHUNK_BYTES = 1 * MiB;
const WARMUP_BYTES = 32 * MiB;
/** The copy command of the reference; --reflink=never keeps a CoW file system from skipping the copy. */
const COPY_ARGS = ["--reflink=never"];
const TARGET_RATIO = 1 / 3;

/** Uploads `data` as the blob `digest` in CHUNK_BYTES requests, honouring the stream's backpressure. */
export async function byteStreamWrite(clients: Clients, digest: Digest, data: Buffer): Promise<void> {
  const resourceName = formatWriteResourceName("", randomUUID(), digest);
  let call: ReturnType<Clients["byteStream"]["write"]> | undefined;
  const answered = new Promise<WriteResponse>((resolve, reject) => {
    call = clients.byteStream.write((err, response) => (err ? reject(err) : resolve(response)));
  });
  if (!call) throw new Error("ByteStream.Write did not start");
  const stream = call;
  const send = async () => {
    for (let offset = 0; offset < data.byteLength; offset += CHUNK_BYTES) {
      const end = Math.min(offset + CHUNK_BYTES, data.byteLength);
      const writable = stream.write({
        resourceName: offset === 0 ? resourceName : "",
        writeOffset: offset,
        finishWrite: end === data.byteLength,
        data: data.subarray(offset, end),
      });
      // Stop waiting if the server answers (e.g. with an error) before the stream drains.
      if (!writable) await Promise.race([once(stream, "drain"), answered]);
    }
    stream.end();
  };
  const [response] = await Promise.all([answered, send()]);
  if (response.committedSize !== data.byteLength) {
    throw new Error(`ByteStream.Write committed ${response.committedSize} of ${data.byteLength} bytes`);
  }
}

/** Downloads the blob `digest`; returns the chunks as received. */
export async function byteStreamRead(clients: Clients, digest: Digest): Promise<Buffer[]> {
  const stream = clients.byteStream.read({
    resourceName: formatReadResourceName("", digest),
    readOffset: 0,
    readLimit: 0,
  });
  const chunks: Buffer[] = [];
  for await (const response of stream) chunks.push((response as { data: Buffer }).data);
  return chunks;
}

function sameBytes(chunks: readonly Buffer[], expected: Buffer): boolean {
  let offset = 0;
  for (const chunk of chunks) {
    if (!chunk.equals(expected.subarray(offset, offset + chunk.byteLength))) return false;
    offset += chunk.byteLength;
  }
  return offset === expected.byteLength;
}

/** Makes `data` a blob no earlier round stored, by overwriting its first bytes. */
function mutate(data: Buffer): Digest {
  randomFillSync(data, 0, 32);
  return sha256Digest(data);
}

const WHERE_THE_TIME_GOES =
  "Where the time goes (server CPU profiles taken with `--server-cpu-prof`): the server widens its HTTP/2 " +
  "receive windows to 16 MiB (grpc-js's default of 64 KiB would let a client have only that much of an upload " +
  "in flight) and decodes WriteRequest and encodes ReadResponse by hand (src/api/bytestream-codec.ts) so each " +
  "1 MiB chunk is copied once rather than three times; file writes overlap the hashing of the next chunks. " +
  "What remains is grpc-js's own framing and HTTP/2 flow control, SHA-256 on the main thread (about 0.6 ms per " +
  "MiB) and the page-cache copy of the file system.";

function ceilingNote(writeRatio: number, readRatio: number): string {
  const both = `The null server reaches ${fmt(writeRatio, 2)}× (Write) and ${fmt(readRatio, 2)}× (Read) of cp`;
  if (writeRatio < TARGET_RATIO && readRatio < TARGET_RATIO) {
    return `${both}: the target is out of reach of this gRPC stack on one stream, whatever a server does with the bytes.`;
  }
  return `${both}: the gap between it and Berth is Berth's own cost.`;
}

async function copyFile(source: string, target: string): Promise<number> {
  const start = process.hrtime.bigint();
  await run("cp", [...COPY_ARGS, source, target]);
  return elapsedMs(start);
}

export async function benchByteStream(ctx: BenchContext): Promise<Section> {
  const { clients, serverPid, scratchDir } = ctx;
  const blob = randomFillSync(Buffer.allocUnsafe(BLOB_BYTES));
  // Copies are kept until the end, as Berth keeps its blobs: on this VM, writing into pages just
  // freed (by deleting the previous copy) is several times faster than into fresh ones.
  const copyDir = join(scratchDir, "copies");
  await mkdir(copyDir);
  ctx.defer(() => rm(copyDir, { recursive: true, force: true }));
  let copies = 0;
  const source = join(copyDir, "source.bin");
  const nullServer = await spawnNullServer();
  ctx.defer(async () => {
    await nullServer.stop();
  });
  const nullClients = connect(nullServer.address);
  ctx.defer(async () => nullClients.close());

  // Warm-up: connections, JIT and the servers' code paths, on a smaller blob.
  const warm = Buffer.from(blob.subarray(0, WARMUP_BYTES));
  const warmDigest = mutate(warm);
  await byteStreamWrite(clients, warmDigest, warm);
  if (!sameBytes(await byteStreamRead(clients, warmDigest), warm)) throw new Error("warm-up read differs");
  await byteStreamWrite(nullClients, warmDigest, warm);
  await byteStreamRead(nullClients, warmDigest);
  await writeFile(source, warm);
  await copyFile(source, join(copyDir, "warm-up.bin"));

  const writeMBs: number[] = [];
  const readMBs: number[] = [];
  const copyMBs: number[] = [];
  const nullWriteMBs: number[] = [];
  const nullReadMBs: number[] = [];
  /** CPU use per round, as fractions of a core over the timed interval. */
  const writeCpu: CpuUse[] = [];
  const readCpu: CpuUse[] = [];
  const mbps = (ms: number) => BLOB_BYTES / MB / (ms / 1000);
  const timedCpu = async <T>(work: () => Promise<T>, rates: number[], uses: CpuUse[]): Promise<T> => {
    const start = process.hrtime.bigint();
    const [result, use] = await measureCpu(serverPid, work);
    const seconds = elapsedMs(start) / 1000;
    rates.push(BLOB_BYTES / MB / seconds);
    uses.push({ server: use.server / seconds, client: use.client / seconds });
    return result;
  };
  const copy = async () => {
    copyMBs.push(mbps(await copyFile(source, join(copyDir, `copy-${++copies}.bin`))));
  };

  for (let round = 0; round < ctx.rounds; round++) {
    const digest = mutate(blob);
    await writeFile(source, blob);
    // Start every round with nothing waiting to be written back, whatever the previous one left.
    await run("sync", []);
    const berth = async () => {
      // A copy next to each Berth transfer: cp's speed on this VM changes from one moment to the next.
      await copy();
      await timedCpu(() => byteStreamWrite(clients, digest, blob), writeMBs, writeCpu);
      await copy();
      const chunks = await timedCpu(() => byteStreamRead(clients, digest), readMBs, readCpu);
      await copy();
      if (!sameBytes(chunks, blob)) throw new Error(`round ${round}: the blob read back differs from the one written`);
    };
    const ceiling = async () => {
      let start = process.hrtime.bigint();
      await byteStreamWrite(nullClients, digest, blob);
      nullWriteMBs.push(mbps(elapsedMs(start)));
      start = process.hrtime.bigint();
      await byteStreamRead(nullClients, digest);
      nullReadMBs.push(mbps(elapsedMs(start)));
    };
    if (round % 2 === 0) {
      await berth();
      await ceiling();
    } else {
      await ceiling();
      await berth();
    }
    ctx.log(
      `  round ${round + 1}/${ctx.rounds}: write ${fmt(writeMBs.at(-1) ?? 0)} MB/s, ` +
        `read ${fmt(readMBs.at(-1) ?? 0)} MB/s, cp ${fmtList(copyMBs.slice(-3), 0)} MB/s, ` +
        `null server write ${fmt(nullWriteMBs.at(-1) ?? 0)} read ${fmt(nullReadMBs.at(-1) ?? 0)} MB/s`,
    );
  }
  nullClients.close();
  await nullServer.stop();

  const write = median(writeMBs);
  const read = median(readMBs);
  const copyRate = median(copyMBs);
  const nullWrite = median(nullWriteMBs);
  const nullRead = median(nullReadMBs);
  const copyText = `${fmt(copyRate)} MB/s (cp)`;
  const cpuText = (uses: CpuUse[]) => {
    const server = median(uses.map((u) => u.server));
    const client = median(uses.map((u) => u.client));
    return `server ${Math.round(server * 100)} %, client ${Math.round(client * 100)} % of a core`;
  };
  return {
    title: "ByteStream Write and Read of a 256 MiB blob",
    setup: [
      `One blob of ${BLOB_BYTES / MiB} MiB of random bytes; each round overwrites its first 32 bytes with new random ` +
        "bytes, so every round uploads a blob the server does not have yet, under a new upload id.",
      `Write: one ByteStream.Write stream of ${BLOB_BYTES / CHUNK_BYTES} WriteRequests of ${CHUNK_BYTES / MiB} MiB, ` +
        "honouring the stream's backpressure, timed until the WriteResponse arrives (the server has hashed, " +
        "verified and committed the blob). Read: ByteStream.Read of the same blob right after, timed until the " +
        "stream ends; the bytes are compared with the original after the clock stops. The client is " +
        "`connect()` of test/support/farm.ts: grpc-js with a 1 MiB HTTP/2 receive window, the default of " +
        "grpc-java, which Bazel uses (grpc-js's own default is 64 KiB).",
      `Reference: \`cp ${COPY_ARGS.join(" ")} SOURCE TARGET\` (GNU coreutils, the command, run with ` +
        "child_process.execFile) of a file with the same bytes, in the same temporary directory as the server's " +
        "data directory. The source was just written, so it is read from the page cache, as the server reads " +
        "the blob it just stored; neither side calls fsync. cp runs before the Write, between Write and Read " +
        "and after the Read of every round, and its median over all those copies is the reference. Each copy " +
        "gets a new target that is kept until the end of the benchmark, as Berth keeps its blobs, and every " +
        "round starts after a `sync` (untimed), so no round inherits the previous one's writeback.",
      "Ceiling, for information: the same client against a ByteStream server that stores nothing " +
        "(bench/null-server.ts, a separate process with grpc-js and the generated code configured as Berth's " +
        "server: Write drops the bytes, Read streams them from memory). It is what gRPC alone costs here.",
      `${ctx.rounds} rounds after a ${WARMUP_BYTES / MiB} MiB warm-up; Berth and the null server alternate in ` +
        "going first. MB/s means 10^6 bytes per second.",
    ],
    rows: [
      {
        metric: "Write throughput",
        berth: `${fmt(write)} MB/s`,
        reference: copyText,
        ratio: ratio(write, copyRate),
        target: "≥ 0.33× cp",
        verdict: verdictAtLeast(write / copyRate, TARGET_RATIO),
      },
      {
        metric: "Read throughput",
        berth: `${fmt(read)} MB/s`,
        reference: copyText,
        ratio: ratio(read, copyRate),
        target: "≥ 0.33× cp",
        verdict: verdictAtLeast(read / copyRate, TARGET_RATIO),
      },
      {
        metric: "Write vs gRPC ceiling",
        berth: `${fmt(write)} MB/s`,
        reference: `${fmt(nullWrite)} MB/s (null server)`,
        ratio: ratio(write, nullWrite),
        target: "none set",
        verdict: "—",
      },
      {
        metric: "Read vs gRPC ceiling",
        berth: `${fmt(read)} MB/s`,
        reference: `${fmt(nullRead)} MB/s (null server)`,
        ratio: ratio(read, nullRead),
        target: "none set",
        verdict: "—",
      },
    ],
    notes: [
      `Per round, MB/s: Write ${fmtList(writeMBs, 0)}; Read ${fmtList(readMBs, 0)}; ` +
        `null server Write ${fmtList(nullWriteMBs, 0)}, Read ${fmtList(nullReadMBs, 0)}.`,
      `cp, every copy in order, MB/s: ${fmtList(copyMBs, 0)} (min ${fmt(min(copyMBs))}, max ${fmt(max(copyMBs))}).`,
      ceilingNote(nullWrite / copyRate, nullRead / copyRate),
      `CPU use while timed (median of rounds): Write ${cpuText(writeCpu)}; Read ${cpuText(readCpu)}. ` +
        "Server CPU counts all its threads (the file writes run on libuv's thread pool).",
      ...(write / copyRate < TARGET_RATIO || read / copyRate < TARGET_RATIO ? [WHERE_THE_TIME_GOES] : []),
    ],
  };
}
