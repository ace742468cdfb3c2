import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { Code, StatusError } from "../status/status.js";
import { readActionPlatform } from "./action-platform.js";
import type { Property } from "./property.js";
import { runnerKey } from "./runner-recycling.js";

const p = (name: string, value: string): Property => ({ name, value });

/** What readActionPlatform throws, as a StatusError. */
function refusal(properties: Property[]): StatusError {
  try {
    readActionPlatform(properties);
  } catch (err) {
    assert.ok(err instanceof StatusError, String(err));
    return err;
  }
  assert.fail("was not refused");
}

describe("recycling properties", () => {
  test("recycle-runner and its alias dockerReuse ask for a warm runner; none of the five is left for a worker to offer", () => {
    for (const name of ["recycle-runner", "dockerReuse"]) {
      const platform = readActionPlatform([
        p(name, "true"),
        p("runner-recycling-key", "db-tests"),
        p("preserve-workspace", "true"),
        p("clean-workspace-inputs", "*.log,out/**/tmp-*"),
        p("OSFamily", "Linux"),
      ]);
      assert.deepEqual(platform.recycling, { preserveWorkspace: true, cleanInputs: ["*.log", "out/**/tmp-*"] });
      assert.deepEqual(platform.required, [p("OSFamily", "Linux")]);
    }
    assert.equal(readActionPlatform([p("recycle-runner", "false")]).recycling, undefined);
    assert.equal(readActionPlatform([p("preserve-workspace", "true")]).recycling, undefined);
    assert.deepEqual(readActionPlatform([p("recycle-runner", "true")]).recycling, {
      preserveWorkspace: false,
      cleanInputs: [],
    });
  });

  test("Bazel's persistent-worker properties are interpreted, not matched", () => {
    const platform = readActionPlatform([p("persistentWorkerKey", "abc123"), p("persistentWorkerProtocol", "json")]);
    assert.deepEqual(platform.required, []);
  });

  test("bad values are INVALID_ARGUMENT naming the property and saying what is wrong", () => {
    const cases: [Property[], string][] = [
      [[p("recycle-runner", "yes")], 'platform property recycle-runner: "yes" is not "true" or "false"'],
      [[p("dockerReuse", "TRUE")], 'platform property dockerReuse: "TRUE" is not "true" or "false"'],
      [
        [p("recycle-runner", "true"), p("dockerReuse", "false")],
        "platform property dockerReuse: is an alias of recycle-runner and says false where recycle-runner says true; give one of them",
      ],
      [
        [p("recycle-runner", "true"), p("clean-workspace-inputs", "/etc/*")],
        'platform property clean-workspace-inputs: the glob "/etc/*" is absolute; give it relative to the workspace',
      ],
      [
        [p("recycle-runner", "true"), p("clean-workspace-inputs", "a/../../x")],
        'platform property clean-workspace-inputs: the glob "a/../../x" climbs out of the workspace with ".."',
      ],
      [
        [p("recycle-runner", "true"), p("clean-workspace-inputs", "a,,b")],
        'platform property clean-workspace-inputs: the glob "" is empty (two commas in a row, or one at an end)',
      ],
      [
        [p("runner-recycling-key", "a"), p("runner-recycling-key", "b")],
        "platform property runner-recycling-key: is given 2 times; give it once",
      ],
    ];
    for (const [properties, message] of cases) {
      const err = refusal(properties);
      assert.equal(err.code, Code.INVALID_ARGUMENT, message);
      assert.equal(err.message, message);
    }
  });
});

describe("runnerKey", () => {
  const base = {
    instanceName: "main",
    client: "ci",
    properties: [p("recycle-runner", "true"), p("container-image", "r/x:1")],
    image: "r/x@sha256:aa",
  };

  test("the same platform in another order is the same key; any other part makes another", () => {
    const key = runnerKey(base);
    assert.match(key, /^[0-9a-f]{64}$/);
    assert.equal(runnerKey({ ...base, properties: [...base.properties].reverse() }), key);
    const others = [
      { ...base, instanceName: "other" },
      { ...base, client: "someone-else" },
      { ...base, image: "r/x@sha256:bb" },
      { ...base, properties: [...base.properties, p("runner-recycling-key", "k")] },
      { ...base, properties: [p("recycle-runner", "true"), p("container-image", "r/x:2")] },
      // Field boundaries cannot be moved to forge another's key.
      { ...base, instanceName: "mai", client: "nci" },
    ];
    const keys = new Set([key, ...others.map(runnerKey)]);
    assert.equal(keys.size, others.length + 1);
  });

  test("a registry password in the platform does not appear in the key", () => {
    const key = runnerKey({ ...base, properties: [...base.properties, p("container-registry-password", "hunter2")] });
    assert.ok(!key.includes("hunter2"));
    assert.notEqual(key, runnerKey(base));
  });
});

describe("recycling properties on a real farm", () => {
  let farm: TestFarm;
  before(async () => {
    // The workers offer none of these properties: were they matched, no action naming them could run.
    farm = await startTestFarm({}, undefined, { workers: 1 });
  });
  after(() => farm?.close());

  test("an action asking for a recycled runner runs (on a worker without warm runners, in a fresh sandbox)", async () => {
    const action = await uploadAction(farm.clients, {
      args: ["sh", "-c", "echo ran"],
      platform: [p("recycle-runner", "true"), p("runner-recycling-key", "k"), p("preserve-workspace", "true")],
    });
    const { response } = await execute(farm.clients, action);
    assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
    assert.equal(await readBlob(farm.clients, response.result?.stdoutDigest), "ran\n");
  });

  test("a bad recycling value is INVALID_ARGUMENT before anything runs", async () => {
    const action = await uploadAction(farm.clients, {
      args: ["sh", "-c", "echo ran"],
      platform: [p("dockerReuse", "maybe")],
    });
    const { response } = await execute(farm.clients, action);
    assert.equal(response.status?.code, Code.INVALID_ARGUMENT, response.status?.message);
    assert.match(response.status?.message ?? "", /dockerReuse: "maybe" is not "true" or "false"/);
    assert.equal(response.result, undefined);
  });
});
