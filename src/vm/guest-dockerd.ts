import { createHash } from "node:crypto";
import { lstat } from "node:fs/promises";
import { join } from "node:path";
import { DOCKER_HUB } from "../image/reference.js";
import type { DockerdRequest } from "../runner/runner.js";
import { Code, StatusError } from "../status/status.js";
import type { QemuVm } from "./qemu-vm.js";
import { type GuestRelay, planRelays, type RegistryEndpoint, registryEndpoint } from "./registry-forwards.js";
import { GUEST_NETWORK } from "./vm-network.js";

/** The worker's settings for daemons in VMs (worker.vm.dockerd and images.insecureRegistries). */
export interface DockerdSettings {
  startTimeoutMs: number;
  insecureRegistries: readonly string[];
  /** Registry mirrors given to the daemon (registry-mirrors in its daemon.json). */
  registryMirrors: readonly string[];
}

/** A daemon's setup in one VM, the same for every VM of one key (part of a snapshot's key). */
export interface DockerdPlan {
  relays: GuestRelay[];
  daemonConfig: string;
  tcp: boolean;
  timeoutMs: number;
  /** What a snapshot of a VM with this daemon running fits. */
  key: string;
}

export const DOCKERD_START_TIMEOUT_SETTING = "worker.vm.dockerd.startTimeoutSeconds";

/** The daemon's configuration and the registries the guest reaches (the farm's, and the action's image's). */
export function dockerdPlan(settings: DockerdSettings, request: DockerdRequest): DockerdPlan {
  const endpoints: RegistryEndpoint[] = [];
  for (const registry of [
    ...(request.imageRegistry ? [request.imageRegistry] : []),
    ...settings.insecureRegistries,
    ...settings.registryMirrors,
  ]) {
    const endpoint = registryEndpoint(registry);
    if (endpoint) endpoints.push(endpoint);
  }
  const relays = planRelays(endpoints);
  const daemonConfig = JSON.stringify({
    "insecure-registries": [...settings.insecureRegistries],
    "registry-mirrors": [...settings.registryMirrors],
  });
  const timeoutMs = settings.startTimeoutMs;
  const key = createHash("sha256")
    .update(JSON.stringify([relays, daemonConfig, request.tcp, timeoutMs]))
    .digest("hex");
  return { relays, daemonConfig, tcp: request.tcp, timeoutMs, key };
}

/**
 * Whether the image's layers (bottom to top) hold a dockerd where the guest looks for one: checked on the
 * worker before a VM boots, so that an image without Docker is refused at once, not after a boot.
 */
export async function imageHasDockerd(layerDirs: readonly string[]): Promise<boolean> {
  for (const path of ["usr/bin/dockerd", "usr/sbin/dockerd", "usr/local/bin/dockerd"]) {
    for (const layer of [...layerDirs].reverse()) {
      const info = await lstat(join(layer, path)).catch(() => undefined);
      if (!info) continue;
      // A character device 0/0 is the layer store's whiteout: deleted by this layer.
      if (info.isFile() || info.isSymbolicLink()) return true;
      break;
    }
  }
  return false;
}

export function noDockerd(image: string): StatusError {
  return new StatusError(
    Code.FAILED_PRECONDITION,
    `init-dockerd=true starts Docker's daemon from the action's image, and ${image} has no dockerd ` +
      "(in /usr/bin, /usr/sbin or /usr/local/bin): use an image with Docker installed (docker.io, docker-ce)",
    {
      preconditionFailures: [
        { type: "IMAGE_WITHOUT_DOCKERD", subject: `container-image=${image}`, description: "the image has no dockerd" },
      ],
    },
  );
}

/**
 * Starts the daemon in `vm` (src/vm/guest/start-dockerd.sh, run in the agent's root) and resolves once it
 * answers, with how it runs: "bridge", or "host: why" when it has no bridge of its own.
 */
export async function startGuestDockerd(vm: QemuVm, plan: DockerdPlan, image: string): Promise<string> {
  const seconds = Math.max(1, Math.ceil(plan.timeoutMs / 1000));
  const result = await vm.run(
    {
      argv: ["/bin/berth-start-dockerd"],
      env: {
        PATH: "/bin",
        BERTH_DOCKERD_TIMEOUT: String(seconds),
        BERTH_DOCKERD_TCP: plan.tcp ? "1" : "0",
        BERTH_DOCKERD_CONFIG: plan.daemonConfig,
        BERTH_DOCKERD_RELAYS: plan.relays
          .map((r) => `${r.address} ${r.port} ${r.gatewayPort} ${r.name ?? "-"}`)
          .join("\n"),
        BERTH_DOCKERD_GATEWAY: GUEST_NETWORK.gateway,
      },
      workingDirectory: "/",
      uid: 0,
      gid: 0,
    },
    // The script keeps its own deadline; this one only catches a guest that stopped answering.
    { inAgentRoot: true, timeoutMs: plan.timeoutMs + 30_000 },
  );
  const said = result.stderr.toString().trim();
  if (result.exitCode === 0) {
    const mode = result.stdout.toString().trim();
    return mode.startsWith("host ") ? `host: ${mode.slice(5)}` : mode;
  }
  if (result.exitCode === 3) throw noDockerd(image);
  if (result.exitCode === 4 || result.timedOut) {
    throw new StatusError(
      Code.DEADLINE_EXCEEDED,
      `init-dockerd: Docker's daemon did not answer within ${seconds} s (${DOCKERD_START_TIMEOUT_SETTING}): ${said}`,
    );
  }
  throw new StatusError(Code.FAILED_PRECONDITION, `init-dockerd: Docker's daemon did not start: ${said}`);
}

/**
 * Gives the guest's docker client the action's own credentials (never part of a snapshot: written into each
 * VM after it starts), in /root/.docker/config.json, readable by root only.
 */
export async function writeGuestDockerAuth(vm: QemuVm, auth: NonNullable<DockerdRequest["auth"]>): Promise<void> {
  const config = guestDockerConfig(auth);
  const result = await vm.run(
    {
      argv: [
        "/bin/sh",
        "-c",
        'mkdir -p /newroot/root/.docker && umask 077 && printf "%s\\n" "$AUTH" >/newroot/root/.docker/config.json',
      ],
      env: { PATH: "/bin", AUTH: config },
      workingDirectory: "/",
      uid: 0,
      gid: 0,
    },
    { inAgentRoot: true, timeoutMs: 30_000 },
  );
  // Its output cannot hold the credentials (printf writes only to the file); the exit code is all that is said.
  if (result.exitCode !== 0)
    throw new Error(`cannot give the VM's docker client its credentials (exit ${result.exitCode})`);
}

/** Where the docker client looks Docker Hub's credentials up: its v1 index, not the registry's name. */
const DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/";

/**
 * The guest's ~/.docker/config.json holding `auth`, keyed as the docker client looks it up: by the registry's
 * host, but for Docker Hub (`docker.io`, however an image names it) by its index URL.
 */
export function guestDockerConfig(auth: NonNullable<DockerdRequest["auth"]>): string {
  const key = auth.registry === DOCKER_HUB ? DOCKER_HUB_AUTH_KEY : auth.registry;
  return JSON.stringify({
    auths: { [key]: { auth: Buffer.from(`${auth.username}:${auth.password}`).toString("base64") } },
  });
}
