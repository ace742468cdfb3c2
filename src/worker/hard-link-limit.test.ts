import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { execute, readBlob, uploadBlobs } from "../../test/support/actions.js";
import { directoryBlob, sha256 } from "../../test/support/blobs.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { Action, Command, type Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code } from "../status/status.js";

let farm: TestFarm;
before(async () => {
  farm = await startTestFarm({}, undefined, { workers: 1, runImages: false });
});
after(() => farm.close());

test("65,536 identical input files (past ext4's 65,000 links of one file) are laid out, the excess copied", async () => {
  const content = Buffer.from("same\n");
  const half = 32_768;
  const files: Directory["files"] = Array.from({ length: half }, (_, i) => ({
    name: `f${String(i).padStart(5, "0")}`,
    digest: sha256(content),
    isExecutable: false,
    nodeProperties: undefined,
  }));
  const a = directoryBlob({ files });
  // Another Directory (its own digest) naming the same file as many times again.
  const b = directoryBlob({ files, nodeProperties: { properties: [], unixMode: 0o755, mtime: undefined } });
  const root = directoryBlob({
    directories: [
      { name: "a", digest: a.digest },
      { name: "b", digest: b.digest },
    ],
  });
  const command = Command.fromPartial({
    arguments: [
      "/bin/sh",
      "-c",
      "ls a | wc -l; ls b | wc -l; cat a/f00000 b/f32767; find a b -type f -links 1 | wc -l; find a b -type f -links +1 | wc -l",
    ],
    environmentVariables: [{ name: "PATH", value: "/usr/bin:/bin" }],
  });
  const commandData = Buffer.from(Command.encode(command).finish());
  const action = Action.fromPartial({ commandDigest: sha256(commandData), inputRootDigest: root.digest });
  const actionData = Buffer.from(Action.encode(action).finish());
  await uploadBlobs(farm.clients, [{ digest: sha256(content), data: content }, a]);
  await uploadBlobs(farm.clients, [b]);
  await uploadBlobs(farm.clients, [
    root,
    { digest: sha256(commandData), data: commandData },
    { digest: sha256(actionData), data: actionData },
  ]);
  const { response } = await execute(farm.clients, sha256(actionData));
  assert.equal(response.status?.code ?? 0, Code.OK, response.status?.message);
  assert.equal(response.result?.exitCode, 0, await readBlob(farm.clients, response.result?.stderrDigest));
  const lines = (await readBlob(farm.clients, response.result?.stdoutDigest)).trim().split("\n");
  // ext4 allows 65,000 links: the worker's cached copy holds one, the action 64,999; the other 537 are copies.
  assert.deepEqual(lines, ["32768", "32768", "same", "same", "537", "64999"]);
});
