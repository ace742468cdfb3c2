import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readdir, readFile, readlink } from "node:fs/promises";
import { createServer, type Server, type Socket, connect as tcpConnect } from "node:net";
import { homedir, networkInterfaces } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { testGuestAssets } from "../../test/support/guest.js";
import { startTestHost, type TestHost } from "../../test/support/netns.js";
import { busyboxImage, startRegistry, type TestRegistry } from "../../test/support/registry.js";
import { unpackDetails } from "../../test/support/rpc.js";
import { Code } from "../status/status.js";
import { GUEST_NETWORK } from "./vm-network.js";

// A VM's network is off unless the action asks, and with one it reaches out as a sandboxed action does: never to
// the host's loopback, where the farm listens, nor (a VM's own rule) to the host's other addresses. Each action
// here is one boot under TCG; the refusals boot nothing.

const vmDir = process.env.BERTH_VM_DIR ?? join(homedir(), ".cache", "berth", "vm");
const isRoot = process.getuid?.() === 0;
let registry: TestRegistry;
let image: string;

before(async () => {
  await testGuestAssets();
  registry = await startRegistry();
  image = await registry.push(await busyboxImage("the VM's image"), "team/busybox", "net");
});
after(() => registry?.stop());

function vmPlatform(extra: { name: string; value: string }[] = []) {
  return [
    { name: "container-image", value: `docker://${image}` },
    { name: "workload-isolation-type", value: "firecracker" },
    ...extra,
  ];
}

/** This process's children that a VM's network (or QEMU) would leave behind. */
async function leftoverHelpers(spare: readonly number[]): Promise<number[]> {
  const found = await children(/slirp4netns|sleep|unshare|nsenter|setpriv|qemu/);
  return found.filter((pid) => !spare.includes(pid));
}

/** This process's children whose command name matches. */
async function children(comm: RegExp): Promise<number[]> {
  const found = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = await readFile(`/proc/${entry}/stat`, "utf8").catch(() => "");
    const [, name = "", rest = ""] = /^\d+ \((.*)\) (.*)$/s.exec(stat) ?? [];
    if (Number(rest.split(" ")[1]) === process.pid && comm.test(name)) found.push(Number(entry));
  }
  return found;
}

/** While `running` is pending, the network namespace of the QEMU this process starts and that namespace's interfaces. */
async function qemuNetwork(
  running: Promise<unknown>,
): Promise<{ namespace: string; interfaces: string[] } | undefined> {
  let done = false;
  void running.finally(() => {
    done = true;
  });
  while (!done) {
    for (const pid of await children(/^qemu-system/)) {
      const namespace = await readlink(`/proc/${pid}/ns/net`).catch(() => undefined);
      const dev = await readFile(`/proc/${pid}/net/dev`, "utf8").catch(() => undefined);
      if (namespace && dev) {
        const interfaces = dev
          .split("\n")
          .slice(2)
          .map((line) => line.split(":")[0]?.trim() ?? "");
        return { namespace, interfaces: interfaces.filter(Boolean).sort() };
      }
    }
    await sleep(20);
  }
  return undefined;
}

/** The host's own IPv4 addresses other than loopback (the test host's veth end among them). */
function hostAddresses(): string[] {
  return Object.values(networkInterfaces())
    .flatMap((addresses) => addresses ?? [])
    .filter((a) => a.family === "IPv4" && !a.internal)
    .map((a) => a.address);
}

describe("a microVM's network", { skip: !isRoot && "makes network namespaces (root only)" }, () => {
  let farm: TestFarm;
  let testHost: TestHost;
  let hostService: Server;
  let hostServicePort: number;
  const hostConnections: Socket[] = [];
  const token = `served-${randomBytes(8).toString("hex")}`;

  before(async () => {
    testHost = await startTestHost(token);
    // A service of the host's on every address it has, loopback too: what a farm endpoint would be.
    hostService = createServer((socket) => {
      // (The tests' own checks close their end at once.)
      socket.on("error", () => {});
      hostConnections.push(socket.end("host service\n"));
    });
    await new Promise<void>((resolve) => hostService.listen(0, "0.0.0.0", resolve));
    hostServicePort = (hostService.address() as { port: number }).port;
    // No snapshots: a snapshot-making QEMU beside the action's would be a QEMU of this process's too.
    farm = await startTestFarm({ worker: { vm: { dir: vmDir, accelerator: "tcg", snapshots: false } } }, undefined, {
      workers: 1,
    });
  });
  after(async () => {
    await farm?.close();
    await new Promise((resolve) => hostService?.close(resolve));
    await testHost?.close();
  });

  async function runInVm(script: string, extra: { name: string; value: string }[] = []) {
    const action = await uploadAction(farm.clients, {
      args: ["sh", "-c", script],
      platform: vmPlatform(extra),
      salt: `${Math.random()}`,
    });
    const running = execute(farm.clients, action, { skipCacheLookup: true });
    const qemu = await qemuNetwork(running);
    const { response } = await running;
    assert.ok(qemu, "QEMU was seen running");
    // QEMU itself is never in the host's network namespace, where the farm listens on loopback.
    assert.notEqual(qemu.namespace, await readlink("/proc/self/ns/net"));
    assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
    const stderr = await readBlob(farm.clients, response.result?.stderrDigest);
    assert.equal(response.result?.exitCode, 0, stderr);
    return { stdout: await readBlob(farm.clients, response.result?.stdoutDigest), stderr, qemu };
  }

  /** Every host service a hostile guest would try: the host's loopback (through each gateway) and its addresses. */
  function probes(): string[] {
    const farmPort = farm.address.split(":").at(-1);
    const targets = [
      `127.0.0.1:${hostServicePort}`,
      `${GUEST_NETWORK.gateway}:${hostServicePort}`,
      `${GUEST_NETWORK.gateway}:${farmPort}`,
      `10.0.2.2:${hostServicePort}`,
      `10.0.2.2:${farmPort}`,
      ...hostAddresses().map((address) => `${address}:${hostServicePort}`),
    ];
    return targets.map(
      (target) =>
        `if nc -w 3 ${target.replace(":", " ")} </dev/null >/dev/null 2>&1; then echo "reached ${target}"; fi`,
    );
  }

  test("without the property the guest has no interface but lo and reaches nothing", async () => {
    const before = hostConnections.length;
    const { stdout, qemu } = await runInVm(
      [
        "ls /sys/class/net | tr '\\n' ' '; echo",
        "ip link show lo | head -1",
        `timeout 10 wget -q -O - ${testHost.url}no-network || echo "no test host"`,
        ...probes(),
        "echo done",
      ].join("\n"),
    );
    const lines = stdout.split("\n");
    assert.equal(lines[0], "lo ");
    // Its own loopback is up, as in a sandbox without a network.
    assert.match(lines[1] ?? "", /<LOOPBACK,UP/);
    assert.deepEqual(lines.slice(2), ["no test host", "done", ""]);
    // QEMU's own namespace is empty: a guest that broke out of QEMU would have no network either.
    assert.deepEqual(qemu.interfaces, ["lo"]);
    assert.equal(hostConnections.length, before);
    assert.deepEqual(await testHost.requests(), []);
    assert.deepEqual(await leftoverHelpers(testHost.pids), []);
  });

  test("network=external reaches a test host, but not the host's loopback (a farm endpoint) nor its other addresses", async () => {
    // The host's service answers on each of those addresses (so the guest's failures are the network's doing).
    const controls = ["127.0.0.1", ...hostAddresses()];
    const accepted = hostConnections.length + controls.length;
    for (const address of controls) {
      await new Promise<void>((resolve, reject) => {
        const socket = tcpConnect(hostServicePort, address);
        socket.once("connect", () => resolve(socket.destroy() && undefined));
        socket.once("error", reject);
      });
    }
    while (hostConnections.length < accepted) await sleep(10);
    const before = hostConnections.length;
    const { stdout, qemu } = await runInVm(
      [
        "ls /sys/class/net | tr '\\n' ' '; echo",
        `timeout 10 wget -q -O - ${testHost.url}from-vm; echo`,
        "cat /etc/resolv.conf",
        ...probes(),
        "echo done",
      ].join("\n"),
      [{ name: "network", value: "external" }],
    );
    const lines = stdout.split("\n");
    assert.equal(lines[0], "eth0 lo ");
    assert.equal(lines[1], token);
    // QEMU's namespace reaches out through slirp4netns's tap0 only.
    assert.deepEqual(qemu.interfaces, ["lo", "tap0"]);
    assert.equal(lines[2], `nameserver ${GUEST_NETWORK.dns}`);
    // No "reached …" line: every probe of the host failed.
    assert.deepEqual(lines.slice(3), ["done", ""]);
    assert.equal(hostConnections.length, before, "no connection reached the host's service");
    assert.deepEqual(await testHost.requests(), ["/from-vm"]);
    // The namespace holder, slirp4netns and QEMU are gone with the action.
    assert.deepEqual(await leftoverHelpers(testHost.pids), []);
  });

  test("dockerNetwork=bridge gives the guest the same network", async () => {
    const { stdout } = await runInVm(`timeout 10 wget -q -O - ${testHost.url}bridge; echo; ${probes().join("; ")}`, [
      { name: "dockerNetwork", value: "bridge" },
    ]);
    assert.equal(stdout, `${token}\n`);
    assert.ok((await testHost.requests()).includes("/bridge"));
  });
});

describe("a farm whose policy or worker gives VMs no network", () => {
  test("execution.allowNetwork: false refuses a microVM action asking for one, naming the property, before any boot", async (t) => {
    const farm = await startTestFarm(
      { execution: { allowNetwork: false }, worker: { vm: { dir: vmDir, accelerator: "tcg" } } },
      undefined,
      { workers: 1 },
    );
    t.after(() => farm.close());
    for (const property of [
      { name: "network", value: "external" },
      { name: "dockerNetwork", value: "bridge" },
    ]) {
      const action = await uploadAction(farm.clients, {
        args: ["sh", "-c", "echo ran"],
        platform: vmPlatform([property]),
        salt: `${Math.random()}`,
      });
      const { response } = await execute(farm.clients, action);
      assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
      const violations = response.status ? unpackDetails(response.status).preconditionFailure?.violations : [];
      assert.deepEqual(
        violations?.map((v) => [v.type, v.subject]),
        [["NETWORK_NOT_ALLOWED", `${property.name}=${property.value}`]],
      );
      assert.equal(response.result, undefined);
    }
  });

  test("a worker whose slirp4netns does not start refuses a networked VM action with FAILED_PRECONDITION, before any boot", {
    skip: !isRoot && "makes network namespaces (root only)",
  }, async (t) => {
    const farm = await startTestFarm(
      { worker: { slirp4netnsPath: "/nonexistent/slirp4netns", vm: { dir: vmDir, accelerator: "tcg" } } },
      undefined,
      { workers: 1 },
    );
    t.after(() => farm.close());
    const action = await uploadAction(farm.clients, {
      args: ["sh", "-c", "echo ran"],
      platform: vmPlatform([{ name: "network", value: "external" }]),
      salt: `${Math.random()}`,
    });
    const started = performance.now();
    const { response } = await execute(farm.clients, action);
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
    assert.match(
      response.status?.message ?? "",
      /network: this worker cannot give the VM a network of its own: .*\/nonexistent\/slirp4netns/,
    );
    assert.equal(response.result, undefined);
    assert.ok(performance.now() - started < 5_000, "refused before a VM booted");
    assert.deepEqual(await leftoverHelpers([]), []);
  });
});
