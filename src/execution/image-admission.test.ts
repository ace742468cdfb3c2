import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { execute, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { unpackDetails } from "../../test/support/rpc.js";
import { Code } from "../status/status.js";

// Workers here run no images, so every admitted image stops at the capability check.
let farm: TestFarm;
before(async () => {
  farm = await startTestFarm(
    { images: { allowed: ["127.0.0.1:5999", "docker.io/team/*", "ghcr.io/org/tool"], tagPolicy: "allow" } },
    undefined,
    { workers: 1, runImages: false },
  );
});
after(() => farm.close());

async function run(platform: { name: string; value: string }[], onCommand = false) {
  const action = await uploadAction(farm.clients, {
    args: ["true"],
    ...(onCommand ? { commandPlatform: platform } : { platform }),
  });
  return (await execute(farm.clients, action)).response;
}

test("container-image none, docker://none or empty runs on the worker's own root", async () => {
  for (const value of ["none", "docker://none", ""]) {
    const response = await run([{ name: "container-image", value }]);
    assert.equal(response.status?.code ?? 0, Code.OK, `${value}: ${response.status?.message}`);
    assert.equal(response.result?.exitCode, 0);
  }
});

test("two container-image properties, or a malformed one, are INVALID_ARGUMENT naming the property", async () => {
  const twice = await run([
    { name: "container-image", value: "docker://127.0.0.1:5999/a:1" },
    { name: "container-image", value: "docker://127.0.0.1:5999/b:1" },
  ]);
  assert.equal(twice.status?.code, Code.INVALID_ARGUMENT);
  assert.match(twice.status?.message ?? "", /container-image: is given 2 times/);
  const bad = await run([{ name: "container-image", value: "docker://127.0.0.1:5999/Upper:1" }]);
  assert.equal(bad.status?.code, Code.INVALID_ARGUMENT);
  assert.match(bad.status?.message ?? "", /container-image: invalid image reference .*lowercase/);
  const half = await run([
    { name: "container-image", value: "docker://127.0.0.1:5999/a:1" },
    { name: "container-registry-username", value: "me" },
  ]);
  assert.equal(half.status?.code, Code.INVALID_ARGUMENT);
  assert.match(half.status?.message ?? "", /container-registry-password/);
  assert.doesNotMatch(half.status?.message ?? "", /\bme\b/);
});

test("images outside images.allowed are PERMISSION_DENIED; allowed ones need a worker that runs images", async () => {
  const denied = await run([{ name: "container-image", value: "docker://docker.io/library/ubuntu:22.04" }]);
  assert.equal(denied.status?.code, Code.PERMISSION_DENIED);
  assert.match(denied.status?.message ?? "", /docker\.io\/library\/ubuntu:22\.04 is not allowed on this farm/);
  for (const value of ["docker://127.0.0.1:5999/any/thing:1", "team/compiler", "ghcr.io/org/tool:2"]) {
    // Bazel 4 sets the platform on the Command too; both places are read.
    const response = await run([{ name: "container-image", value }], value === "team/compiler");
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, `${value}: ${response.status?.message}`);
    assert.match(response.status?.message ?? "", /no worker of this farm runs container images/);
    const details = unpackDetails(response.status as NonNullable<typeof response.status>);
    assert.equal(details.preconditionFailure?.violations[0]?.type, "UNSATISFIABLE_PLATFORM");
  }
});

test("images.tagPolicy reject refuses tags and accepts digests", async () => {
  const strict = await startTestFarm({ images: { tagPolicy: "reject" } }, undefined, {
    workers: 1,
    runImages: false,
  });
  try {
    const action = await uploadAction(strict.clients, {
      args: ["true"],
      platform: [{ name: "container-image", value: "docker://127.0.0.1:5999/tools:1.4" }],
    });
    const tagged = (await execute(strict.clients, action)).response;
    assert.equal(tagged.status?.code, Code.INVALID_ARGUMENT);
    assert.match(tagged.status?.message ?? "", /only images named by digest/);
    const pinned = await uploadAction(strict.clients, {
      args: ["true"],
      platform: [{ name: "container-image", value: `docker://127.0.0.1:5999/tools@sha256:${"a".repeat(64)}` }],
    });
    const byDigest = (await execute(strict.clients, pinned)).response;
    assert.match(byDigest.status?.message ?? "", /no worker of this farm runs container images/);
  } finally {
    await strict.close();
  }
});
