/**
 * Docker inside actions (init-dockerd=true) under the accelerator the worker is given (TCG on these machines):
 * the action of test/e2e/bazel-docker.test.ts, `docker run --rm IMAGE echo PASS` with IMAGE a small busybox image
 * in a loopback registry, sent through Execute to a real `berth serve` whose worker runs microVMs, in the Debian
 * image with docker.io of the tests (test/support/docker-image.ts). Four ways, interleaved round by round:
 *
 *  - cold: snapshots off, a VM booted for the action, its daemon started, IMAGE pulled, the container run;
 *  - resumed: snapshots on, the VM resumed from the snapshot of a booted VM of the shape with its daemon
 *    answering (made beside the farm's first action, waited for before the rounds), IMAGE pulled, run;
 *  - recycled: recycle-runner=true, the warm VM of the key with its running daemon and the image it pulled;
 *  - the floor: the same `docker run` against a dockerd on the host with IMAGE already pulled (and, apart, with
 *    the pull: the image removed first).
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdir, readdir, rm } from "node:fs/promises";
import { loadavg } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { promisify } from "node:util";
import { VmUsed } from "../src/gen/berth/vm/v1/vm.js";
import { execute, readBlob, uploadAction } from "../test/support/actions.js";
import { dockerImage } from "../test/support/docker-image.js";
import type { Clients } from "../test/support/farm.js";
import { testGuestAssets } from "../test/support/guest.js";
import { busyboxImage, startRegistry } from "../test/support/registry.js";
import type { BenchContext } from "./context.js";
import { DOCKER, startDockerd } from "./dockerd.js";
import { ratio, type Section, verdictAtMost } from "./report.js";
import { type BenchServer, startBenchServer } from "./server.js";
import { elapsedMs, fmt, fmtList, median } from "./stats.js";

const run = promisify(execFile);

/** Recycled actions are the cheap ones: several per round give their median more than one sample a round. */
const RECYCLED_PER_ROUND = 3;
/** The issue's target: an action in the warm VM at most this times a cold one. */
const RECYCLED_TARGET_RATIO = 0.2;
/** The snapshot is a boot of its own with the daemon started in it, under TCG beside the farm's first action. */
const SNAPSHOT_WAIT_MS = 600_000;
const WORKER_JOIN_MS = 120_000;
const SMALL_MARKER = "berth bench: the container pulled inside the VM";

type Start = "cold" | "snapshot" | "recycled";

/** A farm of one worker with microVMs; `log` holds its log's lines (the snapshot's failure is said there). */
interface DockerFarm {
  server: BenchServer;
  log: string[];
}

async function startFarm(
  ctx: BenchContext,
  dir: string,
  vm: Record<string, unknown>,
  registryHost: string,
): Promise<DockerFarm> {
  await mkdir(dir, { recursive: true });
  const log: string[] = [];
  let joined: () => void = () => undefined;
  const workerJoined = new Promise<void>((resolve) => {
    joined = resolve;
  });
  const server = await startBenchServer({
    workDir: dir,
    casMaxSizeBytes: "4GiB",
    workers: 1,
    // JSON is YAML's flow style.
    extraConfig: `images: ${JSON.stringify({ insecureRegistries: [registryHost] })}\nworker: ${JSON.stringify({ vm })}\n`,
    onLogLine: (line) => {
      log.push(line);
      if (/worker \S+ connected to /.test(line)) joined();
    },
  });
  ctx.defer(() => server.stop());
  const timeout = sleep(WORKER_JOIN_MS).then(() => {
    throw new Error(`the worker did not join within ${WORKER_JOIN_MS / 1000} s:\n${log.join("\n")}`);
  });
  await Promise.race([workerJoined, timeout]);
  if (!log.some((line) => line.includes("microVMs on this worker: QEMU under"))) {
    throw new Error(`the farm's worker runs no VMs:\n${log.join("\n")}`);
  }
  return { server, log };
}

/** The action, distinct each time (a salt), its VmUsed.start checked; resolves to Execute's wall time. */
async function dockerAction(
  clients: Clients,
  platform: { name: string; value: string }[],
  small: string,
  expected: Start,
): Promise<number> {
  const { ms, stdout } = await vmAction(clients, platform, ["docker", "run", "--rm", small, "echo", "PASS"], expected);
  if (stdout !== "PASS\n") throw new Error(`the ${expected} Docker action printed ${JSON.stringify(stdout)}`);
  return ms;
}

/** An action of `args` in a Docker VM, distinct each time (a salt), its VmUsed.start checked. */
async function vmAction(
  clients: Clients,
  platform: { name: string; value: string }[],
  args: string[],
  expected: Start,
): Promise<{ ms: number; stdout: string }> {
  const action = await uploadAction(clients, {
    args,
    env: { PATH: "/usr/bin:/bin" },
    platform,
    salt: randomBytes(8).toString("hex"),
  });
  const start = process.hrtime.bigint();
  const { response } = await execute(clients, action);
  const ms = elapsedMs(start);
  const stderr = await readBlob(clients, response.result?.stderrDigest);
  if ((response.status?.code ?? 0) !== 0 || response.result?.exitCode !== 0) {
    throw new Error(
      `the ${expected} Docker action failed: status ${response.status?.code} ${response.status?.message}, ` +
        `exit ${response.result?.exitCode}: ${stderr}`,
    );
  }
  const stdout = await readBlob(clients, response.result?.stdoutDigest);
  const aux = response.result?.executionMetadata?.auxiliaryMetadata ?? [];
  const used = aux.find((a) => a.typeUrl.endsWith("berth.vm.v1.VmUsed"));
  const started = used && VmUsed.decode(used.value).start;
  if (started !== expected) throw new Error(`expected a ${expected} VM, the worker says ${started ?? "no VM"}`);
  return { ms, stdout };
}

/** `docker run --rm IMAGE echo PASS` between two readings of the guest's /proc/uptime. */
function insideArgs(small: string): string[] {
  const uptime = "cut -d' ' -f1 /proc/uptime";
  return [
    "/bin/sh",
    "-c",
    `a=$(${uptime}); docker run --rm ${small} echo PASS >/dev/null; b=$(${uptime}); echo "$a $b"`,
  ];
}

function insideSeconds(stdout: string): number {
  const [a, b] = stdout.trim().split(" ").map(Number);
  if (a === undefined || b === undefined || !(b >= a)) throw new Error(`the timed docker run printed ${stdout}`);
  return b - a;
}

/** Waits until the farm's worker has a snapshot on disk, or says that making it failed (its words returned). */
async function snapshotMade(farm: DockerFarm): Promise<string | undefined> {
  const dir = join(farm.server.dataDir, "worker", "vm-snapshots");
  const started = Date.now();
  for (;;) {
    const names = await readdir(dir).catch(() => [] as string[]);
    if (names.some((name) => /^[0-9a-f]{64}$/.test(name))) return undefined;
    const failure = farm.log.find((line) => line.includes("a VM snapshot failed"));
    if (failure) return loggedError(failure);
    if (Date.now() - started > SNAPSHOT_WAIT_MS) return `no snapshot within ${SNAPSHOT_WAIT_MS / 1000} s`;
    await sleep(500);
  }
}

/** The error of a pino log line ({"err": {"message": …}}), or the line. */
function loggedError(line: string): string {
  try {
    const parsed = JSON.parse(line) as { msg?: string; err?: { message?: string } };
    return `${parsed.msg ?? ""}: ${parsed.err?.message ?? line}`;
  } catch {
    return line;
  }
}

export async function benchVmDocker(ctx: BenchContext): Promise<Section> {
  const loadAtStart = loadavg();
  const assets = await testGuestAssets();
  const dir = join(ctx.scratchDir, "vm-docker");
  await mkdir(dir, { recursive: true });
  ctx.defer(() => rm(dir, { recursive: true, force: true }));

  const registry = await startRegistry();
  ctx.defer(() => registry.stop());
  const image = await registry.push(await dockerImage(ctx.log), "bench/docker", "v1");
  const small = await registry.push(await busyboxImage(SMALL_MARKER), "bench/small", "v1");
  const platform = [
    { name: "container-image", value: `docker://${image}` },
    { name: "workload-isolation-type", value: "firecracker" },
    { name: "init-dockerd", value: "true" },
    { name: "EstimatedMemory", value: "1GB" },
  ];
  const recyclePlatform = [...platform, { name: "recycle-runner", value: "true" }];

  const vmDir = process.env.BERTH_VM_DIR;
  const vm = { ...(vmDir ? { dir: vmDir } : {}), accelerator: "tcg" };
  // Cold and recycled on one farm (snapshots off); resumed on a farm of its own (snapshots on).
  const coldFarm = await startFarm(ctx, join(dir, "cold"), { ...vm, snapshots: false }, registry.host);
  const snapshotFarm = await startFarm(ctx, join(dir, "snapshot"), { ...vm, snapshots: true }, registry.host);
  const host = await startDockerd(ctx, join(dir, "host-dockerd"), registry.host);
  const hostEnv = { ...process.env, ...host.env };
  const hostRun = async () => {
    const start = process.hrtime.bigint();
    const { stdout } = await run(DOCKER, ["run", "--rm", small, "echo", "PASS"], { env: hostEnv });
    const ms = elapsedMs(start);
    if (stdout !== "PASS\n") throw new Error(`docker run on the host printed ${JSON.stringify(stdout)}`);
    return ms;
  };

  // Before the rounds: each farm's first action (the image pulled and made a root disk, a cold boot); on the
  // snapshot farm it also starts the snapshot, waited for; the recycled key's first action boots its warm VM.
  const coldFirstMs = await dockerAction(coldFarm.server.clients, platform, small, "cold");
  ctx.log(`  first action on the cold farm (image pulled, root disk made): ${fmt(coldFirstMs)} ms`);
  const start = process.hrtime.bigint();
  const snapshotFirstMs = await dockerAction(snapshotFarm.server.clients, platform, small, "cold");
  const snapshotFailure = await snapshotMade(snapshotFarm);
  const snapshotReadyMs = elapsedMs(start);
  if (snapshotFailure) ctx.log(`  the snapshot failed: ${snapshotFailure}`);
  else ctx.log(`  snapshot ready ${fmt(snapshotReadyMs / 1000)} s after the snapshot farm's first action started`);
  const recycledFirstMs = await dockerAction(coldFarm.server.clients, recyclePlatform, small, "cold");

  const coldMs: number[] = [];
  const resumedMs: number[] = [];
  const recycledMs: number[] = [];
  const hostMs: number[] = [];
  const hostPullMs: number[] = [];
  const insideMs: number[] = [];
  let resumeFailure: string | undefined;
  for (let round = 0; round < Math.max(ctx.rounds, 3); round++) {
    // With the pull first (the image removed), then with the image present, as the recycled VM has it.
    await run(DOCKER, ["rmi", "-f", small], { env: hostEnv });
    hostPullMs.push(await hostRun());
    hostMs.push(await hostRun());
    coldMs.push(await dockerAction(coldFarm.server.clients, platform, small, "cold"));
    if (!snapshotFailure && !resumeFailure) {
      try {
        resumedMs.push(await dockerAction(snapshotFarm.server.clients, platform, small, "snapshot"));
      } catch (err) {
        resumeFailure = err instanceof Error ? err.message : String(err);
        ctx.log(`  the resumed action failed: ${resumeFailure}`);
      }
    }
    for (let i = 0; i < RECYCLED_PER_ROUND; i++) {
      recycledMs.push(await dockerAction(coldFarm.server.clients, recyclePlatform, small, "recycled"));
    }
    // The same docker run timed inside the warm VM by its own clock: what of a recycled action is Docker's.
    const inside = await vmAction(coldFarm.server.clients, recyclePlatform, insideArgs(small), "recycled");
    insideMs.push(insideSeconds(inside.stdout) * 1000);
    ctx.log(
      `  round ${round + 1}: cold ${fmt(coldMs.at(-1) ?? 0)} ms, resumed ${resumedMs.length > round ? fmt(resumedMs.at(-1) ?? 0) : "—"} ms, ` +
        `recycled ${fmtList(recycledMs.slice(-RECYCLED_PER_ROUND))} ms, host ${fmt(hostMs.at(-1) ?? 0)} ms ` +
        `(with the pull ${fmt(hostPullMs.at(-1) ?? 0)} ms)`,
    );
  }

  const cold = median(coldMs);
  const floor = median(hostMs);
  const recycled = median(recycledMs);
  const snapshotBroken = snapshotFailure ?? resumeFailure;
  const rows: Section["rows"] = [
    {
      metric: "Cold: boot, daemon start, pull, run (snapshots off)",
      berth: `${fmt(cold)} ms`,
      reference: `${fmt(floor)} ms (host dockerd, image present)`,
      ratio: ratio(cold, floor),
      target: "—",
      verdict: "—",
    },
    snapshotBroken === undefined
      ? {
          metric: "Resumed from a snapshot (daemon answering in it): pull, run",
          berth: `${fmt(median(resumedMs))} ms`,
          reference: `${fmt(cold)} ms (cold)`,
          ratio: ratio(median(resumedMs), cold),
          target: "—",
          verdict: "—",
        }
      : {
          metric: "Resumed from a snapshot: FAILED (see the notes)",
          berth: "—",
          reference: `${fmt(cold)} ms (cold)`,
          ratio: "—",
          target: "—",
          verdict: "—",
        },
    {
      metric: `Recycled (recycle-runner): the warm VM, its daemon and the pulled image (p50 of ${RECYCLED_PER_ROUND} × rounds)`,
      berth: `${fmt(recycled)} ms`,
      reference: `${fmt(cold)} ms (cold)`,
      ratio: ratio(recycled, cold),
      target: `≤ ${RECYCLED_TARGET_RATIO}× cold`,
      verdict: verdictAtMost(recycled / cold, RECYCLED_TARGET_RATIO),
    },
    {
      metric: "In the warm VM, by the guest's clock: the docker run alone (p50)",
      berth: `${fmt(median(insideMs))} ms`,
      reference: `${fmt(recycled)} ms (recycled, through Execute)`,
      ratio: ratio(median(insideMs), recycled),
      target: "—",
      verdict: "—",
    },
    {
      metric: "Recycled against the floor",
      berth: `${fmt(recycled)} ms`,
      reference: `${fmt(floor)} ms (host dockerd, image present)`,
      ratio: ratio(recycled, floor),
      target: "—",
      verdict: "—",
    },
    {
      metric: "Floor with the pull: host dockerd, the image removed first",
      berth: `${fmt(median(hostPullMs))} ms`,
      reference: `${fmt(floor)} ms (image present)`,
      ratio: ratio(median(hostPullMs), floor),
      target: "—",
      verdict: "—",
    },
  ];
  return {
    title:
      "Docker in a microVM (init-dockerd, QEMU under TCG): `docker run --rm IMAGE echo PASS` cold, resumed, recycled, vs a host dockerd",
    setup: [
      `The action of test/e2e/bazel-docker.test.ts through Execute on \`berth serve --workers 1\`: \`docker run --rm IMAGE echo PASS\` with workload-isolation-type=firecracker, init-dockerd=true, EstimatedMemory=1GB (1 GiB, 1 vCPU) in the Debian bookworm image with docker.io (test/support/docker-image.ts), QEMU under TCG, guest kernel ${assets.kernelRelease}. IMAGE is a one-layer busybox image in the same loopback registry (docker-registry), listed in images.insecureRegistries; the daemon in the VM pulls it through the worker's forwards. Timed from the Execute call to its last response (the action's upload is before the clock); each action is distinct (a salt), its stdout checked to be PASS and its VmUsed.start checked to be cold, snapshot or recycled as expected.`,
      `Cold and recycled: one farm, worker.vm.snapshots false. Cold: every action a new VM booted, dockerd started from the image (bridge networking), IMAGE pulled, the container run, the VM killed. Recycled: recycle-runner=true, the warm VM of that key (booted by a first action before the rounds, ${fmt(recycledFirstMs)} ms) with its daemon running and IMAGE already pulled; ${RECYCLED_PER_ROUND} actions per round. Then, in the same warm VM, one action per round times its own \`docker run --rm IMAGE echo PASS\` between two readings of the guest's /proc/uptime: the part of a recycled action that is Docker's in the guest (the client, containerd's shim, runc, the container), the rest being Execute, the worker and the VM's agent. That warm VM idles beside the other rows' actions, as on a worker.`,
      `Resumed: a second farm, worker.vm.snapshots true. Its first action (${fmt(snapshotFirstMs)} ms, cold) started the snapshot of the shape, a VM of the worker's own booted with its daemon started, then saved; the snapshot was ${snapshotFailure ? "not made" : `on disk ${fmt(snapshotReadyMs / 1000)} s after that action started`} and the rounds began after it. A resumed VM has the daemon answering but no image: it pulls IMAGE.`,
      `Floor: Debian's dockerd ${host.version} on the host (bench/dockerd.ts: its own socket and data root, no bridge, trusting the registry), \`docker run --rm IMAGE echo PASS\` by the docker client, IMAGE already pulled (run right after the same command with the pull, the image removed by \`docker rmi\` first, which is the last row). The cold farm's first action, which pulled the Docker image and made its root disk, took ${fmt(coldFirstMs)} ms and is not in the rows.`,
    ],
    rows,
    notes: [
      `Cold per round: ${fmtList(coldMs)} ms.`,
      snapshotBroken === undefined
        ? `Resumed per round: ${fmtList(resumedMs)} ms.`
        : `Snapshot path failed: ${snapshotBroken}`,
      `Recycled, in order: ${fmtList(recycledMs)} ms.`,
      `In the warm VM, docker run by the guest's clock per round: ${fmtList(insideMs)} ms.`,
      `Host dockerd per round: ${fmtList(hostMs)} ms; with the pull: ${fmtList(hostPullMs)} ms.`,
      `Load average (1/5/15 min) at this benchmark's start: ${fmtList(loadAtStart, 2)}; at its end: ${fmtList(loadavg(), 2)} (2 cores; other work on the machine slows every row, the floor too).`,
    ],
  };
}
