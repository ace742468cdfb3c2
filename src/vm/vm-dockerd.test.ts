import assert from "node:assert/strict";
import { homedir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { dockerImage } from "../../test/support/docker-image.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { busyboxImage, startRegistry, type TestRegistry } from "../../test/support/registry.js";
import { VmUsed } from "../gen/berth/vm/v1/vm.js";
import { Code } from "../status/status.js";

// init-dockerd=true: Docker's daemon runs in the action's microVM, started from its image, and reaches the farm's
// registries (a loopback registry here) through the worker's forwards only.

let registry: TestRegistry;
let dockerImageRef: string;
let small: string;

before(async () => {
  registry = await startRegistry();
  dockerImageRef = await registry.push(await dockerImage(), "team/docker", "vm");
  small = await registry.push(await busyboxImage("pulled inside the VM"), "team/small", "v1");
});
after(() => registry?.stop());

function dockerPlatform(extra: { name: string; value: string }[] = []) {
  return [
    { name: "container-image", value: `docker://${dockerImageRef}` },
    { name: "workload-isolation-type", value: "firecracker" },
    { name: "init-dockerd", value: "true" },
    { name: "EstimatedMemory", value: "1GB" },
    ...extra,
  ];
}

function vmUsed(response: Awaited<ReturnType<typeof execute>>["response"]): VmUsed | undefined {
  const aux = response.result?.executionMetadata?.auxiliaryMetadata ?? [];
  const vm = aux.find((a) => a.typeUrl.endsWith("berth.vm.v1.VmUsed"));
  return vm && VmUsed.decode(vm.value);
}

describe("Docker in a microVM (init-dockerd)", () => {
  let farm: TestFarm;
  before(async () => {
    const dir = process.env.BERTH_VM_DIR ?? join(homedir(), ".cache", "berth", "vm");
    farm = await startTestFarm(
      {
        images: { insecureRegistries: [registry.host] },
        worker: { vm: { dir, accelerator: "tcg", snapshots: false, dockerd: { startTimeoutSeconds: 40 } } },
      },
      undefined,
      { workers: 1 },
    );
  });
  after(() => farm?.close());

  test("docker run pulls from the farm's registry and runs a container inside the VM", async () => {
    const action = await uploadAction(farm.clients, {
      args: ["sh", "-c", `docker run --rm ${small} cat /etc/berth-image-marker && docker info --format '{{.Driver}}'`],
      platform: dockerPlatform(),
      salt: `${Math.random()}`,
    });
    const { response } = await execute(farm.clients, action);
    assert.equal(response.status?.code ?? 0, Code.OK, response.status?.message);
    const stderr = await readBlob(farm.clients, response.result?.stderrDigest);
    assert.equal(response.result?.exitCode, 0, stderr);
    const stdout = await readBlob(farm.clients, response.result?.stdoutDigest);
    assert.equal(stdout, "pulled inside the VM\noverlay2\n", stderr);
    assert.equal(vmUsed(response)?.dockerd, "bridge");
  });
});
