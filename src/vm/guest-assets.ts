import { execFile } from "node:child_process";
import { access, constants, readFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

/** What a VM boots: built by scripts/guest-assets.sh into worker.vm.dir. */
export interface GuestAssets {
  /** The guest kernel's release (`uname -r` inside the VM). */
  kernelRelease: string;
  /** Absolute path of the uncompressed kernel (vmlinux). */
  kernel: string;
  /** Absolute path of the initramfs (cpio) holding init, busybox, berth-agent and the modules. */
  initramfs: string;
}

/** The guest in `dir`, or undefined when it was never built there (the VM capability is then absent). */
export async function loadGuestAssets(dir: string): Promise<GuestAssets | undefined> {
  let manifest: { kernelRelease?: unknown; kernel?: unknown; initramfs?: unknown };
  try {
    manifest = JSON.parse(await readFile(join(dir, "guest.json"), "utf8"));
  } catch {
    return undefined;
  }
  const { kernelRelease, kernel, initramfs } = manifest;
  if (typeof kernelRelease !== "string" || typeof kernel !== "string" || typeof initramfs !== "string") {
    return undefined;
  }
  const assets = { kernelRelease, kernel: join(dir, kernel), initramfs: join(dir, initramfs) };
  try {
    await access(assets.kernel, constants.R_OK);
    await access(assets.initramfs, constants.R_OK);
  } catch {
    return undefined;
  }
  return assets;
}

/** Builds (or finds up to date) the guest in `dir` with the project's script, then loads it. */
export async function ensureGuestAssets(dir: string): Promise<GuestAssets> {
  const script = fileURLToPath(new URL("../../../scripts/guest-assets.sh", import.meta.url));
  await promisify(execFile)(script, [dir], { maxBuffer: 16 * 1024 ** 2 });
  const assets = await loadGuestAssets(dir);
  if (!assets) throw new Error(`${script} ran but left no guest in ${dir}`);
  return assets;
}

/** Whether `qemuPath` (a name looked up in PATH, or a path) starts; the VM capability needs it. */
export async function qemuAvailable(qemuPath: string): Promise<boolean> {
  try {
    await promisify(execFile)(qemuPath, ["--version"], { timeout: 10_000 });
    return true;
  } catch {
    return false;
  }
}

/** Where worker.vm.dir points, <dataDir>/vm when unset. */
export function guestAssetsDir(config: { dataDir: string; worker: { vm: { dir?: string } } }): string {
  return config.worker.vm.dir ?? join(config.dataDir, "vm");
}
