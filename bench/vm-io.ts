/**
 * How an action's files cross into and out of a VM, the two ways issue #15 names, side by side in one VM:
 * - share: the host directory shared by 9p (what VmRunner does): the agent mounts it, the guest reads the inputs
 *   and writes the outputs there, the host reads the outputs where they are;
 * - disks: the inputs made into an erofs disk on the host (mkfs.erofs) and plugged in, an empty ext4 disk plugged
 *   in for the outputs, both mounted in the guest, then unplugged, and the outputs copied out of the ext4 image
 *   on the host (debugfs rdump: no loop mount).
 * The same tree both ways, of two shapes: large (300 files of 4 KiB in 10 directories and one of 16 MiB in; 20 files
 * of 4 KiB and one of 8 MiB out) and small (3 files of 1 KiB in, one of 4 KiB out).
 */
import { execFile } from "node:child_process";
import { chown, mkdir, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { buildRootDisk, createScratchDisk } from "../src/vm/disk-image.js";
import type { GuestAssets } from "../src/vm/guest-assets.js";
import { type Accelerator, QemuVm } from "../src/vm/qemu-vm.js";
import { elapsedMs } from "./stats.js";

const run = promisify(execFile);
const SHARE_TAG = "bench-share";

export interface VmIoTimes {
  shareMs: number[];
  diskMs: number[];
}

/** A compile-like action's files (many inputs, some large) or a test-like one's (a few small files). */
export type VmIoShape = "large" | "small";

const SHAPES = {
  large: { dirs: 10, files: 30, fileBytes: 4096, bigMiB: 16, outputs: 20, outputMiB: 8 },
  small: { dirs: 1, files: 3, fileBytes: 1024, bigMiB: 0, outputs: 1, outputMiB: 0 },
};

async function inputTree(dir: string, shape: VmIoShape): Promise<void> {
  const { dirs, files, fileBytes, bigMiB } = SHAPES[shape];
  for (let d = 0; d < dirs; d++) {
    await mkdir(join(dir, `d${d}`), { recursive: true });
    for (let f = 0; f < files; f++) await writeFile(join(dir, `d${d}`, `f${f}`), Buffer.alloc(fileBytes, d + f));
  }
  if (bigMiB > 0) await writeFile(join(dir, "big"), Buffer.alloc(bigMiB * 1024 ** 2, 7));
}

/** The guest's side: read every input under $1, write the outputs under $2. */
function guestWork(shape: VmIoShape): string {
  const { outputs, outputMiB } = SHAPES[shape];
  return (
    'find "$1" -type f -exec cat {} + > /dev/null && mkdir -p "$2" && ' +
    `i=0; while [ $i -lt ${outputs} ]; do head -c 4096 /dev/zero > "$2/o$i"; i=$((i+1)); done` +
    (outputMiB > 0 ? `; dd if=/dev/zero of="$2/big" bs=1M count=${outputMiB} 2>/dev/null` : "")
  );
}

export async function measureVmIo(
  assets: GuestAssets,
  accelerator: Accelerator,
  rootDisk: string,
  dir: string,
  rounds: number,
  shape: VmIoShape,
): Promise<VmIoTimes> {
  const GUEST_WORK = guestWork(shape);
  const outputCount = SHAPES[shape].outputs + (SHAPES[shape].outputMiB > 0 ? 1 : 0);
  const work = join(dir, `io-${shape}`);
  const share = join(work, "share");
  await mkdir(share, { recursive: true });
  await inputTree(join(work, "inputs"), shape);
  await mkdir(join(work, "run"), { mode: 0o700 });
  await createScratchDisk(join(work, "scratch.img"), 512 * 1024 ** 2);
  const vm = await QemuVm.start({
    assets,
    accelerator,
    runDir: join(work, "run"),
    rootDisk,
    scratchDisk: join(work, "scratch.img"),
    share: { path: share, tag: SHARE_TAG },
    hotplugSlots: 2,
  });
  const sh = async (script: string, ...args: string[]) => {
    const result = await vm.run(
      { argv: ["/bin/sh", "-c", script, "sh", ...args], env: { PATH: "/bin" }, workingDirectory: "/", uid: 0, gid: 0 },
      { inAgentRoot: true, timeoutMs: 120_000 },
    );
    if (result.exitCode !== 0) throw new Error(`in the VM: ${script}: ${result.stderr.toString()}`);
    return result.stdout.toString();
  };
  const times: VmIoTimes = { shareMs: [], diskMs: [] };
  try {
    for (let round = 0; round < rounds; round++) {
      // Share: the inputs laid out in the shared directory (as the worker lays out an input root), mounted, used.
      const root = join(share, `r${round}`);
      await run("cp", ["-a", join(work, "inputs"), root]);
      await chown(share, 0, 0);
      let start = process.hrtime.bigint();
      await vm.mount(`/mnt/share-${round}`);
      await sh(GUEST_WORK, `/newroot/mnt/share-${round}/r${round}`, `/newroot/mnt/share-${round}/r${round}/out`);
      await sh('umount "$1"', `/newroot/mnt/share-${round}`);
      const shared = await readdir(join(root, "out"));
      for (const name of shared) await readFile(join(root, "out", name));
      times.shareMs.push(elapsedMs(start));
      if (shared.length !== outputCount) throw new Error(`the share brought back ${shared.length} outputs`);

      // Disks: an erofs disk of the inputs in, an ext4 disk out, unplugged, the outputs dumped on the host.
      const inImage = join(work, `in-${round}.erofs`);
      const outImage = join(work, `out-${round}.img`);
      const outDir = join(work, `out-${round}`);
      start = process.hrtime.bigint();
      await buildRootDisk(join(work, "inputs"), inImage);
      await createScratchDisk(outImage, 64 * 1024 ** 2);
      const input = await vm.attachDisk(inImage);
      const output = await vm.attachDisk(outImage, { writable: true });
      await sh(
        // biome-ignore lint/suspicious/noTemplateCurlyInString: a shell's ${d##*/}, not a template.
        'dev() { for d in /sys/block/vd*; do [ "$(cat $d/serial)" = "$1" ] && echo /dev/${d##*/}; done; }; ' +
          'i=0; while [ -z "$(dev "$2")" ] && [ $i -lt 500 ]; do usleep 10000; i=$((i+1)); done; ' +
          'mkdir -p /in /out && mount -t erofs -o ro "$(dev "$1")" /in && mount -t ext4 "$(dev "$2")" /out && ' +
          `set -- /in /out/out && ${GUEST_WORK} && umount /in /out`,
        input.serial,
        output.serial,
      );
      await vm.detachDisk(input);
      await vm.detachDisk(output);
      await mkdir(outDir);
      await run("debugfs", ["-R", `rdump /out ${outDir}`, outImage]);
      const dumped = await readdir(join(outDir, "out"));
      times.diskMs.push(elapsedMs(start));
      if (dumped.length !== outputCount) throw new Error(`the disk brought back ${dumped.length} outputs`);
      await rm(inImage);
      await rm(outImage);
      await rm(outDir, { recursive: true });
      await rm(root, { recursive: true });
    }
  } finally {
    await vm.kill();
    await rm(work, { recursive: true, force: true });
  }
  return times;
}
