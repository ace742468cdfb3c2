import { spawn } from "node:child_process";
import { connect, isIPv4, type Server, type Socket } from "node:net";
import { fileURLToPath } from "node:url";

/** A registry the farm uses, as it names it ("127.0.0.1:5000", "registry.example:443"). */
export interface RegistryEndpoint {
  host: string;
  port: number;
}

/**
 * How the guest reaches one registry (src/vm/guest/relay.c): berth-relay listens at `address`:`port` in the guest
 * and relays to the gateway's `gatewayPort`, where the worker's forward of that registry listens. `name` (a host
 * name the farm uses) is added to the guest's /etc/hosts at `address`.
 */
export interface GuestRelay {
  address: string;
  port: number;
  gatewayPort: number;
  name: string | undefined;
  upstream: RegistryEndpoint;
}

/** The first port of the forwards on the namespace's loopback (nothing else listens there). */
const FIRST_GATEWAY_PORT = 40000;

/** Parses "host[:port]" (a registry as images.insecureRegistries names it); the port defaults to 443. */
export function registryEndpoint(registry: string): RegistryEndpoint | undefined {
  const withoutScheme = registry.replace(/^[a-z]+:\/\//i, "").replace(/\/.*$/, "");
  const match = /^([A-Za-z0-9.-]+)(?::([0-9]{1,5}))?$/.exec(withoutScheme);
  if (!match?.[1]) return undefined;
  const port = match[2] === undefined ? 443 : Number(match[2]);
  if (port < 1 || port > 65535) return undefined;
  return { host: match[1].toLowerCase(), port };
}

/**
 * Where each registry appears in the guest: an IPv4 address at itself (added to the guest's loopback), a name at
 * a loopback address of its own (127.0.1.N), so that two registries on one port never collide. Duplicates go.
 */
export function planRelays(endpoints: readonly RegistryEndpoint[]): GuestRelay[] {
  const relays: GuestRelay[] = [];
  const seen = new Set<string>();
  for (const upstream of endpoints) {
    const key = `${upstream.host}:${upstream.port}`;
    if (seen.has(key)) continue;
    seen.add(key);
    const host = upstream.host === "localhost" ? "127.0.0.1" : upstream.host;
    const named = !isIPv4(host);
    relays.push({
      address: named ? `127.0.1.${relays.length + 1}` : host,
      port: upstream.port,
      gatewayPort: FIRST_GATEWAY_PORT + relays.length,
      name: named ? host : undefined,
      upstream,
    });
  }
  return relays;
}

/** The worker's end of a VM's registry relays: listeners in the VM's namespace, each forwarding to one registry. */
export interface RegistryForwards {
  close(): Promise<void>;
}

/**
 * Listens, in the network namespace `namespace` (a path nsenter opens), on 127.0.0.1 at each relay's gateway
 * port, and forwards each connection to that relay's registry from the worker's own namespace. Nothing else of
 * the host is reachable from the namespace: the guest can talk to these registries and to no other address.
 */
export async function openRegistryForwards(
  namespace: string,
  relays: readonly GuestRelay[],
): Promise<RegistryForwards> {
  const servers: Server[] = [];
  const sockets = new Set<Socket>();
  const close = async () => {
    for (const socket of sockets) socket.destroy();
    await Promise.all(servers.map((server) => new Promise<void>((resolve) => server.close(() => resolve()))));
  };
  if (relays.length === 0) return { close };
  const listener = fileURLToPath(new URL("./forward-listener.js", import.meta.url));
  const child = spawn(
    "nsenter",
    [`--net=${namespace}`, "--", process.execPath, listener, ...relays.map((r) => String(r.gatewayPort))],
    { stdio: ["ignore", "ignore", "pipe", "ipc"], env: { PATH: process.env.PATH ?? "/usr/bin:/bin" } },
  );
  let stderr = "";
  child.stderr?.on("data", (chunk: Buffer) => {
    stderr = (stderr + chunk.toString()).slice(-1000);
  });
  child.on("message", (message: { port?: number }, handle: unknown) => {
    const relay = relays.find((r) => r.gatewayPort === message.port);
    if (!relay || !handle) return;
    const server = handle as Server;
    servers.push(server);
    server.on("connection", (guest: Socket) => {
      sockets.add(guest);
      const registry = connect({ host: relay.upstream.host, port: relay.upstream.port });
      sockets.add(registry);
      const end = () => {
        guest.destroy();
        registry.destroy();
        sockets.delete(guest);
        sockets.delete(registry);
      };
      guest.on("error", end).on("close", end);
      registry.on("error", end).on("close", end);
      guest.pipe(registry);
      registry.pipe(guest);
      guest.resume();
    });
  });
  const code = await new Promise<number | null>((resolve) => {
    child.once("error", () => resolve(-1));
    // "close": after the IPC channel is done, so every socket sent has arrived.
    child.once("close", (exitCode) => resolve(exitCode));
  });
  if (code !== 0 || servers.length !== relays.length) {
    await close();
    throw new Error(`cannot listen for the VM's registry forwards: ${stderr.trim() || `exit ${code}`}`);
  }
  return { close };
}
