import { type ChildProcess, spawn } from "node:child_process";
import { type FileHandle, open, readlink } from "node:fs/promises";
import { networkInterfaces } from "node:os";
import { setTimeout as sleep } from "node:timers/promises";
import { Code, StatusError } from "../status/status.js";
import type { QemuVm } from "./qemu-vm.js";

/**
 * The guest's side of QEMU's user-mode network. Not slirp4netns's 10.0.2.0/24 (the namespace QEMU runs in), so
 * that the two gateways stay two addresses a test (and a reader) can tell apart.
 */
export const GUEST_NETWORK = {
  network: "10.0.3.0",
  address: "10.0.3.15",
  prefixLength: 24,
  gateway: "10.0.3.2",
  dns: "10.0.3.3",
};

/** What QEMU is started with so that the VM has the network it may have. */
export interface VmNetworkLaunch {
  /** QemuVmOptions.launchPrefix: QEMU enters its own network namespace. */
  launchPrefix: string[];
  /** QemuVmOptions.extraArgs: the guest's NIC, if it has one. */
  extraArgs: string[];
}

/** A VM's network: how QEMU starts, the guest's configuration once its agent answers, and the end of it. */
export interface VmNetwork {
  readonly launch: VmNetworkLaunch;
  /** Configures the guest's interface (run once per booted VM, before the action's command). */
  configure(vm: QemuVm): Promise<void>;
  /** Ends the network's helper processes (after the VM is gone). */
  close(): Promise<void>;
  /** The network namespace QEMU runs in (a path nsenter opens), when the worker holds one. */
  readonly namespace?: string;
}

/**
 * No network: QEMU still runs in an empty network namespace of its own, so that a guest that broke out of its
 * VM reaches neither the farm's loopback nor any other address (nor the host's abstract unix sockets). The guest
 * has no NIC; its own loopback is up (init.sh).
 */
export const NO_VM_NETWORK: VmNetwork = {
  launch: { launchPrefix: ["unshare", "--net", "--"], extraArgs: [] },
  configure: async () => {},
  close: async () => {},
};

export interface VmNetworkOptions {
  /** worker.slirp4netnsPath, looked up in PATH. */
  slirp4netnsPath?: string;
  /** How long the namespace and slirp4netns may take to be ready; default 10 s. */
  readyTimeoutMs?: number;
  /**
   * false: the guest gets a NIC, but its namespace has no way out (no slirp4netns): only what the worker
   * listens on there is reachable (a Docker VM's registry forwards, registry-forwards.ts). Default true.
   */
  outside?: boolean;
}

/**
 * Opens a network for one VM (network=external, dockerNetwork=…): the farm's network policy of the namespace
 * sandbox, with QEMU in the sandbox's place.
 *
 * QEMU's own user-mode network (libslirp) maps the guest's gateway to the loopback of the namespace QEMU runs
 * in, and has no switch to stop it, so QEMU runs in a network namespace of its own where nothing listens on
 * loopback; that namespace's only way out is slirp4netns --disable-host-loopback (its gateway to the host's loopback
 * refused), as for a sandboxed action. The namespace's routing table also refuses (`prohibit`) every IPv4
 * address of the host's interfaces at the time of the VM's start and the link-local range (cloud metadata),
 * which the sandbox's policy leaves reachable. QEMU runs there as the slot's ids, without the capability to
 * change those routes. IPv6 is off on both sides.
 *
 * Guest → QEMU's slirp (10.0.3.2 is the namespace's empty loopback) → the namespace's tap0 → slirp4netns →
 * the host's sockets.
 */
export async function openVmNetwork(options: VmNetworkOptions = {}): Promise<VmNetwork> {
  const slirp4netns = options.slirp4netnsPath ?? "slirp4netns";
  const readyTimeoutMs = options.readyTimeoutMs ?? 10_000;
  // unshare makes the namespace; the worker then holds it by a descriptor, which every helper names (a path
  // under /proc/WORKER/fd, never the holder's pid, which could be reused once it is gone).
  const holder = spawnHelper("unshare", ["unshare", "--net", "--", "sleep", "infinity"]);
  let slirp: Helper | undefined;
  let held: FileHandle | undefined;
  const end = async () => {
    await stopAll(slirp ? [slirp, holder] : [holder]);
    await held?.close();
  };
  try {
    held = await open(await namespaceOf(holder, readyTimeoutMs), "r");
    await stopAll([holder]);
    const namespace = `/proc/${process.pid}/fd/${held.fd}`;
    // The namespace's loopback is where QEMU's slirp takes the guest's connections to its gateway.
    await runIn(namespace, ["ip", "link", "set", "lo", "up"], "");
    if (options.outside === false) {
      return {
        launch: { launchPrefix: ["nsenter", `--net=${namespace}`, "--"], extraArgs: guestNic() },
        configure: configureGuestNetwork,
        close: end,
        namespace,
      };
    }
    slirp = spawnHelper(
      "slirp4netns",
      [
        slirp4netns,
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        "--enable-sandbox",
        "--enable-seccomp",
        "--ready-fd=3",
        "--netns-type=path",
        namespace,
        "tap0",
      ],
      true,
    );
    await ready(slirp, readyTimeoutMs);
    await runIn(namespace, ["ip", "-batch", "-"], prohibitedRoutes().join("\n"));
    return {
      launch: {
        launchPrefix: ["nsenter", `--net=${namespace}`, "--"],
        extraArgs: guestNic(),
      },
      configure: configureGuestNetwork,
      close: end,
      namespace,
    };
  } catch (error) {
    await end();
    if (error instanceof StatusError) throw error;
    throw new StatusError(
      Code.FAILED_PRECONDITION,
      `network: this worker cannot give the VM a network of its own: ${(error as Error).message}`,
    );
  }
}

/** QEMU's options for the guest's NIC on QEMU's user-mode network. */
export function guestNic(): string[] {
  return [
    "-netdev",
    `user,id=net,ipv6=off,net=${GUEST_NETWORK.network}/${GUEST_NETWORK.prefixLength},` +
      `host=${GUEST_NETWORK.gateway},dns=${GUEST_NETWORK.dns}`,
    "-device",
    "virtio-net-pci,netdev=net",
  ];
}

/** Routes of the VM's namespace that refuse the host's own addresses (what listens on them is the farm's). */
function prohibitedRoutes(): string[] {
  const routes = ["route add prohibit 169.254.0.0/16"];
  for (const addresses of Object.values(networkInterfaces())) {
    for (const { family, address } of addresses ?? []) {
      if (family === "IPv4" && !address.startsWith("127.")) routes.push(`route add prohibit ${address}/32`);
    }
  }
  return routes;
}

/**
 * Run in the agent's own root: the guest's NIC (the only interface but lo) gets the address QEMU's slirp
 * expects, and the image gets a resolver if it has none (QEMU's, which asks the host's).
 */
const CONFIGURE_SCRIPT = `set -e
dev=
tries=0
while [ -z "$dev" ]; do
  for path in /sys/class/net/*; do
    [ "\${path##*/}" = lo ] || dev="\${path##*/}"
  done
  tries=$((tries + 1))
  [ "$tries" -gt 500 ] && { echo "no network interface appeared" >&2; exit 1; }
  [ -n "$dev" ] || usleep 10000
done
ip link set "$dev" up
ip addr add ${GUEST_NETWORK.address}/${GUEST_NETWORK.prefixLength} dev "$dev"
ip route add default via ${GUEST_NETWORK.gateway}
etc=/newroot/etc
if [ -d "$etc" ] && [ ! -L "$etc" ] && [ ! -e "$etc/resolv.conf" ] && [ ! -L "$etc/resolv.conf" ]; then
  echo "nameserver ${GUEST_NETWORK.dns}" >"$etc/resolv.conf"
fi`;

/** Sets up the guest's NIC (see CONFIGURE_SCRIPT); the same for every VM with one. */
export async function configureGuestNetwork(vm: QemuVm): Promise<void> {
  const result = await vm.run(
    {
      argv: ["/bin/sh", "-c", CONFIGURE_SCRIPT],
      env: { PATH: "/bin" },
      workingDirectory: "/",
      uid: 0,
      gid: 0,
    },
    { inAgentRoot: true, timeoutMs: 30_000 },
  );
  if (result.exitCode !== 0) {
    throw new Error(`the VM's network setup failed (exit ${result.exitCode}): ${result.stderr.toString().trim()}`);
  }
}

interface Helper {
  process: ChildProcess;
  exited: Promise<void>;
  /** Why it could not start or why it ended, with the end of what it said on stderr. */
  why(): string;
}

/** Starts `argv` through setpriv, which gives it a parent-death signal: it dies with the worker. */
function spawnHelper(name: string, argv: string[], readyFd = false): Helper {
  const child = spawn("setpriv", ["--pdeathsig", "KILL", "--", ...argv], {
    stdio: ["ignore", "ignore", "pipe", ...(readyFd ? (["pipe"] as const) : [])],
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
  });
  let stderr = "";
  let ended = "";
  child.stderr?.on("data", (chunk: Buffer) => {
    stderr = (stderr + chunk.toString()).slice(-1000);
  });
  const exited = new Promise<void>((resolve) => {
    child.once("error", (error) => {
      ended = `cannot start ${name}: ${error.message}`;
      resolve();
    });
    child.once("exit", (code, signal) => {
      ended ||= `${name} exited (${signal ?? `code ${code}`})`;
      resolve();
    });
  });
  return { process: child, exited, why: () => [ended || "still running", stderr.trim()].filter(Boolean).join(": ") };
}

/** The holder's namespace, as a path QEMU's nsenter opens, once `unshare` has made it. */
async function namespaceOf(holder: Helper, timeoutMs: number): Promise<string> {
  const hosts = await readlink("/proc/self/ns/net");
  const deadline = Date.now() + timeoutMs;
  let gone = false;
  void holder.exited.then(() => {
    gone = true;
  });
  for (;;) {
    const pid = holder.process.pid;
    if (gone || pid === undefined) throw new Error(`no network namespace: ${holder.why()}`);
    const own = await readlink(`/proc/${pid}/ns/net`).catch(() => hosts);
    if (own !== hosts) return `/proc/${pid}/ns/net`;
    if (Date.now() > deadline) throw new Error(`no network namespace within ${timeoutMs} ms`);
    await sleep(2);
  }
}

/** Resolves when slirp4netns writes to its ready descriptor; rejects when it ends or takes too long. */
async function ready(slirp: Helper, timeoutMs: number): Promise<void> {
  const fd = slirp.process.stdio[3];
  if (!fd) throw new Error("slirp4netns has no ready descriptor");
  const written = new Promise<"ready">((resolve) => fd.once("data", () => resolve("ready")));
  const outcome = await Promise.race([
    written,
    slirp.exited.then(() => "exited" as const),
    sleep(timeoutMs, "timeout" as const, { ref: false }),
  ]);
  fd.destroy();
  if (outcome === "exited") throw new Error(slirp.why());
  if (outcome === "timeout") throw new Error(`slirp4netns was not ready within ${timeoutMs} ms`);
}

/** Runs a command in the namespace, `input` on its stdin; rejects with its stderr when it fails. */
function runIn(namespace: string, argv: string[], input: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn("nsenter", [`--net=${namespace}`, "--", ...argv], {
      stdio: ["pipe", "ignore", "pipe"],
      env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
    });
    let stderr = "";
    child.stderr.on("data", (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    child.once("error", reject);
    // A command that does not read its input (ip link set …) may exit first: its exit code is what counts.
    child.stdin.on("error", () => {});
    child.once("exit", (code) =>
      code === 0 ? resolve() : reject(new Error(`${argv.join(" ")} failed (${code}): ${stderr.trim()}`)),
    );
    child.stdin.end(`${input}\n`);
  });
}

async function stopAll(helpers: Helper[]): Promise<void> {
  for (const helper of helpers) {
    if (helper.process.exitCode === null && helper.process.signalCode === null) helper.process.kill("SIGKILL");
  }
  await Promise.all(helpers.map((helper) => helper.exited));
}
