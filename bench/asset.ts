import { execFile } from "node:child_process";
import { createHash, randomFillSync } from "node:crypto";
import { mkdir, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import type { Digest } from "../src/digest/digest.js";
import { SHA256 } from "../src/digest/functions.js";
import {
  FetchBlobRequest,
  type FetchBlobResponse,
  type FetchClient,
} from "../src/gen/build/bazel/remote/asset/v1/remote_asset.js";
import { byteStreamRead } from "./bytestream.js";
import { type BenchContext, sha256Digest } from "./context.js";
import { spawnFileOrigin } from "./file-origin.js";
import { ratio, type Section, verdictAtLeast } from "./report.js";
import { type BenchServer, startBenchServer } from "./server.js";
import { elapsedMs, fmt, fmtList, MB, MiB, median } from "./stats.js";

const run = promisify(execFile);

const ASSET_BYTES = 64 * MiB;
const CACHED_TARGET = 0.9;
const COLD_TARGET = 0.7;
/**
 * A 64 MiB read takes a few hundred milliseconds and varies by half from one to the next on this VM, more than
 * FetchBlob's cost; several pairs per round make the medians steady.
 */
const CACHED_PAIRS_PER_ROUND = 3;

/** The checksum.sri qualifier Bazel sends with a pinned sha256. */
function sri(data: Buffer): string {
  return `sha256-${createHash("sha256").update(data).digest("base64")}`;
}

/** FetchBlob of `uri` with its checksum (computed beforehand: hashing 64 MiB is not the server's time). */
function fetchBlob(fetch: FetchClient, uri: string, checksum: string): Promise<Digest> {
  return new Promise((resolve, reject) => {
    fetch.fetchBlob(
      FetchBlobRequest.fromPartial({ uris: [uri], qualifiers: [{ name: "checksum.sri", value: checksum }] }),
      (err: Error | null, response: FetchBlobResponse) => {
        if (err) return reject(err);
        const code = response.status?.code ?? 0;
        if (code !== 0) return reject(new Error(`FetchBlob ${uri}: status ${code} ${response.status?.message}`));
        const digest = response.blobDigest;
        if (!digest) return reject(new Error(`FetchBlob ${uri}: no blob digest`));
        resolve({ fn: SHA256, hash: digest.hash, sizeBytes: digest.sizeBytes });
      },
    );
  });
}

function sameBytes(chunks: readonly Buffer[], expected: Buffer): boolean {
  let offset = 0;
  for (const chunk of chunks) {
    if (!chunk.equals(expected.subarray(offset, offset + chunk.byteLength))) return false;
    offset += chunk.byteLength;
  }
  return offset === expected.byteLength;
}

/** Makes `data` content no earlier round fetched, by overwriting its first bytes. */
function mutate(data: Buffer): void {
  randomFillSync(data, 0, 32);
}

export async function benchAsset(ctx: BenchContext, options: { cpuProfileDir?: string } = {}): Promise<Section> {
  // The origin: a file server in a process of its own, serving a directory on the same disk.
  const originDir = join(ctx.scratchDir, "origin");
  await mkdir(originDir);
  ctx.defer(() => rm(originDir, { recursive: true, force: true }));
  const http = await spawnFileOrigin(originDir);
  ctx.defer(async () => {
    await http.stop();
  });
  const put = (name: string, content: Buffer) => writeFile(join(originDir, name), content);
  const host = new URL(http.origin).host;
  // A server of its own, allowed to fetch from that origin (loopback, so over plain http).
  const dir = join(ctx.scratchDir, "asset");
  await mkdir(dir);
  const server: BenchServer = await startBenchServer({
    workDir: dir,
    casMaxSizeBytes: "4GiB",
    cpuProfileDir: options.cpuProfileDir,
    extraConfig: assetConfig(host),
  });
  ctx.defer(() => server.stop());
  const fetch = server.clients.fetch;
  const curlDir = join(ctx.scratchDir, "curl");
  await mkdir(curlDir);
  ctx.defer(() => rm(curlDir, { recursive: true, force: true }));

  const data = randomFillSync(Buffer.allocUnsafe(ASSET_BYTES));
  const mbps = (ms: number) => ASSET_BYTES / MB / (ms / 1000);

  // Warm-up: connections, JIT, both code paths, curl's first start.
  await put("warm.bin", data);
  const warmDigest = await fetchBlob(fetch, `${http.origin}/warm.bin`, sri(data));
  if (!sameBytes(await byteStreamRead(server.clients, warmDigest), data)) throw new Error("warm-up read differs");
  await run("curl", ["-sSf", "-o", join(curlDir, "warm.bin"), `${http.origin}/warm.bin`]);

  // 1. The cached asset: the bytes a client gets through the asset API (FetchBlob, then ByteStream.Read of the
  // digest it names) vs ByteStream.Read alone.
  mutate(data);
  const cachedPath = "/cached.bin";
  await put("cached.bin", data);
  const cachedUri = `${http.origin}${cachedPath}`;
  const cachedSri = sri(data);
  const cachedDigest = await fetchBlob(fetch, cachedUri, cachedSri);
  const expected = sha256Digest(data);
  if (cachedDigest.hash !== expected.hash) throw new Error("FetchBlob named another blob than the one served");
  const servedBefore = await http.served();
  const assetMBs: number[] = [];
  const readMBs: number[] = [];
  const fetchOnlyMs: number[] = [];
  for (let round = 0; round < ctx.rounds; round++) {
    for (let pair = 0; pair < CACHED_PAIRS_PER_ROUND; pair++) {
      const viaAsset = async () => {
        const start = process.hrtime.bigint();
        const digest = await fetchBlob(fetch, cachedUri, cachedSri);
        fetchOnlyMs.push(elapsedMs(start));
        const chunks = await byteStreamRead(server.clients, digest);
        assetMBs.push(mbps(elapsedMs(start)));
        if (!sameBytes(chunks, data)) throw new Error(`round ${round}: the asset's bytes differ`);
      };
      const readAlone = async () => {
        const start = process.hrtime.bigint();
        const chunks = await byteStreamRead(server.clients, expected);
        readMBs.push(mbps(elapsedMs(start)));
        if (!sameBytes(chunks, data)) throw new Error(`round ${round}: the blob's bytes differ`);
      };
      if ((round * CACHED_PAIRS_PER_ROUND + pair) % 2 === 0) {
        await viaAsset();
        await readAlone();
      } else {
        await readAlone();
        await viaAsset();
      }
    }
    const last = (values: number[]) => fmtList(values.slice(-CACHED_PAIRS_PER_ROUND), 0);
    ctx.log(
      `  cached round ${round + 1}/${ctx.rounds}: FetchBlob + Read ${last(assetMBs)} MB/s ` +
        `(FetchBlob ${fmtList(fetchOnlyMs.slice(-CACHED_PAIRS_PER_ROUND), 1)} ms), Read alone ${last(readMBs)} MB/s`,
    );
  }
  const servedDuring = (await http.served()) - servedBefore;
  if (servedDuring !== 0) throw new Error(`FetchBlob of a cached asset went to the origin (${servedDuring} requests)`);

  // 2. The cold fetch: FetchBlob of a URI the farm never saw (it downloads the file into its CAS) vs curl.
  const coldMBs: number[] = [];
  const curlMBs: number[] = [];
  const curlSyncMBs: number[] = [];
  for (let round = 0; round < ctx.rounds; round++) {
    mutate(data);
    const path = `/cold-${round}.bin`;
    const content = data;
    await put(path.slice(1), content);
    const uri = `${http.origin}${path}`;
    const checksum = sri(content);
    const cold = async () => {
      const start = process.hrtime.bigint();
      const digest = await fetchBlob(fetch, uri, checksum);
      coldMBs.push(mbps(elapsedMs(start)));
      if (digest.hash !== sha256Digest(content).hash) throw new Error(`round ${round}: FetchBlob named another blob`);
    };
    const curl = async () => {
      const start = process.hrtime.bigint();
      await run("curl", ["-sSf", "-o", join(curlDir, `cold-${round}.bin`), uri]);
      curlMBs.push(mbps(elapsedMs(start)));
    };
    // As durable as the CAS keeps a blob: `sync FILE` (coreutils) fsyncs that file.
    const curlThenSync = async () => {
      const file = join(curlDir, `cold-${round}-synced.bin`);
      const start = process.hrtime.bigint();
      await run("curl", ["-sSf", "-o", file, uri]);
      await run("sync", [file]);
      curlSyncMBs.push(mbps(elapsedMs(start)));
    };
    // Each side starts with nothing waiting to be written back: on ext4, an fsync may have to write out
    // other files' dirty pages too, and the side going second would pay for the first.
    const sides = [cold, curl, curlThenSync];
    for (let i = 0; i < sides.length; i++) {
      await run("sync", []);
      await (sides[(round + i) % sides.length] as () => Promise<void>)();
    }
    ctx.log(
      `  cold round ${round + 1}/${ctx.rounds}: FetchBlob ${fmt(coldMBs.at(-1) ?? 0)} MB/s, ` +
        `curl ${fmt(curlMBs.at(-1) ?? 0)} MB/s, curl + sync ${fmt(curlSyncMBs.at(-1) ?? 0)} MB/s`,
    );
  }
  await server.stop();
  await http.stop();

  const viaAsset = median(assetMBs);
  const readAlone = median(readMBs);
  const coldRate = median(coldMBs);
  const curlRate = median(curlMBs);
  const curlSyncRate = median(curlSyncMBs);
  return {
    title: "Remote Asset API: FetchBlob of a 64 MiB asset, cached and cold",
    setup: [
      `One asset of ${ASSET_BYTES / MiB} MiB of random bytes, a file served by a loopback HTTP file server ` +
        "(bench/file-origin.ts: node:http in a process of its own, the file in the page cache); Berth is a " +
        "`berth serve` of its own, configured to fetch from that host over plain http. Every FetchBlob carries the URI and a `checksum.sri` qualifier, as Bazel's " +
        "`--experimental_remote_downloader` sends them.",
      "Cached: the asset was fetched once before the rounds. FetchBlob answers with a digest only, so what a " +
        "client does to get the bytes through the asset API is FetchBlob, then ByteStream.Read of the digest it " +
        "names; that whole path is timed and compared with ByteStream.Read alone of the same blob (the ratio is " +
        "the asset path's throughput over Read's). The origin is checked to have received no request during " +
        `the rounds. ${CACHED_PAIRS_PER_ROUND} pairs per round, the side going first alternating.`,
      "Cold: every round serves a new file (its first 32 bytes new random bytes) under a new URI; FetchBlob is " +
        "timed until it answers (the server has downloaded the file, hashed and verified it against the " +
        "checksum and stored it in its CAS). Berth downloads with curl too: a child process under `prlimit`, " +
        "configured on its stdin, writing the body into a file of the data directory that the server hashes " +
        "as it grows and then renames into the CAS; one such curl is started ahead between downloads " +
        "(src/asset/curl-launcher.ts), as a running farm has it. Reference: `curl -sSf -o FILE URL` of the same file into the same " +
        "file system, timed as a command (process start included). For information, also `curl` followed by " +
        "`sync FILE`: a download on disk before it ends; Berth, like curl, answers before a downloaded asset is " +
        "flushed (it is flushed in the background, as the write-behind association naming it). The three " +
        "take turns in going first, and each starts after a `sync` (untimed), so none pays for another's " +
        "writeback.",
      `${ctx.rounds} rounds after a warm-up. MB/s means 10^6 bytes per second.`,
    ],
    rows: [
      {
        metric: "Cached asset: FetchBlob + ByteStream.Read",
        berth: `${fmt(viaAsset)} MB/s`,
        reference: `${fmt(readAlone)} MB/s (ByteStream.Read alone)`,
        ratio: ratio(viaAsset, readAlone),
        target: `≥ ${CACHED_TARGET}× Read`,
        verdict: verdictAtLeast(viaAsset / readAlone, CACHED_TARGET),
      },
      {
        metric: "Cached asset: FetchBlob alone",
        berth: `${fmt(median(fetchOnlyMs))} ms`,
        reference: "—",
        ratio: "—",
        target: "none set",
        verdict: "—",
      },
      {
        metric: "Cold fetch from a loopback HTTP server",
        berth: `${fmt(coldRate)} MB/s`,
        reference: `${fmt(curlRate)} MB/s (curl)`,
        ratio: ratio(coldRate, curlRate),
        target: `≥ ${COLD_TARGET}× curl`,
        verdict: verdictAtLeast(coldRate / curlRate, COLD_TARGET),
      },
      {
        metric: "Cold fetch vs a download flushed to disk",
        berth: `${fmt(coldRate)} MB/s`,
        reference: `${fmt(curlSyncRate)} MB/s (curl, then sync FILE)`,
        ratio: ratio(coldRate, curlSyncRate),
        target: "none set",
        verdict: "—",
      },
    ],
    notes: [
      `Per round, MB/s: FetchBlob + Read ${fmtList(assetMBs, 0)}; Read alone ${fmtList(readMBs, 0)}; ` +
        `FetchBlob alone ms ${fmtList(fetchOnlyMs, 1)}.`,
      `Per round, MB/s: cold FetchBlob ${fmtList(coldMBs, 0)}; curl ${fmtList(curlMBs, 0)}; ` +
        `curl + sync ${fmtList(curlSyncMBs, 0)}.`,
    ],
  };
}

/** The farm may fetch from the benchmark's HTTP server (loopback, so plain http is allowed) and nowhere else. */
function assetConfig(host: string): string {
  return `asset:\n  fetch:\n    allowedHosts: ["${host}"]\n`;
}
