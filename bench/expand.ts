/**
 * The expand-mode benchmarks of issue #5: expanding the Debian image into the CAS against `tar -x` of its layers,
 * the second expansion (one action-cache lookup), and a `/bin/true` action in the expanded image, cold and warm,
 * against the same action in mount mode.
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { credentials } from "@grpc/grpc-js";
import { type ExpandImageProgress, ImagesClient } from "../src/gen/berth/image/v1/image.js";
import { execute, uploadAction } from "../test/support/actions.js";
import type { WireDigest } from "../test/support/blobs.js";
import type { Clients } from "../test/support/farm.js";
import type { BenchContext } from "./context.js";
import { type DebianImage, debianImage } from "./debian-image.js";
import { checkCompleted, describePhases, type Phases, phasesOf } from "./phases.js";
import { ratio, type Section, verdictAtLeast, verdictAtMost } from "./report.js";
import { type BenchServer, startBenchServer } from "./server.js";
import { elapsedMs, fmt, fmtList, MB, median, percentile } from "./stats.js";

const run = promisify(execFile);

const EXPAND_MAX_ROUNDS = 5;
/** Berth's expansion must reach at least this fraction of tar -x's speed. */
const EXPAND_SPEED_TARGET = 0.5;
const LOOKUP_RUNS = 20;
/** The second expansion (one lookup), p50, ms. */
const LOOKUP_TARGET_MS = 5;
const ACTION_RUNS = 60;
const ACTION_WARMUP = 5;
/** The warm action in expand mode may take this many times mount mode's. */
const WARM_TARGET = 1.5;

async function startServer(ctx: BenchContext, dir: string, mode: "mount" | "expand", workers: number) {
  await mkdir(dir, { recursive: true });
  const server = await startBenchServer({ workDir: dir, casMaxSizeBytes: "4GiB", workers, imageMode: mode });
  ctx.defer(() => server.stop());
  return server;
}

/** One ExpandImage call followed to its end; the root digest and the milliseconds it took. */
async function expandOnce(server: BenchServer, reference: string): Promise<{ ms: number; root: string }> {
  const client = new ImagesClient(server.address, credentials.createInsecure());
  try {
    const start = process.hrtime.bigint();
    let last: ExpandImageProgress | undefined;
    for await (const message of client.expandImage({ instanceName: "", reference })) {
      last = message as ExpandImageProgress;
    }
    const ms = elapsedMs(start);
    const root = last?.rootDirectoryDigest;
    if (!root) throw new Error(`ExpandImage of ${reference} ended without a root directory`);
    return { ms, root: `${root.hash}/${root.sizeBytes}` };
  } finally {
    client.close();
  }
}

/** `tar -xzf` of each layer blob, bottom first, into one new directory: the image unpacked the plain way. */
async function tarExtract(image: DebianImage, dir: string): Promise<number> {
  await mkdir(dir, { recursive: true });
  const start = process.hrtime.bigint();
  for (const digest of image.layerDigests) {
    await run("tar", ["-xzf", image.registry.blobPath(digest), "-C", dir]);
  }
  return elapsedMs(start);
}

async function settle(): Promise<void> {
  await run("sync", []);
  await new Promise((resolve) => setTimeout(resolve, 1000));
}

function uploadImageAction(clients: Clients, reference: string): Promise<WireDigest> {
  return uploadAction(clients, {
    args: ["/bin/true"],
    env: { PATH: "/usr/bin:/bin" },
    platform: [{ name: "container-image", value: `docker://${reference}` }],
    salt: randomBytes(8).toString("hex"),
  });
}

async function timedExecute(clients: Clients, digest: WireDigest, what: string) {
  const sent = Date.now();
  const start = process.hrtime.bigint();
  const { response } = await execute(clients, digest, { skipCacheLookup: true });
  const took = elapsedMs(start);
  checkCompleted(response, what);
  if (!response.result?.executionMetadata?.auxiliaryMetadata.some((a) => a.typeUrl.endsWith("ImageUsed"))) {
    throw new Error(`${what} reports no ImageUsed: it did not run in the image`);
  }
  return { took, phases: phasesOf(sent, Date.now(), response.result?.executionMetadata) };
}

export async function benchExpand(ctx: BenchContext): Promise<Section> {
  const image = await debianImage(ctx);
  const base = join(ctx.scratchDir, "expand");
  const rounds = Math.min(ctx.rounds, EXPAND_MAX_ROUNDS);
  const expands: number[] = [];
  const tars: number[] = [];
  const lookups: number[] = [];
  const roots = new Set<string>();
  for (let round = 0; round < rounds; round++) {
    const dir = join(base, `round-${round}`);
    const measureBerth = async () => {
      const server = await startServer(ctx, join(dir, "berth"), "expand", 0);
      await settle();
      const first = await expandOnce(server, image.reference);
      expands.push(first.ms);
      roots.add(first.root);
      for (let i = 0; i < LOOKUP_RUNS; i++) {
        const again = await expandOnce(server, image.reference);
        if (again.root !== first.root) throw new Error("the second expansion gave another root");
        lookups.push(again.ms);
      }
      await server.stop();
    };
    const measureTar = async () => {
      await settle();
      tars.push(await tarExtract(image, join(dir, "tar")));
    };
    if (round % 2 === 0) {
      await measureBerth();
      await measureTar();
    } else {
      await measureTar();
      await measureBerth();
    }
    ctx.log(
      `  round ${round + 1}/${rounds}: expansion ${fmt((expands.at(-1) as number) / 1000)} s, ` +
        `tar -x ${fmt((tars.at(-1) as number) / 1000)} s, second expansion p50 ${fmt(median(lookups.slice(-LOOKUP_RUNS)))} ms`,
    );
  }
  if (roots.size !== 1) throw new Error(`the rounds expanded the image to ${roots.size} different roots`);
  const rootMB = image.rootfsBytes / MB;
  const expandS = median(expands) / 1000;
  const tarS = median(tars) / 1000;
  const speed = tarS / expandS;
  const lookupP50 = median(lookups);

  // Actions: one server per mode, one worker each, the image expanded (resp. pulled) by a first, untimed run.
  const mount = await startServer(ctx, join(base, "mount"), "mount", 1);
  const expand = await startServer(ctx, join(base, "expand-action"), "expand", 1);
  await expandOnce(expand, image.reference);
  const mountDigest = await uploadImageAction(mount.clients, image.reference);
  const expandDigest = await uploadImageAction(expand.clients, image.reference);
  const coldMount = await timedExecute(mount.clients, mountDigest, "the cold action in mount mode");
  const coldExpand = await timedExecute(expand.clients, expandDigest, "the cold action in expand mode");
  for (let i = 0; i < ACTION_WARMUP; i++) {
    await timedExecute(mount.clients, mountDigest, "a warm-up action in mount mode");
    await timedExecute(expand.clients, expandDigest, "a warm-up action in expand mode");
  }
  const warmMount: number[] = [];
  const warmExpand: number[] = [];
  const expandPhases: Phases[] = [];
  for (let i = 0; i < ACTION_RUNS; i++) {
    const first = i % 2 === 0;
    const measureMount = async () => warmMount.push((await timedExecute(mount.clients, mountDigest, "mount")).took);
    const measureExpand = async () => {
      const timed = await timedExecute(expand.clients, expandDigest, "expand");
      warmExpand.push(timed.took);
      expandPhases.push(timed.phases);
    };
    if (first) {
      await measureMount();
      await measureExpand();
    } else {
      await measureExpand();
      await measureMount();
    }
  }
  await mount.stop();
  await expand.stop();
  const [mountP50, expandP50] = [median(warmMount), median(warmExpand)];
  ctx.log(
    `  expansion ${fmt(expandS)} s vs tar -x ${fmt(tarS)} s; lookup p50 ${fmt(lookupP50)} ms; warm action ` +
      `expand ${fmt(expandP50)} ms vs mount ${fmt(mountP50)} ms`,
  );
  const seconds = (values: number[]) => fmtList(values.map((v) => v / 1000));
  return {
    title: "Expand mode: the Debian image as a CAS tree",
    setup: [
      `The Debian image of the image benchmarks (${fmt(rootMB)} MB in ` +
        `${image.rootfsInodes.toLocaleString("en-US")} inodes, two gzip layers of ` +
        `${image.layerSizes.map((s) => `${fmt(s / MB, 2)} MB`).join(" and ")}) in the loopback registry.`,
      "Expansion: a fresh `berth serve --workers 0` in expand mode on a new data directory every round; one " +
        "`berth.image.v1.Images/ExpandImage` call, timed at the client until its stream ends with the root " +
        "digest: the manifest resolved, both layers downloaded from the registry, each converted into Directory " +
        "and file blobs in the CAS (only missing blobs written) and remembered in the action cache, the layer " +
        "trees merged into the image's root tree. Speed is the image's unpacked size over that time.",
      "Reference: `tar -xzf` of each layer blob (read from the registry's storage, where they sit in the page " +
        "cache), bottom first, into a new directory on the same disk, timed together. Berth's side includes its " +
        "download from the registry; tar's does not.",
      `Second expansion: ${LOOKUP_RUNS} more ExpandImage calls on the same server after the first, each timed ` +
        "the same way (one action-cache lookup; the tree was verified complete when built and stays so while " +
        "the CAS evicts nothing). Rounds alternate which side goes first; `sync` and 1 s of rest before each.",
      "Actions: two servers with one worker each, one in mount mode and one in expand mode, on data " +
        "directories of their own. The expand-mode server has expanded the image beforehand (untimed). The " +
        "same action, `/bin/true` with PATH=/usr/bin:/bin and `container-image=docker://127.0.0.1:PORT/debian:bench`, " +
        "is uploaded to each. The first Execute on each server is the cold run: in mount mode the worker " +
        "pulls and unpacks the image, in expand mode it fetches the image's files from the CAS and lays the " +
        `tree out. Then ${ACTION_WARMUP} warm-up runs of each, then ${ACTION_RUNS} runs alternating between ` +
        "the modes, skip_cache_lookup, timed at the client until the COMPLETED operation arrives.",
    ],
    rows: [
      {
        metric: "Expansion into the CAS",
        berth: `${fmt(expandS)} s (${fmt(rootMB / expandS)} MB/s)`,
        reference: `${fmt(tarS)} s (${fmt(rootMB / tarS)} MB/s, tar -x of the layers)`,
        ratio: `${fmt(speed, 2)}× tar's speed`,
        target: `≥ ${EXPAND_SPEED_TARGET}× tar's speed`,
        verdict: verdictAtLeast(speed, EXPAND_SPEED_TARGET),
      },
      {
        metric: "Second expansion (p50)",
        berth: `${fmt(lookupP50)} ms (p99 ${fmt(percentile(lookups, 99))} ms)`,
        reference: "—",
        ratio: "—",
        target: `≤ ${LOOKUP_TARGET_MS} ms`,
        verdict: verdictAtMost(lookupP50, LOOKUP_TARGET_MS),
      },
      {
        metric: "Cold /bin/true in the image (first on the worker)",
        berth: `${fmt(coldExpand.took)} ms (expand)`,
        reference: `${fmt(coldMount.took)} ms (mount: pull and unpack)`,
        ratio: ratio(coldExpand.took, coldMount.took),
        target: "none set",
        verdict: "—",
      },
      {
        metric: "Warm /bin/true in the image, p50",
        berth: `${fmt(expandP50)} ms (expand; p99 ${fmt(percentile(warmExpand, 99))} ms)`,
        reference: `${fmt(mountP50)} ms (mount; p99 ${fmt(percentile(warmMount, 99))} ms)`,
        ratio: ratio(expandP50, mountP50),
        target: `≤ ${WARM_TARGET}× mount mode`,
        verdict: verdictAtMost(expandP50 / mountP50, WARM_TARGET),
      },
    ],
    notes: [
      `Per round, s: expansion ${seconds(expands)}; tar -x ${seconds(tars)}.`,
      `Where the warm expand-mode action's time goes (p50 of each phase, ms): ${describePhases(expandPhases, 1)}.`,
      `Cold runs' input fetch phase: expand ${fmt(coldExpand.phases.fetch)} ms, mount ${fmt(coldMount.phases.fetch)} ms.`,
    ],
  };
}
