import assert from "node:assert/strict";
import { homedir, release } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { testGuestAssets } from "../../test/support/guest.js";
import { busyboxImage, MARKER_PATH, startRegistry, type TestRegistry } from "../../test/support/registry.js";
import { ImageUsed } from "../gen/berth/image/v1/image.js";
import { VmUsed } from "../gen/berth/vm/v1/vm.js";
import { Code } from "../status/status.js";
import type { GuestAssets } from "./guest-assets.js";

// A farm whose workers have QEMU and the guest: actions asking for a microVM run in one, booted on their image.

let registry: TestRegistry;
let image: string;
let assets: GuestAssets;

before(async () => {
  assets = await testGuestAssets();
  registry = await startRegistry();
  image = await registry.push(await busyboxImage("the VM's image"), "team/busybox", "vm");
});
after(() => registry?.stop());

function vmPlatform(isolation = "firecracker", extra: { name: string; value: string }[] = []) {
  return [
    { name: "container-image", value: `docker://${image}` },
    { name: "workload-isolation-type", value: isolation },
    ...extra,
  ];
}

describe("microVM actions on a farm whose workers run VMs", () => {
  let farm: TestFarm;
  before(async () => {
    const dir = process.env.BERTH_VM_DIR ?? join(homedir(), ".cache", "berth", "vm");
    farm = await startTestFarm({ worker: { vm: { dir, accelerator: "tcg" } } }, undefined, { workers: 1 });
  });
  after(() => farm?.close());

  test("the action runs on the guest's kernel in its image, sized by its estimates, and its outputs come back", async () => {
    const action = await uploadAction(farm.clients, {
      args: [
        "sh",
        "-c",
        `uname -r; cat /${MARKER_PATH}; cat input.txt; grep MemTotal /proc/meminfo; echo made > out/o.txt`,
      ],
      platform: vmPlatform("firecracker", [
        { name: "EstimatedMemory", value: "300MB" },
        { name: "EstimatedCPU", value: "1" },
      ]),
      files: { "input.txt": "from the input root\n" },
      outputFiles: ["out/o.txt"],
      salt: `${Math.random()}`,
    });
    const { response } = await execute(farm.clients, action);
    assert.equal(response.status?.code ?? 0, Code.OK, response.status?.message);
    const stderr = await readBlob(farm.clients, response.result?.stderrDigest);
    assert.equal(response.result?.exitCode, 0, stderr);
    const lines = (await readBlob(farm.clients, response.result?.stdoutDigest)).split("\n");
    assert.equal(lines[0], assets.kernelRelease);
    assert.notEqual(lines[0], release());
    assert.deepEqual(lines.slice(1, 3), ["the VM's image", "from the input root"]);
    // The guest has about the memory asked for (the kernel keeps some for itself).
    const memKiB = Number(/MemTotal:\s+(\d+)/.exec(lines[3] ?? "")?.[1]);
    assert.ok(memKiB > 200_000 && memKiB <= 300_000_000 / 1024, `MemTotal ${memKiB} kB`);
    const file = response.result?.outputFiles.find((f) => f.path === "out/o.txt");
    assert.ok(file?.digest, "out/o.txt was returned");
    assert.equal(await readBlob(farm.clients, file.digest), "made\n");
    const aux = response.result?.executionMetadata?.auxiliaryMetadata ?? [];
    const vm = aux.find((a) => a.typeUrl.endsWith("berth.vm.v1.VmUsed"));
    assert.ok(vm, "VmUsed is in the metadata");
    const used = VmUsed.decode(vm.value);
    assert.deepEqual([used.accelerator, used.kernelRelease, used.memoryBytes], ["tcg", assets.kernelRelease, 300e6]);
    const imageUsed = aux.find((a) => a.typeUrl.endsWith("berth.image.v1.ImageUsed"));
    assert.ok(imageUsed && ImageUsed.decode(imageUsed.value).manifestDigest.startsWith("sha256:"));
  });

  test("a timeout kills the VM: DEADLINE_EXCEEDED, and the next VM action runs", async () => {
    const action = await uploadAction(farm.clients, {
      args: ["sh", "-c", "echo started; sleep 600"],
      platform: vmPlatform("microvm"),
      timeoutSeconds: 2,
      salt: `${Math.random()}`,
    });
    const { response } = await execute(farm.clients, action);
    assert.equal(response.status?.code, Code.DEADLINE_EXCEEDED, response.status?.message);
    const next = await uploadAction(farm.clients, {
      args: ["sh", "-c", "echo next"],
      platform: vmPlatform("MicroVM"),
      salt: `${Math.random()}`,
    });
    const after = await execute(farm.clients, next);
    assert.equal(after.response.result?.exitCode, 0, after.response.status?.message);
    assert.equal(await readBlob(farm.clients, after.response.result?.stdoutDigest), "next\n");
  });

  test("recycle-runner keeps the VM: the next action of the key finds what the first left in its /tmp", async () => {
    const run = async (script: string) => {
      const action = await uploadAction(farm.clients, {
        args: ["sh", "-c", script],
        platform: vmPlatform("firecracker", [{ name: "recycle-runner", value: "true" }]),
        salt: `${Math.random()}`,
      });
      const { response } = await execute(farm.clients, action);
      assert.equal(response.result?.exitCode, 0, response.status?.message);
      const vm = response.result?.executionMetadata?.auxiliaryMetadata.find((a) => a.typeUrl.endsWith("VmUsed"));
      return {
        out: await readBlob(farm.clients, response.result?.stdoutDigest),
        start: VmUsed.decode(vm?.value ?? new Uint8Array()).start,
      };
    };
    const first = await run("echo left by the first > /tmp/left; echo first");
    assert.equal(first.out, "first\n");
    const second = await run("cat /tmp/left");
    assert.deepEqual(second, { out: "left by the first\n", start: "recycled" });
  });

  test("without a container-image the property is INVALID_ARGUMENT: a VM boots from an image", async () => {
    const action = await uploadAction(farm.clients, {
      args: ["true"],
      platform: [{ name: "workload-isolation-type", value: "firecracker" }],
    });
    const { response } = await execute(farm.clients, action);
    assert.equal(response.status?.code, Code.INVALID_ARGUMENT);
    assert.match(
      response.status?.message ?? "",
      /workload-isolation-type: "firecracker" boots a VM from the action's container-image/,
    );
  });
});

describe("a farm whose worker has the guest but no QEMU", () => {
  let farm: TestFarm;
  before(async () => {
    const dir = process.env.BERTH_VM_DIR ?? join(homedir(), ".cache", "berth", "vm");
    farm = await startTestFarm({ worker: { vm: { dir, qemuPath: "/nonexistent/qemu-system-x86_64" } } }, undefined, {
      workers: 1,
    });
  });
  after(() => farm?.close());

  test("offers no microVMs: the action is refused at once, naming the property", async () => {
    const action = await uploadAction(farm.clients, { args: ["true"], platform: vmPlatform("firecracker") });
    const { response } = await execute(farm.clients, action);
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
    assert.match(response.status?.message ?? "", /no worker of this farm runs microVMs/);
  });
});

describe("a farm whose workers run no VMs", () => {
  let farm: TestFarm;
  before(async () => {
    // The default data directory of a test farm holds no guest: its workers have no VM runner.
    farm = await startTestFarm({}, undefined, { workers: 1 });
  });
  after(() => farm?.close());

  test("refuses a microVM action at once as unsatisfiable, naming the property", async () => {
    const action = await uploadAction(farm.clients, {
      args: ["sh", "-c", "echo ran"],
      platform: vmPlatform("firecracker"),
    });
    const started = performance.now();
    const { response } = await execute(farm.clients, action);
    assert.ok(performance.now() - started < 10_000, "refused without waiting for a worker");
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
    assert.match(response.status?.message ?? "", /no worker of this farm runs microVMs .*workload-isolation-type/);
    assert.equal(response.result, undefined);
  });
});
