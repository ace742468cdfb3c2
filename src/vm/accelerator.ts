import { spawn } from "node:child_process";
import { access, constants } from "node:fs/promises";
import type { GuestAssets } from "./guest-assets.js";
import type { Accelerator } from "./qemu-vm.js";

/** What init prints (and then powers off) when its kernel command line has berth.marker. */
export const GUEST_MARKER = "BERTH-GUEST-MARKER";

export interface MarkerBootOptions {
  accelerator: Accelerator;
  qemuPath?: string;
  timeoutMs?: number;
}

/**
 * Boots the guest's kernel and initramfs with no disks up to init's marker and ends QEMU: a real guest telling
 * whether an accelerator runs it, and the floor a VM's boot is measured against. Resolves with the time to
 * the marker, or undefined when QEMU ended or the time ran out without it.
 */
export function bootToMarker(assets: GuestAssets, options: MarkerBootOptions): Promise<number | undefined> {
  const started = performance.now();
  const child = spawn(
    options.qemuPath ?? "qemu-system-x86_64",
    [
      "-M",
      "q35",
      ...(options.accelerator === "kvm" ? ["-enable-kvm", "-cpu", "host"] : ["-accel", "tcg", "-cpu", "max"]),
      "-m",
      "256M",
      "-nodefaults",
      "-no-user-config",
      "-display",
      "none",
      "-no-reboot",
      "-nic",
      "none",
      "-kernel",
      assets.kernel,
      "-initrd",
      assets.initramfs,
      "-append",
      "console=ttyS0 quiet panic=-1 berth.marker",
      "-serial",
      "stdio",
    ],
    { stdio: ["ignore", "pipe", "ignore"], env: { PATH: process.env.PATH ?? "/usr/bin:/bin" } },
  );
  return new Promise((resolve) => {
    let seen = "";
    const finish = (value: number | undefined) => {
      clearTimeout(timer);
      child.kill("SIGKILL");
      resolve(value);
    };
    const timer = setTimeout(() => finish(undefined), options.timeoutMs ?? 30_000);
    child.stdout.on("data", (chunk: Buffer) => {
      seen = (seen + chunk.toString("latin1")).slice(-4096);
      if (seen.includes(GUEST_MARKER)) finish(performance.now() - started);
    });
    child.once("error", () => finish(undefined));
    child.once("exit", () => finish(undefined));
  });
}

const probes = new Map<string, Promise<Accelerator>>();

/**
 * kvm when `kvmDevice` is usable and a real guest boots under it, tcg otherwise: asked once per QEMU and kernel
 * (a worker's start), since a nested or broken /dev/kvm can exist and still crash every guest.
 */
export function probeAccelerator(
  assets: GuestAssets,
  options: { qemuPath?: string; kvmDevice?: string; timeoutMs?: number } = {},
): Promise<Accelerator> {
  const key = `${options.qemuPath ?? ""}\0${assets.kernel}\0${options.kvmDevice ?? "/dev/kvm"}`;
  let probe = probes.get(key);
  if (!probe) {
    probe = (async () => {
      try {
        await access(options.kvmDevice ?? "/dev/kvm", constants.R_OK | constants.W_OK);
      } catch {
        return "tcg";
      }
      const reached = await bootToMarker(assets, {
        accelerator: "kvm",
        qemuPath: options.qemuPath,
        timeoutMs: options.timeoutMs ?? 20_000,
      });
      return reached === undefined ? "tcg" : "kvm";
    })();
    probes.set(key, probe);
  }
  return probe;
}
