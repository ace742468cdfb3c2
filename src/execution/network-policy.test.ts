import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { execute, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { unpackDetails } from "../../test/support/rpc.js";
import { Code } from "../status/status.js";

describe("execution.allowNetwork: false", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm({ execution: { allowNetwork: false } }, undefined, { workers: 1 });
  });
  after(() => farm?.close());

  for (const property of [
    { name: "network", value: "external" },
    { name: "dockerNetwork", value: "standard" },
    { name: "dockerNetwork", value: "bridge" },
    { name: "dockerNetwork", value: "host" },
  ]) {
    test(`an action asking for ${property.name}=${property.value} is refused with FAILED_PRECONDITION naming the property, and never runs`, async () => {
      const action = await uploadAction(farm.clients, {
        // Were it run, it would say so on stdout; the response must have no result at all.
        args: ["sh", "-c", "echo ran"],
        platform: [property],
        salt: `${Math.random()}`,
      });
      const { response } = await execute(farm.clients, action);
      assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
      assert.match(
        response.status?.message ?? "",
        new RegExp(`${property.name}=${property.value}.*allowNetwork: false`),
      );
      const violations = response.status ? unpackDetails(response.status).preconditionFailure?.violations : [];
      assert.deepEqual(
        violations?.map((v) => [v.type, v.subject]),
        [["NETWORK_NOT_ALLOWED", `${property.name}=${property.value}`]],
      );
      assert.equal(response.result, undefined);
    });
  }

  test("actions that ask for no network (or say network=off) still run", async () => {
    for (const platform of [[], [{ name: "network", value: "off" }]]) {
      const action = await uploadAction(farm.clients, { args: ["true"], platform, salt: `${Math.random()}` });
      const { response } = await execute(farm.clients, action);
      assert.equal(response.status?.code ?? 0, Code.OK, response.status?.message);
      assert.equal(response.result?.exitCode, 0);
    }
  });
});
