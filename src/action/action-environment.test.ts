import assert from "node:assert/strict";
import { test } from "node:test";
import { Assignment } from "../gen/berth/worker/v1/worker.js";
import { Code } from "../status/status.js";
import {
  type ActionEnvironment,
  CHROOT_ENVIRONMENT,
  environmentFromWire,
  environmentToWire,
  HOST_ROOT_ENVIRONMENT,
} from "./action-environment.js";

const EXPANDED: ActionEnvironment = {
  kind: "expanded-image",
  image: {
    baseRootDigest: { hash: "a".repeat(64), sizeBytes: 12 },
    inputRootPath: "/run/berth/execroot",
    reference: `registry.example/base@sha256:${"b".repeat(64)}`,
    manifestDigest: `sha256:${"b".repeat(64)}`,
  },
};

test("every environment crosses the wire as itself, through Assignment's real encoding", () => {
  const environments: ActionEnvironment[] = [
    HOST_ROOT_ENVIRONMENT,
    { kind: "container-image", reference: `registry.example/tool@sha256:${"c".repeat(64)}` },
    EXPANDED,
    CHROOT_ENVIRONMENT,
  ];
  for (const environment of environments) {
    const bytes = Assignment.encode(Assignment.fromPartial(environmentToWire(environment))).finish();
    assert.deepEqual(environmentFromWire(Assignment.decode(bytes)), environment);
  }
});

test("an assignment naming no environment is INVALID_ARGUMENT, not the host's root by omission", () => {
  const decoded = Assignment.decode(Assignment.encode(Assignment.fromPartial({ leaseId: "x" })).finish());
  assert.throws(
    () => environmentFromWire(decoded),
    (err: { code: number; message: string }) =>
      err.code === Code.INVALID_ARGUMENT && /assignment\.environment: names 0 environments/.test(err.message),
  );
});

test("a stream carrying two environments (an image and a chroot) is INVALID_ARGUMENT, not whichever came last", () => {
  // Hand-made bytes with both members of the oneof. The generated decoder keeps every field it reads
  // (it does not clear a oneof's other members), so only this check stands between them and the worker.
  const image = Assignment.encode(Assignment.fromPartial({ containerImage: { reference: "registry.example/tool:1" } }));
  const chroot = Assignment.encode(Assignment.fromPartial({ inputRootAsRoot: {} }));
  const decoded = Assignment.decode(Buffer.concat([image.finish(), chroot.finish()]));
  assert.throws(
    () => environmentFromWire(decoded),
    (err: { code: number; message: string }) =>
      err.code === Code.INVALID_ARGUMENT && /assignment\.environment: names 2 environments/.test(err.message),
  );
});

test("a container image without a reference is INVALID_ARGUMENT naming the field", () => {
  assert.throws(
    () => environmentFromWire({ containerImage: { reference: "" } }),
    (err: { code: number; message: string }) =>
      err.code === Code.INVALID_ARGUMENT && /assignment\.container_image\.reference/.test(err.message),
  );
});
