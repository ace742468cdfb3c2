import { randomBytes } from "node:crypto";
import type { Digest } from "../src/digest/digest.js";
import { SHA256 } from "../src/digest/functions.js";
import {
  type ActionResult,
  DigestFunction_Value,
  type FindMissingBlobsRequest,
  type FindMissingBlobsResponse,
  type GetActionResultRequest,
} from "../src/gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Clients } from "../test/support/farm.js";
import { unaryCall } from "../test/support/rpc.js";
import { getCapabilities, randomBlobs, sendBatches, toBatches } from "./batch.js";
import { type BenchContext, sha256Digest, wire } from "./context.js";
import { ratio, type Section, verdictAtMost } from "./report.js";
import { measureCpu } from "./server.js";
import { elapsedMs, fmt, fmtList, KiB, median, percentile } from "./stats.js";

const FIND_DIGESTS = 10_000;
const FIND_CALLS = 40;
const FIND_WARMUP = 5;
const FIND_TARGET_MS = 50;

const GET_CALLS = 2000;
const GET_WARMUP = 200;
const GET_TARGET_MS = 1;

async function timed<T>(work: () => Promise<T>): Promise<[T, number]> {
  const start = process.hrtime.bigint();
  const result = await work();
  return [result, elapsedMs(start)];
}

/** A GetCapabilities round trip: the cost of any unary call on this connection, the latency floor. */
async function emptyCall(clients: Clients): Promise<number> {
  const [, ms] = await timed(() => getCapabilities(clients));
  return ms;
}

function shuffle<T>(items: T[]): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [items[i], items[j]] = [items[j] as T, items[i] as T];
  }
  return items;
}

export async function benchFindMissing(ctx: BenchContext, stored: readonly Digest[]): Promise<Section> {
  const { clients } = ctx;
  const presentCount = Math.min(FIND_DIGESTS / 2, stored.length);
  const present = stored.slice(0, presentCount);
  const absent: Digest[] = Array.from({ length: FIND_DIGESTS - presentCount }, () => ({
    fn: SHA256,
    hash: randomBytes(32).toString("hex"),
    sizeBytes: present[0]?.sizeBytes ?? 4 * KiB,
  }));
  const request: FindMissingBlobsRequest = {
    instanceName: "",
    blobDigests: shuffle([...present, ...absent].map(wire)),
    digestFunction: DigestFunction_Value.SHA256,
  };
  const call = async () => {
    const response: FindMissingBlobsResponse = await unaryCall(clients.cas.findMissingBlobs.bind(clients.cas), request);
    if (response.missingBlobDigests.length !== absent.length) {
      throw new Error(`FindMissingBlobs reported ${response.missingBlobDigests.length} missing, not ${absent.length}`);
    }
  };
  for (let i = 0; i < FIND_WARMUP; i++) {
    await call();
    await emptyCall(clients);
  }
  const berth: number[] = [];
  const floor: number[] = [];
  const [, cpu] = await measureCpu(ctx.serverPid, async () => {
    for (let i = 0; i < FIND_CALLS; i++) {
      berth.push((await timed(call))[1]);
      floor.push(await emptyCall(clients));
    }
  });
  const p50 = median(berth);
  const p90 = percentile(berth, 90);
  const floorP50 = median(floor);
  const floorP90 = percentile(floor, 90);
  ctx.log(`  FindMissingBlobs p50 ${fmt(p50)} ms, p90 ${fmt(p90)} ms (GetCapabilities p50 ${fmt(floorP50)} ms)`);
  const serverMsPerCall = (cpu.server * 1000) / FIND_CALLS;
  const clientMsPerCall = (cpu.client * 1000) / FIND_CALLS;
  return {
    title: "FindMissingBlobs of 10,000 digests",
    setup: [
      `One request of ${FIND_DIGESTS.toLocaleString("en-US")} SHA-256 digests, shuffled: ${presentCount.toLocaleString("en-US")} ` +
        `blobs stored by the BatchUpdateBlobs benchmark and ${absent.length.toLocaleString("en-US")} random digests ` +
        "that are missing; each answer is checked to list exactly the missing ones.",
      `${FIND_CALLS} sequential calls after ${FIND_WARMUP} warm-up calls, timed at the client from sending the ` +
        "request to decoding the response.",
      "Reference: a GetCapabilities round trip on the same connection, alternating call by call with " +
        "FindMissingBlobs: the fixed cost of any unary gRPC call here.",
    ],
    rows: [
      {
        metric: "Latency p50",
        berth: `${fmt(p50)} ms`,
        reference: `${fmt(floorP50)} ms (GetCapabilities)`,
        ratio: ratio(p50, floorP50),
        target: `≤ ${FIND_TARGET_MS} ms`,
        verdict: verdictAtMost(p50, FIND_TARGET_MS),
      },
      {
        metric: "Latency p90",
        berth: `${fmt(p90)} ms`,
        reference: `${fmt(floorP90)} ms (GetCapabilities)`,
        ratio: ratio(p90, floorP90),
        target: `≤ ${FIND_TARGET_MS} ms`,
        verdict: verdictAtMost(p90, FIND_TARGET_MS),
      },
    ],
    notes: [
      `All ${FIND_CALLS} latencies, ms: ${fmtList(berth, 1)}.`,
      `CPU per call (FindMissingBlobs plus one GetCapabilities): server ${fmt(serverMsPerCall)} ms, client ` +
        `${fmt(clientMsPerCall)} ms.`,
    ],
  };
}

export async function benchGetActionResult(ctx: BenchContext): Promise<Section> {
  const { clients } = ctx;
  // An action result like a small compile's: two output files and stdout, all stored in the CAS.
  const [objectFile, depFile, stdout] = [
    randomBlobs(1, 48 * KiB)[0],
    randomBlobs(1, 2 * KiB)[0],
    { data: Buffer.from("compiling foo.c\n"), digest: sha256Digest(Buffer.from("compiling foo.c\n")) },
  ];
  if (!objectFile || !depFile) throw new Error("no blobs");
  await sendBatches(clients, toBatches([objectFile, depFile, stdout], 0), 1);
  const actionDigest = wire(sha256Digest(randomBytes(200)));
  const result: ActionResult = {
    outputFiles: [
      {
        path: "out/foo.o",
        digest: wire(objectFile.digest),
        isExecutable: false,
        contents: Buffer.alloc(0),
        nodeProperties: undefined,
      },
      {
        path: "out/foo.d",
        digest: wire(depFile.digest),
        isExecutable: false,
        contents: Buffer.alloc(0),
        nodeProperties: undefined,
      },
    ],
    outputFileSymlinks: [],
    outputSymlinks: [],
    outputDirectories: [],
    outputDirectorySymlinks: [],
    exitCode: 0,
    stdoutRaw: Buffer.alloc(0),
    stdoutDigest: wire(stdout.digest),
    stderrRaw: Buffer.alloc(0),
    stderrDigest: undefined,
    executionMetadata: undefined,
  };
  await unaryCall(clients.ac.updateActionResult.bind(clients.ac), {
    instanceName: "",
    actionDigest,
    actionResult: result,
    resultsCachePolicy: undefined,
    digestFunction: DigestFunction_Value.SHA256,
  });
  const request: GetActionResultRequest = {
    instanceName: "",
    actionDigest,
    inlineStdout: false,
    inlineStderr: false,
    inlineOutputFiles: [],
    digestFunction: DigestFunction_Value.SHA256,
  };
  const call = async () => {
    const answer: ActionResult = await unaryCall(clients.ac.getActionResult.bind(clients.ac), request);
    if (answer.exitCode !== 0 || answer.outputFiles.length !== 2) throw new Error("unexpected GetActionResult answer");
  };
  for (let i = 0; i < GET_WARMUP; i++) {
    await call();
    await emptyCall(clients);
  }
  const berth: number[] = [];
  const floor: number[] = [];
  const roundP50s: number[] = [];
  const perRound = Math.ceil(GET_CALLS / ctx.rounds);
  const [, cpu] = await measureCpu(ctx.serverPid, async () => {
    for (let i = 0; i < GET_CALLS; i++) {
      berth.push((await timed(call))[1]);
      floor.push(await emptyCall(clients));
      if ((i + 1) % perRound === 0 || i === GET_CALLS - 1) {
        roundP50s.push(median(berth.slice(roundP50s.length * perRound)));
      }
    }
  });
  const p50 = median(berth);
  const p90 = percentile(berth, 90);
  const p99 = percentile(berth, 99);
  const floorP50 = median(floor);
  const floorP90 = percentile(floor, 90);
  const floorP99 = percentile(floor, 99);
  ctx.log(`  GetActionResult p50 ${fmt(p50)} ms, p99 ${fmt(p99)} ms (GetCapabilities p50 ${fmt(floorP50)} ms)`);
  const row = (metric: string, value: number, reference: number, target: boolean) => ({
    metric,
    berth: `${fmt(value)} ms`,
    reference: `${fmt(reference)} ms (GetCapabilities)`,
    ratio: ratio(value, reference),
    target: target ? `≤ ${GET_TARGET_MS} ms` : "none set",
    verdict: target ? verdictAtMost(value, GET_TARGET_MS) : ("—" as const),
  });
  return {
    title: "GetActionResult of a stored entry",
    setup: [
      "One entry stored with UpdateActionResult: exit code 0, two output files (48 KiB and 2 KiB) and stdout, " +
        "whose blobs were uploaded first. Every call is a hit; the server reads the entry from disk, decodes it " +
        "and checks that its blobs are still in the CAS. Nothing is requested inline.",
      `${GET_CALLS.toLocaleString("en-US")} sequential calls after ${GET_WARMUP} warm-up calls, timed at the ` +
        "client; each answer is checked (exit code, two output files).",
      "Reference: a GetCapabilities round trip on the same connection, alternating call by call with " +
        "GetActionResult: the fixed cost of any unary gRPC call here.",
    ],
    rows: [
      row("Latency p50", p50, floorP50, true),
      row("Latency p90", p90, floorP90, false),
      row("Latency p99", p99, floorP99, false),
    ],
    notes: [
      `p50 of each block of ${perRound} consecutive calls, ms: ${fmtList(roundP50s, 3)}.`,
      `CPU per call (GetActionResult plus one GetCapabilities): server ${fmt((cpu.server * 1000) / GET_CALLS)} ms, ` +
        `client ${fmt((cpu.client * 1000) / GET_CALLS)} ms.`,
    ],
  };
}
