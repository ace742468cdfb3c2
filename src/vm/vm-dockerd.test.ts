import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readdir } from "node:fs/promises";
import { createServer, type Server } from "node:net";
import { homedir, networkInterfaces } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { dockerImage } from "../../test/support/docker-image.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { busyboxImage, startRegistry, type TestRegistry } from "../../test/support/registry.js";
import { VmUsed } from "../gen/berth/vm/v1/vm.js";
import { Code } from "../status/status.js";

// init-dockerd=true: Docker's daemon runs in the action's microVM, started from its image, and reaches the farm's
// registries (a loopback registry here, with basic auth: the action gives its own credentials, which the farm
// pulls its image with and the guest's docker client pulls with) through the worker's forwards only. Each Docker VM boots in tens of
// seconds under TCG: the tests share their VMs where they can.

let registry: TestRegistry;
/** An open registry the daemon is given as its mirror (of Docker Hub's names). */
let mirror: TestRegistry;
let dockerImageRef: string;
let busybox: string;
let small: string;
const guestDir = process.env.BERTH_VM_DIR ?? join(homedir(), ".cache", "berth", "vm");

before(async () => {
  registry = await startRegistry({ auth: "basic" });
  dockerImageRef = await registry.push(await dockerImage(), "team/docker", "vm");
  busybox = await registry.push(await busyboxImage("no docker here"), "team/busybox", "vm");
  small = await registry.push(await busyboxImage("pulled inside the VM"), "team/small", "v1");
  mirror = await startRegistry();
  await mirror.push(await busyboxImage("from the mirror"), "library/mirrored", "v1");
});
after(async () => {
  await registry?.stop();
  await mirror?.stop();
});

function dockerPlatform(extra: { name: string; value: string }[] = [], image = dockerImageRef) {
  return [
    { name: "container-image", value: `docker://${image}` },
    { name: "container-registry-username", value: registry.username },
    { name: "container-registry-password", value: registry.password },
    { name: "workload-isolation-type", value: "firecracker" },
    { name: "init-dockerd", value: "true" },
    { name: "EstimatedMemory", value: "1GB" },
    ...extra,
  ];
}

type ExecuteResponse = Awaited<ReturnType<typeof execute>>["response"];

function vmUsed(response: ExecuteResponse): VmUsed | undefined {
  const aux = response.result?.executionMetadata?.auxiliaryMetadata ?? [];
  const vm = aux.find((a) => a.typeUrl.endsWith("berth.vm.v1.VmUsed"));
  return vm && VmUsed.decode(vm.value);
}

async function run(farm: TestFarm, script: string, platform: { name: string; value: string }[]) {
  const action = await uploadAction(farm.clients, {
    args: ["sh", "-c", script],
    platform,
    salt: `${Math.random()}`,
  });
  const { response } = await execute(farm.clients, action);
  const stdout = await readBlob(farm.clients, response.result?.stdoutDigest).catch(() => "");
  const stderr = await readBlob(farm.clients, response.result?.stderrDigest).catch(() => "");
  return { response, stdout, stderr };
}

/** A listener the host's farm would have: on loopback and on each of the host's own addresses. */
async function hostListeners(): Promise<{
  servers: Server[];
  port: number;
  addresses: string[];
  touched: () => number;
}> {
  let touched = 0;
  const addresses = ["127.0.0.1"];
  for (const list of Object.values(networkInterfaces())) {
    for (const { family, address } of list ?? [])
      if (family === "IPv4" && !address.startsWith("127.")) addresses.push(address);
  }
  const servers: Server[] = [];
  let port = 0;
  for (const address of addresses) {
    const server = createServer((socket) => {
      touched++;
      socket.destroy();
    });
    await new Promise<void>((resolve) => server.listen(port, address, resolve));
    port = (server.address() as { port: number }).port;
    servers.push(server);
  }
  return { servers, port, addresses, touched: () => touched };
}

async function snapshotMade(dataDir: string, store = "vm-snapshots"): Promise<boolean> {
  const walk = async (dir: string, depth: number): Promise<boolean> => {
    for (const entry of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
      if (!entry.isDirectory()) continue;
      if (entry.name === store) {
        const names = await readdir(join(dir, entry.name));
        if (names.some((name) => /^[0-9a-f]{64}$/.test(name))) return true;
      } else if (depth > 0 && (await walk(join(dir, entry.name), depth - 1))) return true;
    }
    return false;
  };
  return walk(dataDir, 4);
}

describe("Docker in a microVM (init-dockerd)", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm(
      {
        images: { insecureRegistries: [registry.host] },
        worker: {
          // A warm VM idle this long leaves the pool, saved whole for its key's next action.
          warmRunners: { idleSeconds: 20 },
          vm: {
            dir: guestDir,
            accelerator: "tcg",
            snapshots: true,
            dockerd: { registryMirrors: [`http://${mirror.host}`] },
          },
        },
      },
      undefined,
      { workers: 1 },
    );
  });
  after(() => farm?.close());

  test("docker run pulls from the farm's registry into the VM; TCP 2375 answers; containers reach no host address", async () => {
    const host = await hostListeners();
    try {
      const probes = host.addresses.map(
        (address) => `nc -w 3 ${address} ${host.port} </dev/null && echo "reached ${address}"`,
      );
      // The container tries the host by its gateway (10.0.3.2, QEMU's user network), by each host address, and the
      // daemon's bridge gateway; none may answer. The registry it pulled from is the one thing the VM reaches.
      const containerScript = [
        "cat /etc/berth-image-marker",
        `nc -w 3 10.0.3.2 ${host.port} </dev/null && echo "reached the gateway"`,
        ...probes,
        "echo probed",
      ].join("; ");
      const { response, stdout, stderr } = await run(
        farm,
        [
          `docker run --rm ${small} sh -c '${containerScript}'`,
          "docker info --format '{{.Driver}}'",
          "docker -H tcp://127.0.0.1:2375 version --format 'tcp {{.Server.Version}}'",
          // A Docker Hub name comes from the farm's mirror (there is no other way out).
          "docker run --rm mirrored:v1 cat /etc/berth-image-marker",
          // The daemon's data is on the scratch disk, sized by EstimatedFreeDiskBytes.
          "df -k /var/lib/docker | tail -n 1",
        ].join(" && "),
        dockerPlatform([
          { name: "enable-dockerd-tcp", value: "true" },
          { name: "EstimatedFreeDiskBytes", value: "3GB" },
        ]),
      );
      assert.equal(response.status?.code ?? 0, Code.OK, response.status?.message);
      assert.equal(response.result?.exitCode, 0, stderr);
      const lines = stdout.trim().split("\n");
      assert.deepEqual(lines.slice(0, 3), ["pulled inside the VM", "probed", "overlay2"], stdout + stderr);
      assert.match(lines[3] ?? "", /^tcp 20\./);
      assert.equal(lines[4], "from the mirror");
      const sizeKiB = Number((lines[5] ?? "").trim().split(/\s+/)[1]);
      assert.ok(sizeKiB > 2.5e9 / 1024 && sizeKiB <= 3e9 / 1024, `the scratch disk holds ${sizeKiB} KiB`);
      assert.doesNotMatch(stdout, /reached/);
      assert.ok(
        !`${stdout}${stderr}${response.status?.message}`.includes(registry.password),
        "no credential in the result",
      );
      assert.equal(host.touched(), 0, "no connection reached a host listener");
      const used = vmUsed(response);
      assert.equal(used?.dockerd, "bridge");
      assert.equal(used?.start, "cold");
    } finally {
      for (const server of host.servers) server.close();
    }
  });

  test("a snapshot holds the running daemon; recycle-runner keeps the VM, its daemon and its images, saved whole once idle", async () => {
    // The first Docker VM of this shape had a snapshot made beside it (with the daemon started, nothing pulled).
    for (let i = 0; i < 300 && !(await snapshotMade(farm.config.dataDir)); i++) await sleep(1000);
    assert.ok(await snapshotMade(farm.config.dataDir), "the snapshot of the Docker VM was made");
    // The same platform as the first test's (a snapshot fits VMs of one daemon setup), asking for a warm VM.
    const recycle = [
      { name: "enable-dockerd-tcp", value: "true" },
      { name: "EstimatedFreeDiskBytes", value: "3GB" },
      { name: "recycle-runner", value: "true" },
    ];
    const first = await run(
      farm,
      `docker images -q ${small} | grep -q . && echo "image already here"; docker run --rm ${small} echo PASS; echo left >/tmp/marker`,
      dockerPlatform(recycle),
    );
    assert.equal(first.response.result?.exitCode, 0, first.stderr);
    assert.equal(first.stdout, "PASS\n", first.stderr);
    assert.deepEqual([vmUsed(first.response)?.start, vmUsed(first.response)?.dockerd], ["snapshot", "bridge"]);

    const second = await run(
      farm,
      `docker images -q ${small} | grep -q . && echo "image already here"; cat /tmp/marker; docker run --rm ${small} echo PASS`,
      dockerPlatform(recycle),
    );
    assert.equal(second.response.result?.exitCode, 0, second.stderr);
    assert.equal(second.stdout, "image already here\nleft\nPASS\n", second.stderr);
    assert.equal(vmUsed(second.response)?.start, "recycled");

    // Idle past worker.warmRunners.idleSeconds, the VM leaves the pool saved (daemon, images, /tmp and all).
    for (let i = 0; i < 300 && !(await snapshotMade(farm.config.dataDir, "warm-vm-snapshots")); i++) await sleep(1000);
    // Another key (here a runner-recycling-key of its own) never gets it: a VM from the worker's own snapshot.
    const stranger = await run(
      farm,
      `cat /tmp/marker 2>/dev/null || echo "no marker"; docker images -q ${small} | grep -q . && echo "image already here"; true`,
      dockerPlatform([...recycle, { name: "runner-recycling-key", value: "another team" }]),
    );
    assert.equal(stranger.stdout, "no marker\n", stranger.stderr);
    assert.equal(vmUsed(stranger.response)?.start, "snapshot");
    const third = await run(
      farm,
      `docker images -q ${small} | grep -q . && echo "image already here"; cat /tmp/marker; docker run --rm ${small} echo PASS`,
      dockerPlatform(recycle),
    );
    assert.equal(third.response.result?.exitCode, 0, third.stderr);
    assert.equal(third.stdout, "image already here\nleft\nPASS\n", third.stderr);
    assert.deepEqual([vmUsed(third.response)?.start, vmUsed(third.response)?.dockerd], ["recycled snapshot", "bridge"]);
  });

  test("an image without Docker is FAILED_PRECONDITION at once, before any VM boots", async () => {
    const started = Date.now();
    const { response } = await run(farm, "true", dockerPlatform([], busybox));
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
    assert.match(response.status?.message ?? "", /has no dockerd.*init-dockerd|init-dockerd.*has no dockerd/);
    // (not a speed target: a boot under TCG takes tens of seconds, this answer none)
    assert.ok(Date.now() - started < 20_000, "refused before a boot");
  });

  test("init-dockerd outside a VM, or enable-dockerd-tcp without it, is INVALID_ARGUMENT naming what it needs", async () => {
    const sandbox = await run(farm, "true", [
      { name: "container-image", value: `docker://${dockerImageRef}` },
      { name: "init-dockerd", value: "true" },
    ]);
    assert.equal(sandbox.response.status?.code, Code.INVALID_ARGUMENT);
    assert.match(sandbox.response.status?.message ?? "", /init-dockerd.*workload-isolation-type=firecracker/);
    const tcpAlone = await run(farm, "true", [
      { name: "container-image", value: `docker://${dockerImageRef}` },
      { name: "workload-isolation-type", value: "firecracker" },
      { name: "enable-dockerd-tcp", value: "true" },
    ]);
    assert.equal(tcpAlone.response.status?.code, Code.INVALID_ARGUMENT);
    assert.match(tcpAlone.response.status?.message ?? "", /enable-dockerd-tcp.*init-dockerd=true/);
  });
});

describe("a Docker daemon that does not answer in time", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm(
      {
        images: { insecureRegistries: [registry.host] },
        worker: { vm: { dir: guestDir, accelerator: "tcg", snapshots: false, dockerd: { startTimeoutSeconds: 1 } } },
      },
      undefined,
      { workers: 1 },
    );
  });
  after(() => farm?.close());

  test("fails the action with DEADLINE_EXCEEDED naming the setting, and leaves no VM", async () => {
    const { response } = await run(farm, "echo never", dockerPlatform());
    assert.equal(response.status?.code, Code.DEADLINE_EXCEEDED, response.status?.message);
    assert.match(response.status?.message ?? "", /worker\.vm\.dockerd\.startTimeoutSeconds/);
    // QEMU is this process's child (the worker runs in it): none is left.
    const children = execFileSync("ps", ["-o", "ppid=,args=", "-e"])
      .toString()
      .split("\n")
      .filter((line) => line.trim().startsWith(`${process.pid} `) && line.includes("qemu-system"));
    assert.deepEqual(children, []);
  });
});
