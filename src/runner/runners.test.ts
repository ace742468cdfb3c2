import assert from "node:assert/strict";
import { test } from "node:test";
import { EXPANDED_IMAGE_CAPABILITY, IMAGE_CAPABILITY } from "../action/action-platform.js";
import { WORKLOAD_ISOLATION_TYPE } from "../action/workload-isolation.js";
import { BubblewrapSandbox } from "../sandbox/bubblewrap.js";
import { Code } from "../status/status.js";
import { BubblewrapRunner } from "./bubblewrap-runner.js";
import { Runners } from "./runners.js";

test("the runner an action's isolation asks for is the one the worker has for it", () => {
  const sandboxRunner = new BubblewrapRunner(new BubblewrapSandbox(), { layeredRoots: true });
  const runners = new Runners({ "namespace-sandbox": sandboxRunner });
  assert.equal(runners.for("namespace-sandbox"), sandboxRunner);
});

test("a worker without a runner for the isolation asked for fails the action with FAILED_PRECONDITION naming the property", () => {
  const none = new Runners({});
  assert.throws(
    () => none.for("namespace-sandbox"),
    (err: { code: number; message: string }) =>
      err.code === Code.FAILED_PRECONDITION && err.message.includes(WORKLOAD_ISOLATION_TYPE),
  );
  assert.deepEqual(none.capabilities, []);
});

test("what a worker offers is what its runners can do, each property once", () => {
  const layered = new Runners({
    "namespace-sandbox": new BubblewrapRunner(new BubblewrapSandbox(), { layeredRoots: true }),
  });
  assert.deepEqual(layered.capabilities, [IMAGE_CAPABILITY, EXPANDED_IMAGE_CAPABILITY]);
  assert.ok(layered.offers(IMAGE_CAPABILITY));
  const plain = new Runners({
    "namespace-sandbox": new BubblewrapRunner(new BubblewrapSandbox(), { layeredRoots: false }),
  });
  assert.deepEqual(plain.capabilities, []);
  assert.equal(plain.offers(EXPANDED_IMAGE_CAPABILITY), false);
});
