import assert from "node:assert/strict";
import { test } from "node:test";
import { Assignment } from "../gen/berth/worker/v1/worker.js";
import { Action, Command, DigestFunction_Value } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code } from "../status/status.js";
import { readAssignment } from "./action-request.js";

const ROOT = { hash: "a".repeat(64), sizeBytes: 80 };

function assignment(command: Partial<Command>, more: Partial<Assignment> = { hostRoot: {} }): Assignment {
  return Assignment.fromPartial({
    leaseId: "lease",
    digestFunction: DigestFunction_Value.SHA256,
    action: Action.fromPartial({ inputRootDigest: ROOT }),
    command: Command.fromPartial({ arguments: ["true"], ...command }),
    timeout: { seconds: 2, nanos: 500_000_000 },
    ...more,
  });
}

const expanded = (inputRootPath: string) => ({
  expandedImage: { baseRootDigest: ROOT, inputRootPath, reference: "r", manifestDigest: "" },
});

function refused(value: Assignment, field: RegExp): void {
  assert.throws(
    () => readAssignment(value),
    (err: { code: number; message: string }) => err.code === Code.INVALID_ARGUMENT && field.test(err.message),
  );
}

test("an assignment is read into what the steps need: environment, platform, timeout, working directory", () => {
  const request = readAssignment(assignment({ workingDirectory: "pkg", outputFiles: ["../out"] }));
  assert.equal(request.environment.kind, "host-root");
  assert.equal(request.timeoutMs, 2500);
  assert.equal(request.workingDirectory, "pkg");
  assert.equal(request.inputRootDigest.hash, ROOT.hash);
});

test("outputs that lead out of the input root by name are INVALID_ARGUMENT before anything is laid out", () => {
  refused(assignment({ workingDirectory: "pkg", outputFiles: ["../../escaped"] }), /command output path/);
  refused(assignment({ outputPaths: ["/etc/passwd"] }), /command output path/);
  refused(assignment({ workingDirectory: "../up" }), /command\.working_directory/);
});

test("in expand mode the working directory must lie below the graft, which must be a plain absolute path", () => {
  const inGraft = readAssignment(
    assignment({ workingDirectory: "run/berth/execroot/sub" }, expanded("/run/berth/execroot")),
  );
  assert.equal(inGraft.workingDirectory, "sub");
  refused(assignment({ workingDirectory: "etc" }, expanded("/run/berth/execroot")), /command\.working_directory/);
  refused(assignment({}, expanded("/run/../etc")), /expanded_image\.input_root_path/);
  refused(assignment({}, expanded("run/berth")), /expanded_image\.input_root_path/);
});

test("an unknown digest function, a missing command or no environment is INVALID_ARGUMENT naming it", () => {
  refused({ ...assignment({}), digestFunction: 99 as DigestFunction_Value }, /digest_function/);
  refused({ ...assignment({}), command: undefined }, /assignment: lacks the action or the command/);
  refused(assignment({}, {}), /assignment\.environment/);
});
