import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";
import { randomBlob } from "../../test/support/blobs.js";
import { startTestFarm } from "../../test/support/farm.js";
import { collect, unaryCall } from "../../test/support/rpc.js";
import { ActionResult, Compressor_Value } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";

test("blobs and action results survive a restart of the farm", async () => {
  const first = await startTestFarm();
  const small = randomBlob(100);
  const large = randomBlob(600_000);
  const action = randomBlob(20).digest;
  let second: Awaited<ReturnType<typeof startTestFarm>> | undefined;
  try {
    await unaryCall(first.clients.cas.batchUpdateBlobs.bind(first.clients.cas), {
      instanceName: "",
      digestFunction: 0,
      requests: [{ ...small, compressor: Compressor_Value.IDENTITY }],
    });
    await new Promise<void>((resolve, reject) => {
      const call = first.clients.byteStream.write((err) => (err ? reject(err) : resolve()));
      call.write({
        resourceName: `uploads/${randomUUID()}/blobs/${large.digest.hash}/${large.digest.sizeBytes}`,
        writeOffset: 0,
        finishWrite: true,
        data: large.data,
      });
      call.end();
    });
    await unaryCall(first.clients.ac.updateActionResult.bind(first.clients.ac), {
      instanceName: "",
      actionDigest: action,
      actionResult: ActionResult.fromPartial({
        outputFiles: [{ path: "out", digest: large.digest }],
        stdoutDigest: small.digest,
        exitCode: 3,
      }),
      resultsCachePolicy: undefined,
      digestFunction: 0,
    });

    second = await first.restart();
    assert.notEqual(second.address, first.address);
    const missing = await unaryCall(second.clients.cas.findMissingBlobs.bind(second.clients.cas), {
      instanceName: "",
      blobDigests: [small.digest, large.digest],
      digestFunction: 0,
    });
    assert.deepEqual(missing.missingBlobDigests, []);
    const read = await collect(
      second.clients.byteStream.read({
        resourceName: `blobs/${large.digest.hash}/${large.digest.sizeBytes}`,
        readOffset: 0,
        readLimit: 0,
      }),
    );
    assert.ok(Buffer.concat(read.map((r) => r.data)).equals(large.data));
    const result = await unaryCall(second.clients.ac.getActionResult.bind(second.clients.ac), {
      instanceName: "",
      actionDigest: action,
      inlineStdout: true,
      inlineStderr: false,
      inlineOutputFiles: [],
      digestFunction: 0,
    });
    assert.equal(result.exitCode, 3);
    assert.ok(result.stdoutRaw.equals(small.data));
  } finally {
    await (second ?? first).close();
  }
});
