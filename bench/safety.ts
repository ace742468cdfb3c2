import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdir, readdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { DiskBlobStore } from "../src/cas/disk-blob-store.js";
import { MemoryCachedBlobStore } from "../src/cas/memory-cached-blob-store.js";
import { DEFAULT_INPUT_TREE_LIMITS } from "../src/cas/tree-limits.js";
import { type Digest, digestKey, parseDigest } from "../src/digest/digest.js";
import { SHA256 } from "../src/digest/functions.js";
import { CheckedDirectories, DEFAULT_CHECKED_DIRECTORY_BYTES } from "../src/execution/checked-directories.js";
import { checkInputTree } from "../src/execution/input-tree.js";
import {
  DigestFunction_Value,
  Directory,
  type FindMissingBlobsResponse,
} from "../src/gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Clients } from "../test/support/farm.js";
import { unaryCall } from "../test/support/rpc.js";
import { getCapabilities, randomBlobs, sendBatches, toBatches } from "./batch.js";
import { type BenchContext, sha256Digest, wire } from "./context.js";
import { type Row, ratio, type Section } from "./report.js";
import { type BenchServer, startBenchServer } from "./server.js";
import { elapsedMs, fmt, fmtList, KiB, MB, MiB, median } from "./stats.js";

const run = promisify(execFile);

const LARGE_COUNT = 200;
const LARGE_BYTES = MiB;
const SMALL_COUNT = 10_000;
const SMALL_BYTES = 4 * KiB;
/** Calls of each FindMissingBlobs once verified, per restart (their median is the round's reference). */
const VERIFIED_CALLS = 3;
/** What farm.ts logs when its background check of the blob files found at start is done, and when it starts. */
const CHECKED_MSG = "checked the blob files found at start";
const OPENED_MSG = "opened storage in";

const TREE_FILES = [1_000, 10_000, 100_000] as const;
const FILES_PER_DIRECTORY = 100;
const DIRECTORIES_PER_GROUP = 10;
/** Checks (and as many plain reads) of each tree per round: about the same work for every size. */
const TREE_WORK_PER_ROUND = 20_000;
const TREE_WARMUP = 2;
/** The farm's own memory cache in front of the disk store: cas.memoryCacheSizeBytes' default, blobs ≤ 64 KiB. */
const MEMORY_CACHE = { maxBlobBytes: 64 * KiB, maxTotalBytes: 64 * MiB };
const FSYNC_RUNS_PER_ROUND = 4;

interface LogLine {
  time: number;
  msg: string;
  checked?: number;
}

async function timed<T>(work: () => Promise<T>): Promise<[T, number]> {
  const start = process.hrtime.bigint();
  const result = await work();
  return [result, elapsedMs(start)];
}

async function findMissing(clients: Clients, digests: readonly Digest[]): Promise<void> {
  const response: FindMissingBlobsResponse = await unaryCall(clients.cas.findMissingBlobs.bind(clients.cas), {
    instanceName: "",
    blobDigests: digests.map(wire),
    digestFunction: DigestFunction_Value.SHA256,
  });
  if (response.missingBlobDigests.length !== 0) {
    throw new Error(`FindMissingBlobs reported ${response.missingBlobDigests.length} of ${digests.length} missing`);
  }
}

/** One restart's measurements of the blob-verification part. */
interface RestartRound {
  firstLarge: number;
  verifiedLarge: number;
  firstSmall: number;
  verifiedSmall: number;
  /** The first calls after a restart with the blob files and the log out of the page cache. */
  coldLarge: number;
  coldSmall: number;
  /** The server's background check of the blob files found at start, from its log: files and ms. */
  background: { checked: number; ms: number };
  /** `openssl dgst -sha256` of the same files, one after the other in one process. */
  opensslMs: number;
}

/**
 * A `berth serve` without workers on a data directory of its own that can be stopped and started again on
 * it; its log lines are kept from the start of each process.
 */
class RestartableServer {
  #server: BenchServer | undefined;
  #lines: LogLine[] = [];
  #waiters: (() => void)[] = [];

  constructor(private readonly workDir: string) {}

  get clients(): Clients {
    if (!this.#server) throw new Error("the server is not running");
    return this.#server.clients;
  }

  get dataDir(): string {
    return join(this.workDir, "data");
  }

  /** Stops the server if it runs, does `meanwhile`, and starts it again on the same data directory. */
  async restart(meanwhile?: () => Promise<void>): Promise<void> {
    await this.stop();
    await meanwhile?.();
    this.#lines = [];
    this.#server = await startBenchServer({
      workDir: this.workDir,
      casMaxSizeBytes: "4GiB",
      workers: 0,
      onLogLine: (line) => {
        try {
          const parsed = JSON.parse(line) as LogLine;
          if (typeof parsed.msg === "string" && typeof parsed.time === "number") this.#lines.push(parsed);
        } catch {
          return;
        }
        for (const wake of this.#waiters.splice(0)) wake();
      },
    });
    // The connection is set up before anything is timed.
    await getCapabilities(this.#server.clients);
  }

  /** The first log line of this process whose msg starts with `prefix`, waiting up to `timeoutMs` for it. */
  async logLine(prefix: string, timeoutMs: number): Promise<LogLine> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.#lines.find((line) => line.msg.startsWith(prefix));
      if (found) return found;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`berth serve did not log "${prefix}" within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.#waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  async stop(): Promise<void> {
    await this.#server?.stop();
    this.#server = undefined;
  }
}

async function restartRounds(ctx: BenchContext): Promise<{ rounds: RestartRound[]; setupMs: number }> {
  const dir = join(ctx.scratchDir, "safety-restart");
  await mkdir(dir);
  const server = new RestartableServer(dir);
  ctx.defer(() => server.stop());
  await server.restart();
  const setupStart = process.hrtime.bigint();
  const caps = await getCapabilities(server.clients);
  const limit = caps.cacheCapabilities?.maxBatchTotalSizeBytes ?? 0;
  // Only the digests are kept: the blobs' bytes are garbage once sent.
  const upload = async (count: number, size: number) => {
    const blobs = randomBlobs(count, size);
    await sendBatches(server.clients, toBatches(blobs, limit), 4);
    return blobs.map((blob) => blob.digest);
  };
  const largeDigests = await upload(LARGE_COUNT, LARGE_BYTES);
  const smallDigests = await upload(SMALL_COUNT, SMALL_BYTES);
  const setupMs = elapsedMs(setupStart);
  const files = largeDigests.map((digest) => join(server.dataDir, "cas", "files", digestKey(digest)));

  const rounds: RestartRound[] = [];
  for (let r = 0; r < ctx.rounds; r++) {
    // A restart asked at once: the first calls find every blob unverified (the large ones being checked in the
    // background meanwhile), the next ones find them verified.
    await server.restart();
    const [, firstLarge] = await timed(() => findMissing(server.clients, largeDigests));
    const [, firstSmall] = await timed(() => findMissing(server.clients, smallDigests));
    const verifiedLarge: number[] = [];
    const verifiedSmall: number[] = [];
    for (let i = 0; i < VERIFIED_CALLS; i++) {
      verifiedLarge.push((await timed(() => findMissing(server.clients, largeDigests)))[1]);
      verifiedSmall.push((await timed(() => findMissing(server.clients, smallDigests)))[1]);
    }
    // A restart left alone: the background check runs by itself, timed from the server's own log.
    await server.restart();
    const opened = await server.logLine(OPENED_MSG, 1000);
    const checked = await server.logLine(CHECKED_MSG, 120_000);
    if (checked.checked !== LARGE_COUNT) {
      throw new Error(`the background check covered ${checked.checked} blob files, not ${LARGE_COUNT}`);
    }
    const [, opensslMs] = await timed(() => run("openssl", ["dgst", "-sha256", ...files], { maxBuffer: 1024 * 1024 }));
    // A restart as after a reboot: the stored bytes are read from the disk again.
    await server.restart(async () => dropFromPageCache([...files, ...(await segmentFiles(server.dataDir))]));
    const [, coldLarge] = await timed(() => findMissing(server.clients, largeDigests));
    const [, coldSmall] = await timed(() => findMissing(server.clients, smallDigests));
    rounds.push({
      firstLarge,
      verifiedLarge: median(verifiedLarge),
      firstSmall,
      verifiedSmall: median(verifiedSmall),
      background: { checked: checked.checked ?? 0, ms: checked.time - opened.time },
      opensslMs,
      coldLarge,
      coldSmall,
    });
    const last = rounds[rounds.length - 1] as RestartRound;
    ctx.log(
      `  round ${r + 1}: FindMissingBlobs ${LARGE_COUNT} × 1 MiB ${fmt(last.firstLarge)} ms first, ` +
        `${fmt(last.verifiedLarge)} ms verified; ${SMALL_COUNT} × 4 KiB ${fmt(last.firstSmall)} ms first, ` +
        `${fmt(last.verifiedSmall)} ms verified; background check ${fmt(last.background.ms)} ms ` +
        `(openssl ${fmt(last.opensslMs)} ms); out of the page cache ${fmt(last.coldLarge)} ms and ` +
        `${fmt(last.coldSmall)} ms first`,
    );
  }
  await server.stop();
  return { rounds, setupMs };
}

/** The small-blob log's segment files. */
async function segmentFiles(dataDir: string): Promise<string[]> {
  const dir = join(dataDir, "cas", "log");
  return (await readdir(dir)).filter((name) => name.endsWith(".log")).map((name) => join(dir, name));
}

/** Evicts the files' pages from the page cache (`dd iflag=nocache count=0`: posix_fadvise DONTNEED; they are clean). */
async function dropFromPageCache(files: readonly string[]): Promise<void> {
  for (const file of files) await run("dd", [`if=${file}`, "iflag=nocache", "count=0", "status=none"]);
}

/**
 * A tree of `count` files: directories of 100 distinct files, ten to a group directory, groups in the root.
 * Also `variants` trees that differ from it in one leaf directory each (one more file there), a different
 * leaf each, as the next action of a build differs from the last: three new Directory messages each.
 */
async function storeTree(
  store: MemoryCachedBlobStore,
  count: number,
  variants = 0,
): Promise<{ root: Digest; variants: Digest[] }> {
  const put = async (directory: Directory): Promise<Digest> => {
    const data = Buffer.from(Directory.encode(directory).finish());
    const digest = sha256Digest(data);
    await store.put(digest, data, { hashedByCaller: true });
    return digest;
  };
  const node = (name: string, digest: Digest) => ({ name, digest: wire(digest), nodeProperties: undefined });
  const empty = { files: [], directories: [], symlinks: [], nodeProperties: undefined };
  const fileNode = (name: string, sizeBytes: number) => ({
    name,
    digest: { hash: randomBytes(32).toString("hex"), sizeBytes },
    isExecutable: false,
    nodeProperties: undefined,
  });
  const leaves = Math.ceil(count / FILES_PER_DIRECTORY);
  const leafFiles: ReturnType<typeof fileNode>[][] = [];
  const groups: { name: string; children: { name: string; digest: Digest }[]; digest: Digest }[] = [];
  for (let g = 0; g * DIRECTORIES_PER_GROUP < leaves; g++) {
    const children: { name: string; digest: Digest }[] = [];
    for (let d = g * DIRECTORIES_PER_GROUP; d < Math.min(leaves, (g + 1) * DIRECTORIES_PER_GROUP); d++) {
      const files = Array.from({ length: Math.min(FILES_PER_DIRECTORY, count - d * FILES_PER_DIRECTORY) }, (_, f) =>
        fileNode(`source_${String(f).padStart(4, "0")}.cc`, 2000 + f),
      );
      leafFiles.push(files);
      children.push({ name: `dir_${String(d).padStart(5, "0")}`, digest: await put({ ...empty, files }) });
    }
    const digest = await put({ ...empty, directories: children.map((c) => node(c.name, c.digest)) });
    groups.push({ name: `group_${String(g).padStart(4, "0")}`, children, digest });
  }
  const rootOf = (gs: { name: string; digest: Digest }[]) =>
    put({ ...empty, directories: gs.map((g) => node(g.name, g.digest)) });
  const variantRoots: Digest[] = [];
  for (let v = 0; v < variants; v++) {
    // Leaves taken far apart, so that no two variants share a new group.
    const d = (v * 7919) % leaves;
    const g = Math.floor(d / DIRECTORIES_PER_GROUP);
    const files = [...(leafFiles[d] ?? []), fileNode(`zz_variant_${v}.cc`, 3000)];
    const leaf = await put({ ...empty, files });
    const group = groups[g] as (typeof groups)[number];
    const children = group.children.map((c, i) => (i === d % DIRECTORIES_PER_GROUP ? { ...c, digest: leaf } : c));
    const groupDigest = await put({ ...empty, directories: children.map((c) => node(c.name, c.digest)) });
    variantRoots.push(await rootOf(groups.map((x, i) => (i === g ? { ...x, digest: groupDigest } : x))));
  }
  return { root: await rootOf(groups), variants: variantRoots };
}

/**
 * The reference: every Directory of the tree read and decoded, level by level and 64 at a time as
 * checkInputTree reads them, with no check at all. Returns the files seen.
 */
async function readTree(store: MemoryCachedBlobStore, root: Digest): Promise<number> {
  let files = 0;
  const seen = new Set<string>([digestKey(root)]);
  let level = [root];
  while (level.length > 0) {
    const next: Digest[] = [];
    for (let at = 0; at < level.length; at += 64) {
      const read = await Promise.all(level.slice(at, at + 64).map((digest) => store.get(digest)));
      for (const bytes of read) {
        if (!bytes) throw new Error("a Directory of the benchmark's tree is missing");
        const directory = Directory.decode(bytes);
        files += directory.files.length;
        for (const child of directory.directories) {
          const digest = parseDigest(SHA256, child.digest, "directory");
          if (seen.has(digestKey(digest))) continue;
          seen.add(digestKey(digest));
          next.push(digest);
        }
      }
    }
    level = next;
  }
  return files;
}

interface TreeResult {
  files: number;
  directories: number;
  check: number[];
  read: number[];
  /** The same tree checked again with the memory of checked directories Execute keeps. */
  again: number[];
  /** A tree differing in one leaf from one checked before, with that memory. */
  oneLeaf: number[];
  /** The median of each round, per side. */
  checkRounds: number[];
  readRounds: number[];
}

async function treeRounds(ctx: BenchContext): Promise<TreeResult[]> {
  const dir = join(ctx.scratchDir, "safety-trees");
  await mkdir(dir);
  const disk = await DiskBlobStore.open(dir, { maxBytes: 4 * 1024 ** 3 });
  ctx.defer(async () => disk.close());
  const store = new MemoryCachedBlobStore(disk, MEMORY_CACHE);
  const trees: { files: number; root: Digest; variants: Digest[]; directories: number }[] = [];
  for (const files of TREE_FILES) {
    const runs = ctx.rounds * Math.max(1, Math.round(TREE_WORK_PER_ROUND / files));
    const { root, variants } = await storeTree(store, files, runs);
    const leaves = Math.ceil(files / FILES_PER_DIRECTORY);
    trees.push({ files, root, variants, directories: 1 + Math.ceil(leaves / DIRECTORIES_PER_GROUP) + leaves });
  }
  // As Execute keeps it (execution.checkedDirectoryCacheBytes' default), shared by every tree.
  const checked = new CheckedDirectories(DEFAULT_CHECKED_DIRECTORY_BYTES);
  const check = async (root: Digest, files: number, memory?: CheckedDirectories) => {
    const totals = await checkInputTree(SHA256, store, root, DEFAULT_INPUT_TREE_LIMITS, memory);
    if (totals.entries < files) throw new Error(`checkInputTree counted ${totals.entries} entries, not ${files}+`);
  };
  const read = async (root: Digest, files: number) => {
    const seen = await readTree(store, root);
    if (seen !== files) throw new Error(`the plain read found ${seen} files, not ${files}`);
  };
  const results: TreeResult[] = trees.map((t) => ({
    files: t.files,
    directories: t.directories,
    check: [],
    read: [],
    again: [],
    oneLeaf: [],
    checkRounds: [],
    readRounds: [],
  }));
  for (const tree of trees) {
    for (let i = 0; i < TREE_WARMUP; i++) {
      await check(tree.root, tree.files);
      await read(tree.root, tree.files);
    }
    // The base tree checked once with the memory: every variant then has all but three Directory messages in it.
    await check(tree.root, tree.files, checked);
  }
  for (let r = 0; r < ctx.rounds; r++) {
    for (const [t, tree] of trees.entries()) {
      const result = results[t] as TreeResult;
      const times = Math.max(1, Math.round(TREE_WORK_PER_ROUND / tree.files));
      // Alternating, and starting with the other side every second round.
      for (let i = 0; i < times; i++) {
        const sides = (i + r) % 2 === 0 ? ["check", "read"] : ["read", "check"];
        for (const side of sides) {
          if (side === "check") result.check.push((await timed(() => check(tree.root, tree.files)))[1]);
          else result.read.push((await timed(() => read(tree.root, tree.files)))[1]);
        }
      }
      // With the memory: the same tree again, then a tree never seen but for one leaf (each variant once).
      for (let i = 0; i < times; i++) {
        result.again.push((await timed(() => check(tree.root, tree.files, checked)))[1]);
        const variant = tree.variants[r * times + i] as Digest;
        result.oneLeaf.push((await timed(() => check(variant, tree.files, checked)))[1]);
      }
      result.checkRounds.push(median(result.check.slice(-times)));
      result.readRounds.push(median(result.read.slice(-times)));
    }
  }
  for (const result of results) {
    ctx.log(
      `  ${result.files.toLocaleString("en-US")} files: checkInputTree p50 ${fmt(median(result.check))} ms, ` +
        `plain read p50 ${fmt(median(result.read))} ms; remembered: again ${fmt(median(result.again))} ms, ` +
        `one leaf changed ${fmt(median(result.oneLeaf))} ms`,
    );
  }
  return results;
}

/**
 * `cp` of a 1 MiB file followed by `sync FILE` (coreutils' fsync of that one file), against `cp` followed by
 * `true FILE`: the same three processes, one flush apart.
 */
async function fsyncRounds(ctx: BenchContext): Promise<{ cp: number[]; cpSync: number[] }> {
  const dir = join(ctx.scratchDir, "safety-fsync");
  await mkdir(dir);
  const source = join(dir, "source");
  await writeFile(source, randomBytes(LARGE_BYTES));
  const copy = (then: "true" | "sync", target: string) =>
    timed(() => run("sh", ["-c", `cp "$1" "$2" && ${then} "$2"`, "sh", source, target]));
  const cp: number[] = [];
  const cpSync: number[] = [];
  for (let i = 0; i < ctx.rounds * FSYNC_RUNS_PER_ROUND; i++) {
    cp.push((await copy("true", join(dir, `plain-${i}`)))[1]);
    cpSync.push((await copy("sync", join(dir, `flushed-${i}`)))[1]);
  }
  return { cp, cpSync };
}

export async function benchSafety(ctx: BenchContext): Promise<Section> {
  const { rounds, setupMs } = await restartRounds(ctx);
  const trees = await treeRounds(ctx);
  const fsync = await fsyncRounds(ctx);

  const pick = (f: (r: RestartRound) => number) => rounds.map(f);
  const firstLarge = median(pick((r) => r.firstLarge));
  const verifiedLarge = median(pick((r) => r.verifiedLarge));
  const firstSmall = median(pick((r) => r.firstSmall));
  const verifiedSmall = median(pick((r) => r.verifiedSmall));
  const backgroundMBps = pick((r) => (r.background.checked * LARGE_BYTES) / MB / (r.background.ms / 1000));
  const opensslMBps = pick((r) => (LARGE_COUNT * LARGE_BYTES) / MB / (r.opensslMs / 1000));
  const none = { target: "none set", verdict: "—" as const };

  const rows: Row[] = [
    {
      metric: `FindMissingBlobs of ${LARGE_COUNT} × 1 MiB blob files, first call after a restart`,
      berth: `${fmt(firstLarge)} ms`,
      reference: `${fmt(verifiedLarge)} ms (the same call once verified)`,
      ratio: ratio(firstLarge, verifiedLarge),
      ...none,
    },
    {
      metric: `FindMissingBlobs of ${SMALL_COUNT.toLocaleString("en-US")} × 4 KiB logged blobs, first call after a restart`,
      berth: `${fmt(firstSmall)} ms`,
      reference: `${fmt(verifiedSmall)} ms (the same call once verified)`,
      ratio: ratio(firstSmall, verifiedSmall),
      ...none,
    },
    {
      metric: `The same first calls after a restart with the files out of the page cache: ${LARGE_COUNT} × 1 MiB`,
      berth: `${fmt(median(pick((r) => r.coldLarge)))} ms`,
      reference: `${fmt(verifiedLarge)} ms (once verified)`,
      ratio: ratio(median(pick((r) => r.coldLarge)), verifiedLarge),
      ...none,
    },
    {
      metric: `… and ${SMALL_COUNT.toLocaleString("en-US")} × 4 KiB`,
      berth: `${fmt(median(pick((r) => r.coldSmall)))} ms`,
      reference: `${fmt(verifiedSmall)} ms (once verified)`,
      ratio: ratio(median(pick((r) => r.coldSmall)), verifiedSmall),
      ...none,
    },
    {
      metric: "Background check of the blob files found at start",
      berth: `${fmt(median(backgroundMBps))} MB/s`,
      reference: `${fmt(median(opensslMBps))} MB/s (openssl dgst -sha256 of the same files)`,
      ratio: ratio(median(backgroundMBps), median(opensslMBps)),
      ...none,
    },
    ...trees.map((t) => ({
      metric: `Input tree check at Execute, ${t.files.toLocaleString("en-US")} files`,
      berth: `${fmt(median(t.check))} ms`,
      reference: `${fmt(median(t.read))} ms (plain read of its ${t.directories.toLocaleString("en-US")} Directory messages)`,
      ratio: `${ratio(median(t.check), median(t.read))} (+${fmt(median(t.check) - median(t.read))} ms)`,
      ...none,
    })),
    ...trees.flatMap((t) => [
      {
        metric: `… the same ${t.files.toLocaleString("en-US")}-file tree checked again (Directory messages remembered)`,
        berth: `${fmt(median(t.again))} ms`,
        reference: `${fmt(median(t.check))} ms (its first check)`,
        ratio: ratio(median(t.again), median(t.check)),
        ...none,
      },
      {
        metric: `… a ${t.files.toLocaleString("en-US")}-file tree differing in one leaf from one checked before`,
        berth: `${fmt(median(t.oneLeaf))} ms`,
        reference: `${fmt(median(t.check))} ms (a first check)`,
        ratio: ratio(median(t.oneLeaf), median(t.check)),
        ...none,
      },
    ]),
    {
      metric: "1 MiB file copied and flushed (cp; sync FILE)",
      berth: `${fmt(median(fsync.cpSync))} ms`,
      reference: `${fmt(median(fsync.cp))} ms (cp; true FILE)`,
      ratio: ratio(median(fsync.cpSync), median(fsync.cp)),
      ...none,
    },
  ];
  return {
    title: "The cost of the safety checks: blob verification after a restart, input tree limits, flushes",
    setup: [
      `A \`berth serve --workers 0\` of its own on a fresh data directory holds ${LARGE_COUNT} random blobs of ` +
        `1 MiB (one file each) and ${SMALL_COUNT.toLocaleString("en-US")} of 4 KiB (in the small-blob log), ` +
        `uploaded with BatchUpdateBlobs (${fmt(setupMs / 1000)} s). Blobs found on disk at start are ` +
        "unverified: FindMissingBlobs hashes each before reporting it present (files 4 at a time, log records " +
        "one by one), and the server hashes the blob files in the background, on a thread of its own, from " +
        "the start.",
      `Each of ${ctx.rounds} rounds restarts the server three times on the same data directory (SIGTERM, then ` +
        "`berth serve` again; the data stays in the page cache, as after a process restart). After the first " +
        "restart, one GetCapabilities opens the connection, then FindMissingBlobs of all the large digests is " +
        "timed (its checks and the background's share the files, as a client sees it), then of all the small " +
        `ones; the reference is the same two calls once verified, ${VERIFIED_CALLS} times each right after ` +
        "(median per round). Every answer is checked to report nothing missing. After the second restart " +
        "nothing is asked: the background check is timed from the server's own log (from `opened storage` to " +
        "`checked the blob files found at start`, millisecond timestamps), against `openssl dgst -sha256` " +
        "of the same files run right after (one process, one file after the other, with the same SHA-256 " +
        "code Node.js uses). The third restart follows `dd iflag=nocache` of every blob file and log segment " +
        "while the server is stopped, so the first FindMissingBlobs calls (timed as after the first restart) " +
        "read the bytes from the disk, as after a reboot.",
      `Input tree check: the tree of Execute's prepare step (src/execution/input-tree.ts \`checkInputTree\`, ` +
        "which reads every distinct Directory, checks its names, and computes the expanded totals with " +
        "src/cas/tree-limits.ts against the default `execution.inputLimits`), run in the benchmark's process on " +
        "a real DiskBlobStore behind the farm's memory cache (64 MiB, blobs up to 64 KiB), which holds trees of " +
        `${TREE_FILES.map((n) => n.toLocaleString("en-US")).join(", ")} files: directories of ` +
        `${FILES_PER_DIRECTORY} distinct files, ${DIRECTORIES_PER_GROUP} of them to a parent directory. ` +
        "Reference: the plain read of the same Directory messages (get and decode, level by level, 64 at a " +
        "time as the check reads them), with no name check and no limits. The two alternate; each round runs " +
        `each side about ${(TREE_WORK_PER_ROUND / 1000).toFixed(0)},000 files' worth per tree, after ` +
        `${TREE_WARMUP} warm-up runs. Those are first checks: no memory of checked directories. With the ` +
        "memory Execute keeps (src/execution/checked-directories.ts, `execution.checkedDirectoryCacheBytes`' " +
        "default), shared by all trees and filled by one check of each, the same tree is checked again, and " +
        "then a tree never seen that differs from it in one leaf directory (one more file: three new " +
        "Directory messages, a different variant each run), as many times as the first checks.",
      "Flushes: `sh -c 'cp SOURCE FILE && sync FILE'` (coreutils' `sync FILE` fsyncs that one file) of a 1 MiB " +
        "file, against `sh -c 'cp SOURCE FILE && true FILE'` (the same three processes, no flush), alternating, " +
        `${ctx.rounds * FSYNC_RUNS_PER_ROUND} times each on the same disk: the least one flush per acknowledged ` +
        "blob costs, for comparison with the ByteStream and BatchUpdateBlobs sections, whose references copy " +
        "without flushing.",
    ],
    rows,
    notes: [
      `Per round, ms: first FindMissingBlobs of the large blobs ${fmtList(pick((r) => r.firstLarge))}; ` +
        `verified ${fmtList(pick((r) => r.verifiedLarge))}; first of the small ones ` +
        `${fmtList(pick((r) => r.firstSmall))}; verified ${fmtList(pick((r) => r.verifiedSmall))}.`,
      `Background check per round: ${fmtList(pick((r) => r.background.ms))} ms for ` +
        `${fmtList(pick((r) => r.background.checked))} files (${fmtList(backgroundMBps)} MB/s); openssl ` +
        `${fmtList(opensslMBps)} MB/s.`,
      "Where the background check's time goes: src/cas/disk-blob-store.ts `verifyAll` hands the files, two " +
        "at a time, to one thread of its own (src/cas/hash-thread.ts) that reads each with synchronous 1 MiB " +
        "reads and hashes it, as openssl does, off the event loop; the time measured also holds the server's " +
        "own start (opening the log, binding the port) on the main thread. Before this change it " +
        "hashed one file at a time through a read stream on the event loop (450-540 MB/s here). A first " +
        "FindMissingBlobs hashes 4 files at a time on the event loop, beside it.",
      ...trees.map(
        (t) =>
          `${t.files.toLocaleString("en-US")} files, ${t.check.length} runs of each side in all, median of each ` +
          `round: checkInputTree ${fmtList(t.checkRounds)} ms; plain read ${fmtList(t.readRounds)} ms.`,
      ),
      "Why in-process for the input tree: Execute has no switch that turns the check off, and an Execute of a " +
        "large tree is dominated by the worker laying it out (creating directories, linking every file), which " +
        "would hide the check's cost in its noise. Every millisecond of `checkInputTree` is added to each " +
        "Execute's round trip, before the action is queued; before issue #12, Execute read at most the first " +
        "256 Directory messages of a tree (for the worker's assignment, src/execution/input-blobs.ts), which it " +
        "still does. Workers compute the totals again (src/cas/tree-limits.ts `checkTreeLimits`, part of the " +
        "check measured here) on the Directory messages they hold anyway to lay the tree out; not measured " +
        "separately.",
      `First calls with the files out of the page cache, per round, ms: large ${fmtList(pick((r) => r.coldLarge))}; ` +
        `small ${fmtList(pick((r) => r.coldSmall))}. The disk is a virtual machine's, whose host may cache ` +
        "what the guest dropped: a real disk after a reboot may well be slower.",
      `Flushes per run, ms: cp ${fmtList(fsync.cp, 1)}; cp + sync ${fmtList(fsync.cpSync, 1)}.`,
    ],
  };
}
