/**
 * The container-image benchmarks of issue #4: a cold pull and unpack of a Debian image from a loopback registry
 * against `skopeo copy` + `umoci unpack`, and the warm per-action overhead of a `/bin/true` action in that image
 * against bubblewrap on an unpacked root (the floor) and against `docker run --rm` on a dockerd started here.
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmod, mkdir } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import type { ExecuteResponse } from "../src/gen/build/bazel/remote/execution/v2/remote_execution.js";
import { execute, uploadAction } from "../test/support/actions.js";
import type { WireDigest } from "../test/support/blobs.js";
import type { Clients } from "../test/support/farm.js";
import type { BenchContext } from "./context.js";
import { debianImage, ROOTFS, SUITE, skopeoUmoci } from "./debian-image.js";
import { DOCKER, startDockerd } from "./dockerd.js";
import { HelperProcess } from "./helper-process.js";
import type { ImageHelperReply, ImageHelperRequest } from "./image-helper.js";
import { machineCpuSeconds } from "./machine.js";
import { checkCompleted, describePhases, type Phases, phasesOf } from "./phases.js";
import { ratio, type Section, verdictAtLeast, verdictAtMost } from "./report.js";
import { type BenchServer, startBenchServer } from "./server.js";
import { elapsedMs, fmt, fmtList, MB, median, percentile } from "./stats.js";

const run = promisify(execFile);

/** The environment every action gets (the test support's default), so the image's own PATH is replaced. */
const ACTION_ENV = [{ name: "PATH", value: "/usr/bin:/bin" }];

const PULL_MAX_ROUNDS = 3;
/** Berth's cold Execute may take at most this times skopeo copy + umoci unpack. */
const PULL_TARGET = 1.0;

const ACTION_RUNS = 100;
const ACTION_WARMUP = 5;
/** Berth's p50 may exceed the floor's (bwrap run directly on the unpacked root) by this much. */
const OVERHEAD_TARGET_MS = 20;
/** docker run's p50 must be at least this many times Berth's. */
const DOCKER_TARGET = 15;

// ---------------------------------------------------------------- Berth

/**
 * A fresh `berth serve --workers 1` on a data directory of its own, whose worker has run one `/bin/true`
 * without an image (so it is connected and warm, and nothing of an image is cached).
 */
async function startImageServer(ctx: BenchContext, dir: string): Promise<BenchServer> {
  await mkdir(dir, { recursive: true });
  const server = await startBenchServer({ workDir: dir, casMaxSizeBytes: "4GiB", workers: 1 });
  ctx.defer(() => server.stop());
  const ready = await uploadAction(server.clients, { args: ["/bin/true"], salt: randomBytes(8).toString("hex") });
  checkCompleted((await execute(server.clients, ready)).response, "the first /bin/true without an image");
  return server;
}

function uploadImageAction(clients: Clients, reference: string): Promise<WireDigest> {
  return uploadAction(clients, {
    args: ["/bin/true"],
    platform: [{ name: "container-image", value: `docker://${reference}` }],
    salt: randomBytes(8).toString("hex"),
  });
}

function checkRanInImage(response: ExecuteResponse, what: string): void {
  checkCompleted(response, what);
  const used = response.result?.executionMetadata?.auxiliaryMetadata.some((a) => a.typeUrl.endsWith("ImageUsed"));
  if (!used) throw new Error(`${what} reports no ImageUsed: it did not run in the image`);
}

/** One timed Execute (skip_cache_lookup), with its phases. */
async function timedExecute(clients: Clients, digest: WireDigest, what: string, check = checkCompleted) {
  const sent = Date.now();
  const start = process.hrtime.bigint();
  const { response } = await execute(clients, digest, { skipCacheLookup: true });
  const took = elapsedMs(start);
  const phases = phasesOf(sent, Date.now(), response.result?.executionMetadata);
  check(response, what);
  return { took, phases };
}

/** Lets the previous side's writes reach the disk, so that writeback does not run during the next one. */
async function settle(): Promise<void> {
  await run("sync", []);
  await new Promise((resolve) => setTimeout(resolve, 1000));
}

/** Runs `work` and says how many CPU seconds the whole machine spent meanwhile. */
async function withMachineCpu<T>(work: () => Promise<T>): Promise<[T, number]> {
  const before = machineCpuSeconds().busy;
  const result = await work();
  return [result, machineCpuSeconds().busy - before];
}

// ---------------------------------------------------------------- images-pull

/** Measured by hand on this machine (November 2026): see the notes of the report. */
const OVERLAY_SYNC =
  "Berth mounts its overlays with the option `volatile` (Linux 5.10 and later): without it, overlayfs syncs " +
  "the file system holding the upper directory when it is unmounted, which happens when the action's private " +
  "mount namespace goes, inside the sandbox's time. By hand here, mounting an overlay in `unshare -m` and " +
  "letting the namespace go took 3–5 ms on a clean disk, 267 ms with 200 MB dirty on it, and 3 ms with " +
  "`volatile`, which suits an upper layer that is thrown away anyway.";

const PULL_WHERE =
  "The cold Execute is almost all pull and unpack (the input fetch phase): layers are downloaded and unpacked " +
  `in parallel, and the sandbox then takes about as long as a warm one. ${OVERLAY_SYNC}`;

const ACTION_WHERE =
  "before bwrap, the launcher (src/process/launcher.pl) forks, enters a private mount namespace, mounts the " +
  "overlay and binds the input root (src/sandbox/overlay-root.ts), and becomes uid 65534. " +
  OVERLAY_SYNC;

export async function benchImagePull(ctx: BenchContext): Promise<Section> {
  const image = await debianImage(ctx);
  const rounds = Math.min(ctx.rounds, PULL_MAX_ROUNDS);
  const base = join(ctx.scratchDir, "images-pull");
  const berth: number[] = [];
  const fetch: number[] = [];
  const phases: Phases[] = [];
  const copies: number[] = [];
  const unpacks: number[] = [];
  const reference: number[] = [];
  const berthCores: number[] = [];
  const referenceCores: number[] = [];
  const order: string[] = [];
  for (let round = 0; round < rounds; round++) {
    const dir = join(base, `round-${round}`);
    const measureBerth = async () => {
      const server = await startImageServer(ctx, join(dir, "berth"));
      const digest = await uploadImageAction(server.clients, image.reference);
      await settle();
      const [cold, cpu] = await withMachineCpu(() =>
        timedExecute(server.clients, digest, "the cold /bin/true in the image", checkRanInImage),
      );
      await server.stop();
      berth.push(cold.took);
      fetch.push(cold.phases.fetch);
      phases.push(cold.phases);
      berthCores.push(cpu / (cold.took / 1000));
    };
    const measureReference = async () => {
      await settle();
      const [times, cpu] = await withMachineCpu(() => skopeoUmoci(image.reference, join(dir, "reference")));
      copies.push(times.copy);
      unpacks.push(times.unpack);
      reference.push(times.copy + times.unpack);
      referenceCores.push(cpu / ((times.copy + times.unpack) / 1000));
    };
    if (round % 2 === 0) {
      await measureBerth();
      await measureReference();
    } else {
      await measureReference();
      await measureBerth();
    }
    order.push(round % 2 === 0 ? "Berth first" : "reference first");
    ctx.log(
      `  round ${round + 1}/${rounds}: Berth ${fmt((berth.at(-1) as number) / 1000)} s ` +
        `(pull and unpack ${fmt((fetch.at(-1) as number) / 1000)} s); skopeo copy ` +
        `${fmt((copies.at(-1) as number) / 1000)} s + umoci unpack ${fmt((unpacks.at(-1) as number) / 1000)} s`,
    );
  }
  const berthS = median(berth) / 1000;
  const fetchS = median(fetch) / 1000;
  const referenceS = median(reference) / 1000;
  const seconds = (values: number[]) => fmtList(values.map((v) => v / 1000));
  const compressed = image.layerSizes.reduce((a, b) => a + b, 0);
  return {
    title: "Cold pull and unpack of a Debian image",
    setup: [
      `The image: \`debootstrap --variant=minbase ${SUITE}\` from the machine's apt mirror (the root is made once ` +
        `and kept in ${ROOTFS} for later runs; ${image.origin}), ${fmt(image.rootfsBytes / MB)} MB in ` +
        `${image.rootfsInodes.toLocaleString("en-US")} inodes, the .debs debootstrap leaves in ` +
        "/var/cache/apt/archives included. umoci 0.4.7 turns it into an OCI image of two gzip layers (`umoci " +
        `repack\` of a bundle holding a copy of the root, ${fmt((image.layerSizes[0] ?? 0) / MB)} MB, then of ` +
        `the same bundle with one more file, ${image.layerSizes[1] ?? 0} bytes; ${fmt(image.buildMs / 1000)} s), which \`skopeo copy ` +
        `--preserve-digests\` pushes to Debian's \`docker-registry\` (distribution 2.8) on a loopback port ` +
        "(test/support/registry.ts), its storage in the temporary directory. Every round pulls the same " +
        `${fmt(compressed / MB)} MB from that registry, whose files are in the page cache after the push.`,
      "Berth: a fresh `berth serve --workers 1` on a new data directory every round (nothing of the image " +
        "cached); once its worker has run a `/bin/true` without an image (untimed: it is connected and warm), " +
        "one Execute of `/bin/true` with `container-image=docker://127.0.0.1:PORT/debian:bench` (skip_cache_lookup), " +
        "timed at the client from the call until the stream's COMPLETED operation has arrived: the manifest and " +
        "configuration resolved, both layers downloaded (digest and size checked), unpacked into the image " +
        "store, the overlay mounted and `/bin/true` run. The response is checked (status OK, exit code 0, " +
        "ImageUsed in auxiliary_metadata). The pull and unpack alone is the worker's input fetch phase from " +
        "ExecutedActionMetadata (the image is prepared there, beside an empty input root), 1 ms resolution.",
      "Reference: `skopeo copy --src-tls-verify=false docker://127.0.0.1:PORT/debian:bench oci:DIR:t` then " +
        "`umoci unpack --image DIR:t BUNDLE` (Debian's skopeo 1.9 and umoci 0.4.7, run with " +
        "child_process.execFile), timed together, into new directories every round on the same disk as Berth's " +
        "data directory.",
      `${rounds} rounds; Berth and the reference alternate in going first. Before each side, \`sync\` and 1 s of ` +
        "rest (untimed), so that the previous side's writeback does not run during it; neither side syncs. " +
        "Everything stays on disk until the end of the run.",
    ],
    rows: [
      {
        metric: "Cold Execute in the image (pull, unpack, run)",
        berth: `${fmt(berthS)} s`,
        reference: `${fmt(referenceS)} s (skopeo copy + umoci unpack)`,
        ratio: ratio(berthS, referenceS),
        target: `≤ ${fmt(PULL_TARGET, 1)}× skopeo + umoci`,
        verdict: verdictAtMost(berthS / referenceS, PULL_TARGET),
      },
      {
        metric: "Pull and unpack alone (input fetch phase)",
        berth: `${fmt(fetchS)} s`,
        reference: `${fmt(referenceS)} s (skopeo copy + umoci unpack)`,
        ratio: ratio(fetchS, referenceS),
        target: "none set",
        verdict: "—",
      },
    ],
    notes: [
      `Per round, s: Berth's Execute ${seconds(berth)}, of which pull and unpack ${seconds(fetch)}; skopeo copy ` +
        `${seconds(copies)} + umoci unpack ${seconds(unpacks)} = ${seconds(reference)} (${order.join(", ")}).`,
      `Where Berth's time goes (median of the rounds, s, from the client's clock and ExecutedActionMetadata): ` +
        `${describePhases(phases, 3, 1000)}.`,
      `Machine CPU while each side ran (all processes, from /proc/stat, in cores): Berth ${fmtList(berthCores, 2)}; ` +
        `skopeo + umoci ${fmtList(referenceCores, 2)}.`,
      PULL_WHERE,
    ],
  };
}

// ---------------------------------------------------------------- images-action

const HELPER = join(dirname(fileURLToPath(import.meta.url)), "image-helper.js");

/** bench/image-helper.ts in a process of its own; each request answers the milliseconds it took. */
function startImageHelper(ctx: BenchContext) {
  const helper = HelperProcess.start<ImageHelperRequest, ImageHelperReply>(ctx, HELPER, "image helper");
  return {
    request: async (request: Parameters<typeof helper.request>[0]) => (await helper.request(request)).ms,
    stop: () => helper.stop(),
  };
}

export async function benchImageAction(ctx: BenchContext): Promise<Section> {
  const image = await debianImage(ctx);
  const base = join(ctx.scratchDir, "images-action");
  const server = await startImageServer(ctx, join(base, "berth"));
  const digest = await uploadImageAction(server.clients, image.reference);
  const pull = await timedExecute(server.clients, digest, "the first /bin/true in the image", checkRanInImage);
  ctx.log(`  Berth pulled the image in ${fmt(pull.phases.fetch / 1000)} s (untimed)`);
  // The root of the floor and of BubblewrapSandbox.run: the image as skopeo and umoci fetch and unpack it.
  const unpacked = await skopeoUmoci(image.reference, join(base, "unpacked"));
  await chmod(dirname(unpacked.root), 0o755);
  const docker = await startDockerd(ctx, join(base, "docker"), image.registry.host);
  const dockerEnv = { ...process.env, ...docker.env };
  await run(DOCKER, ["pull", "--quiet", image.reference], { env: dockerEnv });
  const helper = startImageHelper(ctx);
  const sandboxDir = join(base, "sandbox");
  await mkdir(sandboxDir);
  let sandboxRuns = 0;

  const berthRun = () => timedExecute(server.clients, digest, "the /bin/true action in the image", checkRanInImage);
  const sandboxRun = () =>
    helper.request({
      op: "overlay",
      lower: unpacked.root,
      dir: join(sandboxDir, String(sandboxRuns++)),
      argv: ["/bin/true"],
      env: ACTION_ENV,
    });
  const floorRun = () => helper.request({ op: "raw", root: unpacked.root, argv: ["/bin/true"], env: ACTION_ENV });
  const dockerArgs = ["run", "--rm", "--network", "none", image.reference, "/bin/true"];
  const dockerRun = () => helper.request({ op: "docker", docker: DOCKER, args: dockerArgs, env: docker.env });

  for (let i = 0; i < ACTION_WARMUP; i++) {
    await berthRun();
    await sandboxRun();
    await floorRun();
    await dockerRun();
  }
  const berth: number[] = [];
  const phases: Phases[] = [];
  const sandbox: number[] = [];
  const floor: number[] = [];
  const dockerTimes: number[] = [];
  const cpu = { berth: 0, sandbox: 0, floor: 0, docker: 0 };
  const perBlock = Math.ceil(ACTION_RUNS / ctx.rounds);
  const blocks: { berth: number[]; sandbox: number[]; docker: number[] } = { berth: [], sandbox: [], docker: [] };
  for (let i = 0; i < ACTION_RUNS; i++) {
    const [b, berthCpu] = await withMachineCpu(berthRun);
    berth.push(b.took);
    phases.push(b.phases);
    cpu.berth += berthCpu;
    const [s, sandboxCpu] = await withMachineCpu(sandboxRun);
    sandbox.push(s);
    cpu.sandbox += sandboxCpu;
    const [f, floorCpu] = await withMachineCpu(floorRun);
    floor.push(f);
    cpu.floor += floorCpu;
    const [d, dockerCpu] = await withMachineCpu(dockerRun);
    dockerTimes.push(d);
    cpu.docker += dockerCpu;
    if ((i + 1) % perBlock === 0 || i === ACTION_RUNS - 1) {
      const from = blocks.berth.length * perBlock;
      blocks.berth.push(median(berth.slice(from)));
      blocks.sandbox.push(median(sandbox.slice(from)));
      blocks.docker.push(median(dockerTimes.slice(from)));
    }
  }
  await helper.stop();
  await docker.stop();
  await server.stop();

  const [p50, p99] = [median(berth), percentile(berth, 99)];
  const [sandboxP50, sandboxP99] = [median(sandbox), percentile(sandbox, 99)];
  const [floorP50, floorP99] = [median(floor), percentile(floor, 99)];
  const [dockerP50, dockerP99] = [median(dockerTimes), percentile(dockerTimes, 99)];
  const overhead = p50 - floorP50;
  const dockerFactor = dockerP50 / p50;
  ctx.log(
    `  Berth p50 ${fmt(p50)} ms, p99 ${fmt(p99)} ms; floor (bwrap directly) p50 ${fmt(floorP50)} ms; ` +
      `BubblewrapSandbox.run p50 ${fmt(sandboxP50)} ms; docker run p50 ${fmt(dockerP50)} ms`,
  );
  const perRun = (seconds: number) => fmt((seconds * 1000) / ACTION_RUNS);
  return {
    title: "Per-action overhead of /bin/true in a cached image",
    setup: [
      `The Debian image of the pull benchmark (${fmt(image.layerSizes.reduce((a, b) => a + b, 0) / MB)} MB in two ` +
        "gzip layers, in the loopback registry) and one action: `/bin/true` with PATH=/usr/bin:/bin, no input " +
        "files, `container-image=docker://127.0.0.1:PORT/debian:bench`, uploaded once.",
      "Berth: a `berth serve --workers 1` of its own with a fresh data directory, whose worker has pulled the " +
        `image by running the action once (untimed). ${ACTION_RUNS} sequential Executes with skip_cache_lookup ` +
        `after ${ACTION_WARMUP} warm-up runs, timed at the client from the call until the stream's COMPLETED ` +
        "operation has arrived; each response is checked (status OK, exit code 0, not from the cache, ImageUsed " +
        "in auxiliary_metadata). Each run pins the cached image (the tag's resolution is trusted for " +
        "tagRefreshSeconds, 300 s), makes the action's overlay upper and work directories, lays out the empty " +
        "input root, mounts the overlay in a private mount namespace and runs bwrap on it (src/sandbox/overlay-root.ts), " +
        "then writes the action cache entry.",
      "Reference (the floor): bubblewrap run directly on the unpacked root, as the issue defines it, spawned as " +
        "uid 65534: `bwrap --unshare-user --unshare-pid --unshare-ipc --unshare-uts --unshare-cgroup-try " +
        "--unshare-net --die-with-parent --ro-bind ROOT / --proc /proc --dev /dev --perms 1777 --tmpfs /tmp " +
        "--chdir / --clearenv --setenv PATH /usr/bin:/bin -- /bin/true`, awaited until it exits; ROOT is the " +
        "image as `skopeo copy` + `umoci unpack` produced it (both layers in one directory).",
      "For information: `new BubblewrapSandbox().run(…)` of src/sandbox/bubblewrap.ts with an image root, " +
        "exactly the sandbox code a worker runs, on an overlay whose only lower directory is that same ROOT: " +
        "the launcher forks, mounts the overlay and binds an empty input root at /run/berth/execroot in a " +
        "private mount namespace, becomes uid 65534 and execs bwrap with the sandbox's own arguments; timed " +
        "from making that run's upper, work and input root directories (new ones every run) until the " +
        "sandbox's pid 1 has died; the directory is removed afterwards, untimed.",
      `Reference (Docker): \`docker run --rm --network none 127.0.0.1:PORT/debian:bench /bin/true\` with Debian's ` +
        `docker.io (${docker.version}, overlay2), against a \`dockerd\` the benchmark starts itself (own socket, ` +
        "data root and exec root in the temporary directory, `--iptables=false --ip-masq=false --bridge=none`, " +
        "the registry in `insecure-registries`) and stops, removing its directories, at the end; `docker pull` " +
        "fetched the image before the clock starts; the client is awaited until it exits.",
      "The floor, BubblewrapSandbox.run and docker run in a small Node.js process of their own " +
        "(bench/image-helper.ts, timed there). Berth, BubblewrapSandbox.run, the floor and docker run alternate " +
        `run by run, after ${ACTION_WARMUP} warm-up runs of each.`,
    ],
    rows: [
      {
        metric: "Latency p50",
        berth: `${fmt(p50)} ms`,
        reference: `${fmt(floorP50)} ms (bwrap directly on the unpacked root)`,
        ratio: `${ratio(p50, floorP50)} (${overhead >= 0 ? "+" : "−"}${fmt(Math.abs(overhead))} ms)`,
        target: `≤ floor + ${OVERHEAD_TARGET_MS} ms`,
        verdict: verdictAtMost(overhead, OVERHEAD_TARGET_MS),
      },
      {
        metric: "Latency p99",
        berth: `${fmt(p99)} ms`,
        reference: `${fmt(floorP99)} ms (bwrap directly on the unpacked root)`,
        ratio: ratio(p99, floorP99),
        target: "none set",
        verdict: "—",
      },
      {
        metric: "Latency p50 vs docker run",
        berth: `${fmt(p50)} ms`,
        reference: `${fmt(dockerP50)} ms (docker run --rm; p99 ${fmt(dockerP99)} ms)`,
        ratio: `${ratio(p50, dockerP50)} (docker ${fmt(dockerFactor, 1)}× slower)`,
        target: `docker ≥ ${DOCKER_TARGET}× slower`,
        verdict: verdictAtLeast(dockerFactor, DOCKER_TARGET),
      },
      {
        metric: "Latency p50 vs Berth's sandbox alone",
        berth: `${fmt(p50)} ms`,
        reference: `${fmt(sandboxP50)} ms (BubblewrapSandbox.run on an overlay; p99 ${fmt(sandboxP99)} ms)`,
        ratio: ratio(p50, sandboxP50),
        target: "none set",
        verdict: "—",
      },
    ],
    notes: [
      `p50 of each block of ${perBlock} consecutive runs, ms: Berth ${fmtList(blocks.berth, 1)}; ` +
        `BubblewrapSandbox.run ${fmtList(blocks.sandbox, 1)}; docker run ${fmtList(blocks.docker, 0)}.`,
      `Where Berth's time goes (p50 of each phase, ms, from the client's clock and the worker's ` +
        `ExecutedActionMetadata, whose timestamps have 1 ms resolution): ${describePhases(phases, 1)}. The ` +
        `first, cold run took ${fmt(pull.took / 1000)} s, of which ${fmt(pull.phases.fetch / 1000)} s pulling ` +
        "and unpacking.",
      `Machine CPU per run (all processes, from /proc/stat, so dockerd, containerd and the shims count too; ` +
        `10 ms ticks summed over ${ACTION_RUNS} runs): Berth ${perRun(cpu.berth)} ms, BubblewrapSandbox.run ` +
        `${perRun(cpu.sandbox)} ms, the floor (bwrap directly) ${perRun(cpu.floor)} ms, docker run ` +
        `${perRun(cpu.docker)} ms.`,
      `Berth's sandbox alone (BubblewrapSandbox.run) takes ${fmt(sandboxP50 / floorP50, 1)}× the floor's time: ` +
        ACTION_WHERE,
    ],
  };
}
