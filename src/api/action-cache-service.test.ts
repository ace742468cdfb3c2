import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import type { ServiceError } from "@grpc/grpc-js";
import { randomBlob, sha256, type WireDigest } from "../../test/support/blobs.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { statusDetails, unaryCall } from "../../test/support/rpc.js";
import {
  ActionResult,
  Compressor_Value,
  Directory,
  Tree,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code } from "../status/status.js";

let farm: TestFarm;
before(async () => {
  farm = await startTestFarm({ instanceNames: ["", "a", "b"] });
});
after(() => farm.close());

const upload = async (...blobs: { data: Buffer; digest: WireDigest }[]) => {
  const response = await unaryCall(farm.clients.cas.batchUpdateBlobs.bind(farm.clients.cas), {
    instanceName: "",
    digestFunction: 0,
    requests: blobs.map((b) => ({ ...b, compressor: Compressor_Value.IDENTITY })),
  });
  assert.ok(response.responses.every((r) => r.status?.code === Code.OK));
};

const getResult = (
  actionDigest: WireDigest,
  instanceName = "",
  inline: Partial<{ inlineStdout: boolean; inlineStderr: boolean; inlineOutputFiles: string[] }> = {},
) =>
  unaryCall(farm.clients.ac.getActionResult.bind(farm.clients.ac), {
    instanceName,
    actionDigest,
    inlineStdout: false,
    inlineStderr: false,
    inlineOutputFiles: [],
    digestFunction: 0,
    ...inline,
  });

const updateResult = (actionDigest: WireDigest, actionResult: Partial<ActionResult>, instanceName = "") =>
  unaryCall(farm.clients.ac.updateActionResult.bind(farm.clients.ac), {
    instanceName,
    actionDigest,
    actionResult: ActionResult.fromPartial(actionResult),
    resultsCachePolicy: undefined,
    digestFunction: 0,
  });

function failsWith(code: number, message: RegExp) {
  return (err: ServiceError) => {
    assert.equal(err.code, code, err.details);
    assert.match(err.details, message);
    return true;
  };
}

/** A result with an output file, an output directory and stdout, all uploaded. */
async function completeResult() {
  const file = randomBlob(200);
  const stdout = randomBlob(50);
  const nested = randomBlob(30);
  const tree = Tree.fromPartial({
    root: Directory.fromPartial({ files: [{ name: "n", digest: nested.digest }] }),
    children: [],
  });
  const treeData = Buffer.from(Tree.encode(tree).finish());
  const treeBlob = { data: treeData, digest: sha256(treeData) };
  await upload(file, stdout, nested, treeBlob);
  const result: Partial<ActionResult> = {
    outputFiles: [
      { path: "out/f", digest: file.digest, isExecutable: true, contents: Buffer.alloc(0), nodeProperties: undefined },
    ],
    outputDirectories: [
      { path: "out/d", treeDigest: treeBlob.digest, isTopologicallySorted: false, rootDirectoryDigest: undefined },
    ],
    stdoutDigest: stdout.digest,
    exitCode: 0,
  };
  return { result, file, stdout, nested, treeBlob };
}

describe("GetActionResult and UpdateActionResult", () => {
  test("a stored result is returned to the same instance only", async () => {
    const action = randomBlob(10).digest;
    const { result } = await completeResult();
    await updateResult(action, result, "a");
    const hit = await getResult(action, "a");
    assert.deepEqual(
      hit.outputFiles.map((f) => f.path),
      ["out/f"],
    );
    assert.equal(hit.outputFiles[0]?.isExecutable, true);
    assert.deepEqual(hit.stdoutDigest, result.stdoutDigest);
    await assert.rejects(getResult(action, "b"), failsWith(Code.NOT_FOUND, /no result for action/));
    await assert.rejects(getResult(action, ""), failsWith(Code.NOT_FOUND, /no result for action/));
  });

  test("stdout, stderr and output files are inlined when asked, within the limit", async () => {
    const action = randomBlob(10).digest;
    const { result, file, stdout } = await completeResult();
    await updateResult(action, result);
    const plain = await getResult(action);
    assert.equal(plain.stdoutRaw.byteLength, 0);
    assert.equal(plain.outputFiles[0]?.contents.byteLength, 0);
    const inlined = await getResult(action, "", { inlineStdout: true, inlineOutputFiles: ["out/f"] });
    assert.ok(inlined.stdoutRaw.equals(stdout.data));
    assert.ok(inlined.outputFiles[0]?.contents.equals(file.data));
  });

  test("an entry whose blobs were evicted is a miss, never a hit the client cannot download", async () => {
    const small = await startTestFarm({ cas: { maxSizeBytes: 64 * 1024 } });
    try {
      const action = randomBlob(10).digest;
      const file = randomBlob(2000);
      const put = (blob: { data: Buffer; digest: WireDigest }) =>
        unaryCall(small.clients.cas.batchUpdateBlobs.bind(small.clients.cas), {
          instanceName: "",
          digestFunction: 0,
          requests: [{ ...blob, compressor: Compressor_Value.IDENTITY }],
        });
      await put(file);
      const outputFiles = [
        { path: "f", digest: file.digest, isExecutable: false, contents: Buffer.alloc(0), nodeProperties: undefined },
      ];
      await unaryCall(small.clients.ac.updateActionResult.bind(small.clients.ac), {
        instanceName: "",
        actionDigest: action,
        actionResult: ActionResult.fromPartial({ outputFiles }),
        resultsCachePolicy: undefined,
        digestFunction: 0,
      });
      const get = () =>
        unaryCall(small.clients.ac.getActionResult.bind(small.clients.ac), {
          instanceName: "",
          actionDigest: action,
          inlineStdout: false,
          inlineStderr: false,
          inlineOutputFiles: [],
          digestFunction: 0,
        });
      assert.equal((await get()).outputFiles.length, 1);
      // Newer blobs push the output file out of the 64 KiB CAS.
      for (let i = 0; i < 40; i++) await put(randomBlob(2000));
      await assert.rejects(get(), failsWith(Code.NOT_FOUND, /no result for action/));
    } finally {
      await small.close();
    }
  });

  test("UpdateActionResult refuses results naming blobs that are not in the CAS", async () => {
    const action = randomBlob(10).digest;
    const absent = randomBlob(77).digest;
    const err = await updateResult(action, {
      outputFiles: [
        { path: "x", digest: absent, isExecutable: false, contents: Buffer.alloc(0), nodeProperties: undefined },
      ],
    }).catch((e: ServiceError) => e);
    assert.ok(err instanceof Error);
    assert.equal((err as ServiceError).code, Code.FAILED_PRECONDITION);
    const violations = statusDetails(err as ServiceError).preconditionFailure?.violations ?? [];
    assert.deepEqual(
      violations.map((v) => [v.type, v.subject]),
      [["MISSING", `blobs/${absent.hash}/${absent.sizeBytes}`]],
    );
    await assert.rejects(getResult(action), failsWith(Code.NOT_FOUND, /no result/));
  });

  test("inline data in an update is moved into the CAS and verified", async () => {
    const action = randomBlob(10).digest;
    const contents = Buffer.from("inline file");
    const stored = await updateResult(action, {
      outputFiles: [{ path: "i", digest: sha256(contents), isExecutable: false, contents, nodeProperties: undefined }],
      stdoutRaw: Buffer.from("hello stdout"),
    });
    assert.deepEqual(stored.stdoutDigest, sha256("hello stdout"));
    assert.equal(stored.stdoutRaw.byteLength, 0);
    const hit = await getResult(action, "", { inlineStdout: true });
    assert.equal(hit.stdoutRaw.toString(), "hello stdout");
    await assert.rejects(
      updateResult(action, {
        outputFiles: [{ path: "i", digest: sha256("other"), isExecutable: false, contents, nodeProperties: undefined }],
      }),
      failsWith(Code.INVALID_ARGUMENT, /output_files\[0\]\.contents/),
    );
  });

  test("malformed results and digests are INVALID_ARGUMENT naming the field", async () => {
    const action = randomBlob(10).digest;
    const f = randomBlob(5);
    await upload(f);
    const file = (path: string) => ({
      path,
      digest: f.digest,
      isExecutable: false,
      contents: Buffer.alloc(0),
      nodeProperties: undefined,
    });
    const cases: [Partial<ActionResult>, RegExp][] = [
      [{ outputFiles: [file("/abs")] }, /output_files\[0\]\.path.*absolute/],
      [{ outputFiles: [file("a/../b")] }, /output_files\[0\]\.path.*"\.\." segment/],
      [{ outputFiles: [file("a//b")] }, /output_files\[0\]\.path/],
      [{ outputFiles: [file("a"), file("a")] }, /output_files\[1\]\.path.*also named by/],
      [{ outputFiles: [{ ...file("a"), digest: { hash: "zz", sizeBytes: 5 } }] }, /output_files\[0\]\.digest\.hash/],
      [{ outputSymlinks: [{ path: "l", target: "", nodeProperties: undefined }] }, /target is empty/],
    ];
    for (const [result, message] of cases) {
      await assert.rejects(updateResult(action, result), failsWith(Code.INVALID_ARGUMENT, message));
    }
    await assert.rejects(
      getResult({ hash: "nothex", sizeBytes: 1 }),
      failsWith(Code.INVALID_ARGUMENT, /action_digest\.hash/),
    );
    await assert.rejects(
      unaryCall(farm.clients.ac.updateActionResult.bind(farm.clients.ac), {
        instanceName: "",
        actionDigest: action,
        actionResult: undefined,
        resultsCachePolicy: undefined,
        digestFunction: 0,
      }),
      failsWith(Code.INVALID_ARGUMENT, /action_result/),
    );
  });
});
