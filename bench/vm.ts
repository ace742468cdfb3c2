/**
 * MicroVMs under the accelerator this host has (TCG here), /bin/true in the Debian image of the image
 * benchmarks. Through VmRunner.run, as the worker runs an action: a cold action on its first use (the image's
 * root turned into an erofs disk in the round), a cold action with the disk already made, and an action resumed
 * from the VmSnapshots snapshot. Beside them the floor (QEMU booting the guest's kernel and initramfs to a marker
 * printed by init, no Berth) and raw QemuVm numbers: a cold boot to a ready agent, a resume of a snapshot to the
 * end of /bin/true, /bin/true in a recycled VM (recycle-runner) and, raw, in a running VM;
 * plus mkfs.erofs and mkfs.ext4 -d of the Debian root. Interleaved round by round.
 */
import { execFile } from "node:child_process";
import { chown, mkdir, readdir, readFile, rm } from "node:fs/promises";
import { loadavg } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { promisify } from "node:util";
import { parseConfig } from "../src/config/config.js";
import { VmUsed } from "../src/gen/berth/vm/v1/vm.js";
import type { LayeredRunRoot, Runner, RunRequest } from "../src/runner/runner.js";
import { RunnerIdentities } from "../src/runner/warm-pool.js";
import { bootToMarker, probeAccelerator } from "../src/vm/accelerator.js";
import type { GuestCommand } from "../src/vm/agent-protocol.js";
import { buildRootDisk, createScratchDisk } from "../src/vm/disk-image.js";
import { QemuVm } from "../src/vm/qemu-vm.js";
import { RecyclingVmRunner, WarmVms } from "../src/vm/recycling-vm-runner.js";
import { RootDisks } from "../src/vm/root-disks.js";
import { coldStarter, VmRunner, type VmSizing, type VmStarter } from "../src/vm/vm-runner.js";
import { VmSnapshots } from "../src/vm/vm-snapshots.js";
import { testGuestAssets } from "../test/support/guest.js";
import type { BenchContext } from "./context.js";
import { ensureRootfs, ROOTFS } from "./debian-image.js";
import { ratio, type Section, verdictAtMost } from "./report.js";
import { elapsedMs, fmt, fmtList, median, percentile } from "./stats.js";
import { measureVmIo } from "./vm-io.js";

const run = promisify(execFile);
const TRUE: GuestCommand = {
  argv: ["/bin/true"],
  env: { PATH: "/usr/bin:/bin" },
  workingDirectory: "/",
  uid: 0,
  gid: 0,
};
const RUNNING_VM_COMMANDS = 20;
const RECYCLED_PER_ROUND = 10;
const RECYCLED_TARGET_MS = 100;
/** Resumed actions are cheap: several per round give their p50 more than a sample a round. */
const RESUMED_PER_ROUND = 5;
const RESUME_TARGET_MS = 500;
const COLD_TARGET_RATIO = 1.5;
/** The host ids QEMU runs as, as a worker's slot (no account of this machine has them). */
const IDENTITY = { uid: 61_234, gid: 61_234 };
const SNAPSHOT_WAIT_MS = 300_000;

export async function benchVm(ctx: BenchContext): Promise<Section> {
  const loadAtStart = loadavg();
  const assets = await testGuestAssets();
  const accelerator = await probeAccelerator(assets);
  const origin = await ensureRootfs(ctx);
  const dir = join(ctx.scratchDir, "vm");
  await mkdir(dir, { recursive: true });
  ctx.defer(() => rm(dir, { recursive: true, force: true }));

  // The worker's defaults (worker.vm): 512 MiB, 1 vCPU, a 4 GiB scratch disk.
  const vmConfig = parseConfig({}).worker.vm;
  const sizing: VmSizing = {
    memoryBytes: vmConfig.memoryBytes,
    vcpus: vmConfig.vcpus,
    scratchDiskBytes: vmConfig.scratchDiskBytes,
    maxMemoryBytes: vmConfig.maxMemoryBytes,
    maxVcpus: vmConfig.maxVcpus,
    maxScratchDiskBytes: vmConfig.maxScratchDiskBytes,
  };
  // The Debian root as a one-layer image, as the layer store would hand it to the runner.
  const root: LayeredRunRoot = {
    kind: "layers",
    layerDirs: [ROOTFS],
    upperDirectories: [],
    inputRootPath: "/run/berth/execroot",
  };
  const runnerWith = (disks: RootDisks, starter: VmStarter) =>
    new VmRunner({
      assets,
      accelerator,
      disks,
      sizing,
      starter,
      identity: IDENTITY,
      bootTimeoutMs: vmConfig.bootTimeoutSeconds * 1000,
    });

  const disks = await RootDisks.open({ dir: join(dir, "disks"), maxBytes: vmConfig.rootDisksMaxSizeBytes });
  ctx.defer(() => disks.close());
  const snapshotsDir = join(dir, "snapshots");
  const snapshots = await VmSnapshots.open({
    dir: snapshotsDir,
    maxBytes: vmConfig.snapshotsMaxSizeBytes,
    cold: coldStarter,
    onError: (err) => ctx.log(`  a VM snapshot failed: ${String(err)}`),
  });
  ctx.defer(() => snapshots.close());
  const convertedRunner = runnerWith(disks, coldStarter);
  // recycle-runner: VMs kept between actions of one key, with ids of their own.
  const warmVms = new WarmVms(convertedRunner, {
    dir: join(dir, "warm"),
    maxRunners: 1,
    maxMemoryBytes: vmConfig.maxMemoryBytes,
    idleMillis: 600_000,
    identities: new RunnerIdentities((index) => ({
      index,
      uid: 61_300 + index,
      gid: 61_300 + index,
      cgroup: undefined,
    })),
  });
  await warmVms.open();
  ctx.defer(() => warmVms.close());
  const recyclingRunner = new RecyclingVmRunner(convertedRunner, warmVms);
  const RECYCLE = { key: "bench", preserveWorkspace: false, cleanInputs: [], outputs: [] };
  const snapshotRunner = runnerWith(disks, snapshots);

  let actions = 0;
  /** One action through the runner: /bin/true in a fresh input root, as the worker lays it out. */
  const action = async (
    runner: Runner,
    expectedStart: "cold" | "snapshot" | "recycled",
    recycle?: RunRequest["recycle"],
  ): Promise<number> => {
    const scratchDir = join(dir, `action-${++actions}`);
    const inputRoot = join(scratchDir, "root");
    await mkdir(inputRoot, { recursive: true });
    await chown(inputRoot, IDENTITY.uid, IDENTITY.gid);
    const request: RunRequest = {
      inputRoot,
      scratchDir,
      root,
      workingDirectory: "",
      argv: ["/bin/true"],
      env: [{ name: "PATH", value: "/usr/bin:/bin" }],
      timeoutMs: 120_000,
      stdoutPath: join(scratchDir, "stdout"),
      stderrPath: join(scratchDir, "stderr"),
      network: false,
      user: { uid: 0, gid: 0 },
      signal: new AbortController().signal,
      recycle,
    };
    const start = process.hrtime.bigint();
    const result = await runner.run(request);
    // A recycled VM lends its workspace until the outputs are read: that is part of its action.
    await result.finish?.();
    const ms = elapsedMs(start);
    if (result.exitCode !== 0) {
      throw new Error(`/bin/true in the VM exited ${result.exitCode}: ${await readFile(request.stderrPath, "utf8")}`);
    }
    const used = VmUsed.decode(result.auxiliaryMetadata?.[0]?.value ?? new Uint8Array());
    if (used.start !== expectedStart) throw new Error(`expected a ${expectedStart} VM, the runner says ${used.start}`);
    await rm(scratchDir, { recursive: true, force: true });
    return ms;
  };

  // Raw: the root disk made by hand, both formats.
  const erofsMs: number[] = [];
  const ext4Ms: number[] = [];
  const rootDisk = join(dir, "root.erofs");
  for (let round = 0; round < Math.min(ctx.rounds, 3); round++) {
    let start = process.hrtime.bigint();
    await buildRootDisk(ROOTFS, rootDisk);
    erofsMs.push(elapsedMs(start));
    start = process.hrtime.bigint();
    await buildRootDisk(ROOTFS, join(dir, "root.ext4"), { format: "ext4" });
    ext4Ms.push(elapsedMs(start));
    await rm(join(dir, "root.ext4"));
  }

  // Through the runner, first use of the snapshot store: the disk is made, the VM boots cold and the snapshot of
  // its shape is made beside it (a boot of the worker's own); every later action of the shape resumes it.
  const firstStart = process.hrtime.bigint();
  const firstMs = await action(snapshotRunner, "cold");
  while (!(await readdir(snapshotsDir)).some((name) => /^[0-9a-f]{64}$/.test(name))) {
    if (elapsedMs(firstStart) > SNAPSHOT_WAIT_MS) throw new Error("VmSnapshots made no snapshot in 5 minutes");
    await sleep(200);
  }
  const snapshotReadyMs = elapsedMs(firstStart);
  // The store lists it just after the rename.
  await sleep(500);
  await action(snapshotRunner, "snapshot");

  // Raw: the snapshot a raw resume starts from, a booted idle VM saved once.
  let serial = 0;
  const boot = async (resumeFrom?: string, scratchBase?: string) => {
    const runDir = join(dir, `vm-${serial++}`);
    await mkdir(runDir, { mode: 0o700 });
    const scratchDisk = join(runDir, resumeFrom ? "scratch.qcow2" : "scratch.img");
    if (resumeFrom && scratchBase) {
      await run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", scratchBase, "-F", "raw", scratchDisk]);
    } else {
      await createScratchDisk(scratchDisk, sizing.scratchDiskBytes);
    }
    return QemuVm.start({
      assets,
      accelerator,
      runDir,
      rootDisk,
      scratchDisk,
      scratchFormat: resumeFrom ? "qcow2" : "raw",
      memoryBytes: sizing.memoryBytes,
      vcpus: sizing.vcpus,
      resumeFrom,
    });
  };
  const snapshotVm = await boot();
  const snapshotStart = process.hrtime.bigint();
  const snapshot = join(dir, "snapshot");
  await snapshotVm.snapshot(snapshot);
  const snapshotMs = elapsedMs(snapshotStart);
  await snapshotVm.kill();
  const scratchBase = join(dir, "vm-0", "scratch.img");

  const floorMs: number[] = [];
  const firstUseMs: number[] = [];
  const coldMs: number[] = [];
  const resumedMs: number[] = [];
  const recycledMs: number[] = [];
  const rawReadyMs: number[] = [];
  const rawResumeMs: number[] = [];
  const runningMs: number[] = [];
  for (let round = 0; round < ctx.rounds; round++) {
    const floor = await bootToMarker(assets, { accelerator });
    if (floor === undefined) throw new Error("the guest did not reach init's marker");
    floorMs.push(floor);

    // (a) First use: a store of disks of its own, empty, so the runner converts the image in the action.
    const fresh = await RootDisks.open({
      dir: join(dir, `first-use-${round}`),
      maxBytes: vmConfig.rootDisksMaxSizeBytes,
    });
    try {
      firstUseMs.push(await action(runnerWith(fresh, coldStarter), "cold"));
    } finally {
      await fresh.close();
      await rm(join(dir, `first-use-${round}`), { recursive: true, force: true });
    }
    // (b) The disk already made, a cold boot.
    coldMs.push(await action(convertedRunner, "cold"));
    // (c) Resumed from the snapshot.
    for (let i = 0; i < RESUMED_PER_ROUND; i++) resumedMs.push(await action(snapshotRunner, "snapshot"));
    // (d) In a recycled VM (the first action of the key, before the rounds, booted it).
    if (round === 0) await action(recyclingRunner, "cold", RECYCLE);
    for (let i = 0; i < RECYCLED_PER_ROUND; i++) recycledMs.push(await action(recyclingRunner, "recycled", RECYCLE));

    // Raw QemuVm: a resume of the snapshot to /bin/true's end; a cold boot to a ready agent, then commands in it.
    let start = process.hrtime.bigint();
    const resumed = await boot(snapshot, scratchBase);
    await resumed.run(TRUE);
    rawResumeMs.push(elapsedMs(start));
    await resumed.kill();
    start = process.hrtime.bigint();
    const cold = await boot();
    rawReadyMs.push(elapsedMs(start));
    for (let i = 0; i < RUNNING_VM_COMMANDS; i++) {
      const one = process.hrtime.bigint();
      const result = await cold.run(TRUE);
      runningMs.push(elapsedMs(one));
      if (result.exitCode !== 0) throw new Error(`/bin/true in the VM exited ${result.exitCode}`);
    }
    await cold.kill();
    await rm(join(dir, `vm-${serial - 1}`), { recursive: true, force: true });
    await rm(join(dir, `vm-${serial - 2}`), { recursive: true, force: true });
    ctx.log(
      `  round ${round + 1}: floor ${fmt(floor)} ms, first use ${fmt(firstUseMs.at(-1) ?? 0)} ms, ` +
        `cold ${fmt(coldMs.at(-1) ?? 0)} ms, resumed ${fmtList(resumedMs.slice(-RESUMED_PER_ROUND))} ms`,
    );
  }

  const floor = median(floorMs);
  const floorRef = `${fmt(floor)} ms (floor)`;
  // How the action's files cross: the 9p share VmRunner uses, against plugged-in disks (issue #15 asks for both).
  const io = await measureVmIo(assets, accelerator, rootDisk, dir, Math.min(ctx.rounds, 3), "large");
  const ioSmall = await measureVmIo(assets, accelerator, rootDisk, dir, Math.min(ctx.rounds, 3), "small");
  const rows: Section["rows"] = [
    {
      metric: "VmRunner: cold action, first use (disk conversion included)",
      berth: `${fmt(median(firstUseMs))} ms`,
      reference: floorRef,
      ratio: ratio(median(firstUseMs), floor),
      target: "—",
      verdict: "—",
    },
    {
      metric: "VmRunner: cold action, disk already converted",
      berth: `${fmt(median(coldMs))} ms`,
      reference: floorRef,
      ratio: ratio(median(coldMs), floor),
      target: `≤ ${COLD_TARGET_RATIO}× floor`,
      verdict: verdictAtMost(median(coldMs) / floor, COLD_TARGET_RATIO),
    },
    {
      metric: `VmRunner: action resumed from a snapshot (p50 of ${RESUMED_PER_ROUND} × rounds)`,
      berth: `${fmt(median(resumedMs))} ms`,
      reference: floorRef,
      ratio: ratio(median(resumedMs), floor),
      target: `≤ ${RESUME_TARGET_MS} ms`,
      verdict: verdictAtMost(median(resumedMs), RESUME_TARGET_MS),
    },
    {
      metric: "Raw QemuVm: cold boot to a ready agent",
      berth: `${fmt(median(rawReadyMs))} ms`,
      reference: floorRef,
      ratio: ratio(median(rawReadyMs), floor),
      target: "—",
      verdict: "—",
    },
    {
      metric: "Raw QemuVm: snapshot resume and /bin/true",
      berth: `${fmt(median(rawResumeMs))} ms`,
      reference: `${fmt(median(resumedMs))} ms (VmRunner resumed)`,
      ratio: ratio(median(rawResumeMs), median(resumedMs)),
      target: "—",
      verdict: "—",
    },
    {
      metric: `VmRunner: action in a recycled VM, recycle-runner (p50 of ${RECYCLED_PER_ROUND} × rounds)`,
      berth: `${fmt(median(recycledMs))} ms`,
      reference: `${fmt(median(runningMs))} ms (a command in a running VM)`,
      ratio: ratio(median(recycledMs), median(runningMs)),
      target: `≤ ${RECYCLED_TARGET_MS} ms`,
      verdict: verdictAtMost(median(recycledMs), RECYCLED_TARGET_MS),
    },
    {
      metric: "A command in a running VM, raw QemuVm (p50)",
      berth: `${fmt(median(runningMs))} ms`,
      reference: "—",
      ratio: "—",
      target: "—",
      verdict: "—",
    },
    {
      metric: "Inputs in and outputs out, a large tree: 9p share (VmRunner's way) vs plugged-in disks",
      berth: `${fmt(median(io.shareMs))} ms`,
      reference: `${fmt(median(io.diskMs))} ms (erofs in, ext4 out)`,
      ratio: ratio(median(io.shareMs), median(io.diskMs)),
      target: "—",
      verdict: "—",
    },
    {
      metric: "Inputs in and outputs out, a small tree: 9p share vs plugged-in disks",
      berth: `${fmt(median(ioSmall.shareMs))} ms`,
      reference: `${fmt(median(ioSmall.diskMs))} ms (erofs in, ext4 out)`,
      ratio: ratio(median(ioSmall.shareMs), median(ioSmall.diskMs)),
      target: "—",
      verdict: "—",
    },
    {
      metric: "Root disk from the Debian root: mkfs.erofs / mkfs.ext4 -d",
      berth: `${fmt(median(erofsMs))} ms / ${fmt(median(ext4Ms))} ms`,
      reference: "—",
      ratio: "—",
      target: "—",
      verdict: "—",
    },
  ];
  return {
    title: `MicroVMs (QEMU, ${accelerator.toUpperCase()}): /bin/true through the VM runner, cold and resumed, vs the boot floor`,
    setup: [
      `Guest: Debian's kernel ${assets.kernelRelease} (uncompressed vmlinux) and Berth's initramfs (busybox, init, berth-agent); QEMU -M q35, ${accelerator === "kvm" ? "-enable-kvm -cpu host" : "-accel tcg -cpu max"}, the worker's default size (${sizing.memoryBytes / 1024 ** 2} MiB, ${sizing.vcpus} vCPU, a ${sizing.scratchDiskBytes / 1024 ** 3} GiB sparse ext4 scratch disk under an overlay), no network.`,
      `Image: the Debian root of the image benchmarks (${origin}) as a one-layer image; the runner's RootDisks turns it into a read-only erofs disk.`,
      "Floor: QEMU booting the same kernel and initramfs to a marker init prints before loading any module, no Berth.",
      "VmRunner: `VmRunner.run` as the worker calls it (QEMU as the slot's uid 61234, the input root shared by 9p and mounted at /run/berth/execroot, /bin/true as root in the image), timed from the call to its return, which is after the VM is killed and its run directory removed. " +
        "First use: a new, empty RootDisks store each round, so the action converts the image. Disk converted: the store already holds the disk, cold boot (coldStarter). " +
        `Resumed: VmSnapshots as the worker opens it; its snapshot was made beside a first cold action before the rounds, in the background as on a worker (that action took ${fmt(firstMs)} ms with the snapshot's own boot competing for the cores; the snapshot was ready ${fmt(snapshotReadyMs / 1000)} s after the action's start); ${RESUMED_PER_ROUND} resumed actions per round. The runner's metadata (VmUsed.start) is checked to say cold or snapshot as expected.`,
      `Raw QemuVm (no runner, no share): a cold boot from QemuVm.start to the agent's hello; a resume from a qcow2 overlay of a snapshot's scratch disk to /bin/true's exit status (snapshot of the idle VM taken once: ${fmt(snapshotMs)} ms); ${RUNNING_VM_COMMANDS} commands per round in the cold-booted VM. Recycled: RecyclingVmRunner (recycle-runner) around the converted-disk runner, the same key each time: the inputs moved into the kept VM's workspace, /bin/true, the workspace emptied again.`,
      "Inputs and outputs (bench/vm-io.ts), one booted VM, the same trees both ways (large: 300 files of 4 KiB in 10 directories and one of 16 MiB in, 20 files of 4 KiB and one of 8 MiB out; small: 3 files of 1 KiB in, one of 4 KiB out): the 9p share mounted by the agent, used, unmounted, the outputs read where they are on the host; against an erofs disk of the inputs made on the host and an empty ext4 disk, plugged in, mounted, used, unplugged, and the outputs dumped from the ext4 image (debugfs rdump).",
    ],
    rows,
    notes: [
      `Floor per round: ${fmtList(floorMs)} ms.`,
      `VmRunner first use per round: ${fmtList(firstUseMs)} ms; disk converted: ${fmtList(coldMs)} ms.`,
      `VmRunner resumed, in order: ${fmtList(resumedMs)} ms (p90 ${fmt(percentile(resumedMs, 90))} ms).`,
      `Raw ready agent per round: ${fmtList(rawReadyMs)} ms; raw resume: ${fmtList(rawResumeMs)} ms.`,
      `Running VM: p90 ${fmt(percentile(runningMs, 90))} ms over ${runningMs.length} commands.`,
      `mkfs.erofs per round: ${fmtList(erofsMs)} ms; mkfs.ext4 -d: ${fmtList(ext4Ms)} ms.`,
      `Recycled VM, in order: ${fmtList(recycledMs)} ms (p90 ${fmt(percentile(recycledMs, 90))} ms).`,
      `Inputs and outputs per round, large tree: share ${fmtList(io.shareMs)} ms, disks ${fmtList(io.diskMs)} ms; small tree: share ${fmtList(ioSmall.shareMs)} ms, disks ${fmtList(ioSmall.diskMs)} ms.`,
      `Load average (1/5/15 min) at this benchmark's start: ${fmtList(loadAtStart, 2)}; at its end: ${fmtList(loadavg(), 2)} (2 cores; a load above 2 slows every number here, the floor too).`,
    ],
  };
}
