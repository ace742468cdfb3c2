import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { unpackDetails } from "../../test/support/rpc.js";
import { INPUT_ROOT_MOUNT } from "../sandbox/bubblewrap.js";
import { Code, StatusError } from "../status/status.js";
import { readActionPlatform } from "./action-platform.js";
import { readWorkloadIsolation, WORKLOAD_ISOLATION_TYPE } from "./workload-isolation.js";

const isolation = (value: string) => [{ name: WORKLOAD_ISOLATION_TYPE, value }];

/** What readWorkloadIsolation (or readActionPlatform) throws, as a StatusError. */
function refusal(read: () => unknown): StatusError {
  try {
    read();
  } catch (err) {
    assert.ok(err instanceof StatusError, String(err));
    return err;
  }
  assert.fail("was not refused");
}

describe("readWorkloadIsolation", () => {
  test("BuildBuddy's container names, in any case, and no property at all, run in the namespace sandbox", () => {
    for (const value of [undefined, "none", "sandbox", "oci", "docker", "podman", "Docker", "PODMAN", "Oci"]) {
      assert.equal(readWorkloadIsolation(value), "namespace-sandbox", String(value));
    }
  });

  test("firecracker and microvm, in any case, ask for a microVM", () => {
    for (const value of ["firecracker", "microvm", "Firecracker", "MicroVM"]) {
      assert.equal(readWorkloadIsolation(value), "microvm", value);
    }
  });

  test("any other value is INVALID_ARGUMENT naming the property and the value, listing the accepted ones", () => {
    // Near misses too: a value is never trimmed or guessed at.
    for (const value of ["kvm", "", " docker", "gvisor", "firecracker,docker"]) {
      const err = refusal(() => readWorkloadIsolation(value));
      assert.equal(err.code, Code.INVALID_ARGUMENT, JSON.stringify(value));
      assert.equal(
        err.message,
        `platform property workload-isolation-type: "${value}" is not one of ` +
          `"none", "sandbox", "oci", "docker", "podman", "firecracker", "microvm"`,
      );
      assert.deepEqual(
        err.details.fieldViolations?.map((v) => v.field),
        ["platform property workload-isolation-type"],
      );
    }
  });
});

describe("readActionPlatform with workload-isolation-type", () => {
  test("is interpreted, never left for a worker to offer", () => {
    const platform = readActionPlatform([...isolation("docker"), { name: "OSFamily", value: "Linux" }]);
    assert.equal(platform.isolation, "namespace-sandbox");
    assert.deepEqual(platform.required, [{ name: "OSFamily", value: "Linux" }]);
  });

  test("a microVM is a capability the action requires, and needs a container-image", () => {
    const image = { name: "container-image", value: "docker://127.0.0.1:5000/busybox:1" };
    const platform = readActionPlatform([...isolation("Firecracker"), image]);
    assert.equal(platform.isolation, "microvm");
    assert.deepEqual(
      platform.required.filter((p) => p.name === WORKLOAD_ISOLATION_TYPE),
      [{ name: WORKLOAD_ISOLATION_TYPE, value: "microvm" }],
    );
    const err = refusal(() => readActionPlatform(isolation("microvm")));
    assert.equal(err.code, Code.INVALID_ARGUMENT);
    assert.match(err.message, /boots a VM from the action's container-image, and the action names none/);
  });

  test("given twice (even the same value twice) is INVALID_ARGUMENT, as every single-valued property", () => {
    for (const values of [
      ["docker", "firecracker"],
      ["docker", "docker"],
    ]) {
      const err = refusal(() => readActionPlatform(values.flatMap(isolation)));
      assert.equal(err.code, Code.INVALID_ARGUMENT);
      assert.equal(err.message, "platform property workload-isolation-type: is given 2 times; give it once");
    }
  });
});

describe("workload-isolation-type on a real farm", () => {
  let farm: TestFarm;
  before(async () => {
    // The workers offer no workload-isolation-type: were the property matched, no action naming it could run.
    farm = await startTestFarm({}, undefined, { workers: 1 });
  });
  after(() => farm?.close());

  test("docker (on the Action) and none (on the Command, REAPI 2.0) run, in the sandbox: none never means unconfined", async () => {
    for (const [where, value] of [
      ["platform", "docker"],
      ["commandPlatform", "none"],
    ] as const) {
      const action = await uploadAction(farm.clients, {
        // An action that takes "none" at its word tries to leave its mark on the host's root.
        args: ["sh", "-c", "pwd; touch /berth-isolation-none 2>/dev/null && echo escaped || echo confined"],
        [where]: isolation(value),
        salt: value,
      });
      const { response } = await execute(farm.clients, action);
      assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
      assert.equal(response.result?.exitCode, 0, await readBlob(farm.clients, response.result?.stderrDigest));
      assert.equal(await readBlob(farm.clients, response.result?.stdoutDigest), `${INPUT_ROOT_MOUNT}\nconfined\n`);
    }
  });

  test("firecracker with an image is FAILED_PRECONDITION (UNSATISFIABLE_PLATFORM) on a farm without VMs, on the Action or the Command", async () => {
    for (const [where, value] of [
      ["platform", "firecracker"],
      ["commandPlatform", "microvm"],
    ] as const) {
      const action = await uploadAction(farm.clients, {
        args: ["sh", "-c", "echo ran"],
        [where]: [...isolation(value), { name: "container-image", value: "docker://127.0.0.1:9/none:1" }],
        salt: value,
      });
      const { response } = await execute(farm.clients, action);
      assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
      assert.match(response.status?.message ?? "", /no worker of this farm runs microVMs/);
      const violations = response.status ? unpackDetails(response.status).preconditionFailure?.violations : [];
      assert.deepEqual(
        violations?.map((v) => [v.type, v.subject, v.description]),
        [["UNSATISFIABLE_PLATFORM", "workload-isolation-type", "no worker runs microVMs"]],
      );
      assert.equal(response.result, undefined);
    }
  });

  test("kvm is INVALID_ARGUMENT naming the property and the value, and never runs", async () => {
    const action = await uploadAction(farm.clients, { args: ["sh", "-c", "echo ran"], platform: isolation("kvm") });
    const { response } = await execute(farm.clients, action);
    assert.equal(response.status?.code, Code.INVALID_ARGUMENT, response.status?.message);
    assert.match(response.status?.message ?? "", /^platform property workload-isolation-type: "kvm" is not one of /);
    assert.equal(response.result, undefined);
  });
});
