/**
 * MicroVMs under the accelerator this host has (TCG here): the floor (QEMU booting the guest's kernel and
 * initramfs to a marker printed by init, no Berth), a cold boot to a ready agent and to the end of /bin/true,
 * a snapshot resume to the end of /bin/true, and /bin/true in a running VM; plus turning the Debian image's
 * root into a read-only disk (mkfs.erofs, mkfs.ext4 -d). Interleaved round by round.
 */
import { execFile } from "node:child_process";
import { mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { bootToMarker, probeAccelerator } from "../src/vm/accelerator.js";
import type { GuestCommand } from "../src/vm/agent-protocol.js";
import { buildRootDisk, createScratchDisk } from "../src/vm/disk-image.js";
import { QemuVm } from "../src/vm/qemu-vm.js";
import { testGuestAssets } from "../test/support/guest.js";
import type { BenchContext } from "./context.js";
import { ensureRootfs, ROOTFS } from "./debian-image.js";
import { ratio, type Section, verdictAtMost } from "./report.js";
import { elapsedMs, fmt, fmtList, median } from "./stats.js";

const run = promisify(execFile);
const TRUE: GuestCommand = {
  argv: ["/bin/true"],
  env: { PATH: "/usr/bin:/bin" },
  workingDirectory: "/",
  uid: 0,
  gid: 0,
};
const RECYCLED_RUNS = 20;
const RESUME_TARGET_MS = 500;
const RECYCLED_TARGET_MS = 100;
const COLD_TARGET_RATIO = 1.5;

export async function benchVm(ctx: BenchContext): Promise<Section> {
  const assets = await testGuestAssets();
  const accelerator = await probeAccelerator(assets);
  const origin = await ensureRootfs(ctx);
  const dir = join(ctx.scratchDir, "vm");
  await mkdir(dir, { recursive: true });
  ctx.defer(() => rm(dir, { recursive: true, force: true }));

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

  let serial = 0;
  const boot = async (resumeFrom?: string, scratchBase?: string) => {
    const runDir = join(dir, `vm-${serial++}`);
    await mkdir(runDir, { mode: 0o700 });
    const scratchDisk = join(runDir, resumeFrom ? "scratch.qcow2" : "scratch.img");
    if (resumeFrom && scratchBase) {
      await run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", scratchBase, "-F", "raw", scratchDisk]);
    } else {
      await createScratchDisk(scratchDisk, 4 * 1024 ** 3);
    }
    return QemuVm.start({
      assets,
      accelerator,
      runDir,
      rootDisk,
      scratchDisk,
      scratchFormat: resumeFrom ? "qcow2" : "raw",
      resumeFrom,
    });
  };

  // The snapshot every resume starts from: a booted, idle VM, saved once.
  const snapshotVm = await boot();
  const snapshotStart = process.hrtime.bigint();
  const snapshot = join(dir, "snapshot");
  await snapshotVm.snapshot(snapshot);
  const snapshotMs = elapsedMs(snapshotStart);
  await snapshotVm.kill();
  const scratchBase = join(dir, "vm-0", "scratch.img");

  const floorMs: number[] = [];
  const readyMs: number[] = [];
  const coldMs: number[] = [];
  const resumeMs: number[] = [];
  const recycledMs: number[] = [];
  for (let round = 0; round < ctx.rounds; round++) {
    const floor = await bootToMarker(assets, { accelerator });
    if (floor === undefined) throw new Error("the guest did not reach init's marker");
    floorMs.push(floor);

    let start = process.hrtime.bigint();
    const cold = await boot();
    readyMs.push(elapsedMs(start));
    const result = await cold.run(TRUE);
    coldMs.push(elapsedMs(start));
    if (result.exitCode !== 0) throw new Error(`/bin/true in the VM exited ${result.exitCode}`);
    for (let i = 0; i < RECYCLED_RUNS; i++) {
      const one = process.hrtime.bigint();
      await cold.run(TRUE);
      recycledMs.push(elapsedMs(one));
    }
    await cold.kill();

    start = process.hrtime.bigint();
    const resumed = await boot(snapshot, scratchBase);
    await resumed.run(TRUE);
    resumeMs.push(elapsedMs(start));
    await resumed.kill();
    ctx.log(
      `  round ${round + 1}: floor ${fmt(floor)} ms, cold ${fmt(coldMs.at(-1) ?? 0)} ms, resume ${fmt(resumeMs.at(-1) ?? 0)} ms`,
    );
  }

  const floor = median(floorMs);
  const rows: Section["rows"] = [
    {
      metric: "Cold boot to a ready agent (disk converted)",
      berth: `${fmt(median(readyMs))} ms`,
      reference: `${fmt(floor)} ms (floor)`,
      ratio: ratio(median(readyMs), floor),
      target: "—",
      verdict: "—",
    },
    {
      metric: "Cold boot and /bin/true (disk converted)",
      berth: `${fmt(median(coldMs))} ms`,
      reference: `${fmt(floor)} ms (floor)`,
      ratio: ratio(median(coldMs), floor),
      target: `≤ ${COLD_TARGET_RATIO}× floor`,
      verdict: verdictAtMost(median(coldMs) / floor, COLD_TARGET_RATIO),
    },
    {
      metric: "Snapshot resume and /bin/true (p50)",
      berth: `${fmt(median(resumeMs))} ms`,
      reference: `${fmt(floor)} ms (floor)`,
      ratio: ratio(median(resumeMs), floor),
      target: `≤ ${RESUME_TARGET_MS} ms`,
      verdict: verdictAtMost(median(resumeMs), RESUME_TARGET_MS),
    },
    {
      metric: "/bin/true in a running VM (p50)",
      berth: `${fmt(median(recycledMs))} ms`,
      reference: "—",
      ratio: "—",
      target: `≤ ${RECYCLED_TARGET_MS} ms`,
      verdict: verdictAtMost(median(recycledMs), RECYCLED_TARGET_MS),
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
    title: `MicroVMs (QEMU, ${accelerator.toUpperCase()}): boot, snapshot resume and a running VM vs the boot floor`,
    setup: [
      `Guest: Debian's kernel ${assets.kernelRelease} (uncompressed vmlinux) and Berth's initramfs (busybox, init, berth-agent); QEMU -M q35, ${accelerator === "kvm" ? "-enable-kvm -cpu host" : "-accel tcg -cpu max"}, 512 MiB, 1 vCPU, no network.`,
      `Root disk: the Debian image's root (${origin}) as erofs, read-only; a 4 GiB sparse ext4 scratch disk under an overlay.`,
      "Floor: QEMU booting the same kernel and initramfs to a marker init prints before loading any module, no Berth.",
      `Cold: from QemuVm.start (scratch disk made, QEMU spawned) to the agent's hello, and to /bin/true's exit status. Resume: a qcow2 overlay of the snapshot's scratch disk, QEMU -incoming, to /bin/true's exit status (snapshot of the idle VM taken once: ${fmt(snapshotMs)} ms). Running VM: ${RECYCLED_RUNS} commands per round after the cold one.`,
    ],
    rows,
    notes: [
      `Floor per round: ${fmtList(floorMs)} ms.`,
      `Ready agent per round: ${fmtList(readyMs)} ms; cold /bin/true: ${fmtList(coldMs)} ms.`,
      `Resume per round: ${fmtList(resumeMs)} ms.`,
      `Running VM: p90 ${fmt([...recycledMs].sort((a, b) => a - b)[Math.floor(recycledMs.length * 0.9)] ?? 0)} ms over ${recycledMs.length} commands.`,
      `mkfs.erofs per round: ${fmtList(erofsMs)} ms; mkfs.ext4 -d: ${fmtList(ext4Ms)} ms.`,
    ],
  };
}
