import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { chmod, mkdtemp, readdir, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { readBlob, uploadBlobs } from "../../test/support/actions.js";
import { sha256, type WireDigest } from "../../test/support/blobs.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { type TestExecutor, testExecutor } from "../../test/support/runner.js";
import { type DirNode, dir, encodeTree, file, graft, symlink } from "../../test/support/trees.js";
import { parseDigest } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { ImageUsed } from "../gen/berth/image/v1/image.js";
import { Assignment, type Completion } from "../gen/berth/worker/v1/worker.js";
import { Action, Command, DigestFunction_Value } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { PreconditionFailure } from "../gen/google/rpc/error_details.js";
import { Code } from "../status/status.js";
import { ExpandedRoots } from "./expanded-roots.js";
import { RemoteCas } from "./remote-cas.js";

/** Where the farm grafts the client's input root into an image's tree. */
const INPUT_ROOT_PATH = "/run/berth/execroot";
const REFERENCE = "registry.test/team/busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const MANIFEST_DIGEST = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

// The scheduler's side of expand mode is written elsewhere: these tests play the farm's part by hand (an image
// tree and a merged input root in the CAS of a real farm, an Assignment naming them) and drive the worker's
// executor with the same real components a worker builds.
let farm: TestFarm;
let cas: RemoteCas;
let workDir: string;
let expandedRoots: ExpandedRoots;
let executor: TestExecutor;

/** busybox-static's binary, the only program of the test image. */
let busybox: Buffer;

before(async () => {
  farm = await startTestFarm();
  cas = RemoteCas.connect(farm.address);
  workDir = await mkdtemp(join(tmpdir(), "berth-expanded-actions-"));
  // The action's user must reach its directory (the sandbox binds it from a staged path otherwise; both work).
  await chmod(workDir, 0o755);
  busybox = await readFile("/bin/busybox");
  expandedRoots = await ExpandedRoots.open(join(workDir, "expanded"), { maxBytes: 1024 ** 3 });
  executor = await testExecutor(workDir, cas, { workerName: "expand-test", expandedRoots });
});
after(async () => {
  await executor?.trash.drain();
  cas?.close();
  await farm?.close();
  if (workDir) await rm(workDir, { recursive: true, force: true });
});

/**
 * An image's root filesystem as the farm expands it: busybox, a marker, and
 * the empty input root path. `etcMode` is /etc's unix_mode.
 */
function imageTree(marker: string, extra: Record<string, DirNode> = {}, etcMode = 0o755): DirNode {
  return dir(
    {
      bin: dir({
        busybox: file(busybox, true),
        mkdir: symlink("busybox"),
        rm: symlink("busybox"),
        sh: symlink("busybox"),
        cat: symlink("busybox"),
        echo: symlink("/bin/busybox"),
        id: symlink("busybox"),
        pwd: symlink("busybox"),
        stat: symlink("busybox"),
        test: symlink("busybox"),
      }),
      dev: dir(),
      etc: dir({ marker: file(`${marker}\n`), passwd: file("root:x:0:0:root:/root:/bin/sh\n") }, etcMode),
      proc: dir(),
      run: dir({ berth: dir({ execroot: dir() }) }),
      tmp: dir({}, 0o1777),
      ...extra,
    },
    0o755,
  );
}

interface Expanded {
  base: WireDigest;
  merged: WireDigest;
}

/** Uploads the image's tree, and it again with `input` grafted at the input root path, as the farm would. */
async function uploadExpanded(image: DirNode, input: DirNode, skip: WireDigest[] = []): Promise<Expanded> {
  const base = encodeTree(image);
  const merged = encodeTree(graft(image, INPUT_ROOT_PATH, input));
  const skipped = new Set(skip.map((d) => d.hash));
  const blobs = new Map([...base.blobs, ...merged.blobs].map((b) => [b.digest.hash, b]));
  await uploadBlobs(
    farm.clients,
    [...blobs.values()].filter((b) => !skipped.has(b.digest.hash)),
  );
  return { base: base.root, merged: merged.root };
}

interface ActionSpec {
  script: string;
  /** Relative to the client's input root. */
  workingDirectory?: string;
  outputFiles?: string[];
  runAsRoot?: boolean;
}

/** The assignment the farm sends for `spec` in an expanded image: the command already rewritten. */
function assignmentFor(expanded: Expanded, spec: ActionSpec): Assignment {
  const wd = spec.workingDirectory ?? "";
  return Assignment.fromPartial({
    leaseId: randomUUID(),
    instanceName: "",
    digestFunction: DigestFunction_Value.SHA256,
    action: Action.fromPartial({
      inputRootDigest: expanded.merged,
      platform: spec.runAsRoot ? { properties: [{ name: "dockerRunAsRoot", value: "true" }] } : undefined,
    }),
    command: Command.fromPartial({
      arguments: ["sh", "-c", spec.script],
      // Already merged with the image's Env by the farm.
      environmentVariables: [
        { name: "HOME", value: "/root" },
        { name: "PATH", value: "/bin" },
      ],
      workingDirectory: join(INPUT_ROOT_PATH.slice(1), wd),
      outputFiles: spec.outputFiles ?? [],
    }),
    timeout: { seconds: 60, nanos: 0 },
    expandedImage: {
      baseRootDigest: expanded.base,
      inputRootPath: INPUT_ROOT_PATH,
      reference: REFERENCE,
      manifestDigest: MANIFEST_DIGEST,
    },
  });
}

function run(assignment: Assignment, with_: TestExecutor = executor): Promise<Completion> {
  return with_.run(assignment);
}

/** A blob of the completion: inline when small, else from the CAS. */
async function blobOf(completion: Completion, digest: WireDigest | undefined): Promise<string> {
  if (!digest) return "";
  const inline = completion.inlineBlobs.find((b) => b.digest?.hash === digest.hash);
  return inline ? Buffer.from(inline.data).toString() : readBlob(farm.clients, digest);
}

/** The completion's exit code, failing with its status or stderr when it did not run or failed. */
async function succeeded(completion: Completion): Promise<{ stdout: string }> {
  assert.equal(completion.status?.code, Code.OK, completion.status?.message);
  const stderr = await blobOf(completion, completion.result?.stderrDigest);
  assert.equal(completion.result?.exitCode, 0, stderr);
  return { stdout: await blobOf(completion, completion.result?.stdoutDigest) };
}

const skip = process.getuid?.() === 0 ? false : "mounting an overlay needs root";

describe("actions in expanded images (expand mode)", { skip }, () => {
  test("the image's tree is the root: the command sees the image's files and its input at its working directory, and its outputs come back", async () => {
    const expanded = await uploadExpanded(
      imageTree("expanded image"),
      dir({ sub: dir({ "input.txt": file("from the input root\n") }) }),
    );
    const completion = await run(
      assignmentFor(expanded, {
        script: "cat /etc/marker; pwd; cat input.txt; id -u; echo made > out/result.txt",
        workingDirectory: "sub",
        outputFiles: ["out/result.txt"],
      }),
    );
    const { stdout } = await succeeded(completion);
    assert.equal(stdout, "expanded image\n/run/berth/execroot/sub\nfrom the input root\n65534\n");
    assert.deepEqual(
      completion.result?.outputFiles.map((f) => f.path),
      ["out/result.txt"],
    );
    assert.equal(await blobOf(completion, completion.result?.outputFiles[0]?.digest), "made\n");
    const any = completion.result?.executionMetadata?.auxiliaryMetadata.find((a) => a.typeUrl.endsWith("ImageUsed"));
    assert.ok(any, "ImageUsed in auxiliary_metadata");
    assert.deepEqual(ImageUsed.decode(any.value), { reference: REFERENCE, manifestDigest: MANIFEST_DIGEST });
  });

  test("the action runs unprivileged unless dockerRunAsRoot, and cannot write in the image's root-owned directories", async () => {
    const expanded = await uploadExpanded(imageTree("users"), dir());
    assert.equal((await succeeded(await run(assignmentFor(expanded, { script: "id -u" })))).stdout, "65534\n");
    const root = await run(assignmentFor(expanded, { script: "id -u", runAsRoot: true }));
    assert.equal((await succeeded(root)).stdout, "0\n");
    for (const runAsRoot of [false, true]) {
      const refused = await run(assignmentFor(expanded, { script: "echo x > /etc/marker", runAsRoot }));
      assert.equal(refused.status?.code, Code.OK);
      assert.notEqual(refused.result?.exitCode, 0);
    }
  });

  test("writes to the image go to the action's own layer: the shared base is unchanged, the next action sees the image as it was", async () => {
    // A world-writable /etc: what the action writes there would land in the shared tree without the overlay. On
    // the host it is 0755 (hostMode); the action sees 0777 (its own upper layer's copy, see open-directories.ts).
    const image = imageTree("unchanged", {}, 0o777);
    const expanded = await uploadExpanded(image, dir());
    const baseRoot = parseDigest(SHA256, expanded.base, "base");
    for (const runAsRoot of [false, true]) {
      const writer = await run(
        assignmentFor(expanded, {
          script:
            "rm /etc/marker && echo changed > /etc/marker && echo new > /etc/added && mkdir /etc/dir && stat -c %a /etc && cat /etc/marker",
          runAsRoot,
        }),
      );
      assert.equal((await succeeded(writer)).stdout, "777\nchanged\n");
    }
    const held = await expandedRoots.acquire(SHA256, baseRoot, cas, executor.inputs.files, executor.inputs.directories);
    try {
      assert.equal(await readFile(join(held.dir, "etc", "marker"), "utf8"), "unchanged\n");
      assert.deepEqual((await readdir(join(held.dir, "etc"))).sort(), ["marker", "passwd"]);
      assert.equal((await stat(join(held.dir, "etc"))).mode & 0o7777, 0o755, "tamed on the host");
    } finally {
      await held.release();
    }
    const reader = await run(assignmentFor(expanded, { script: "cat /etc/marker && test ! -e /etc/added" }));
    assert.equal((await succeeded(reader)).stdout, "unchanged\n");
  });

  test("actions in the same image share one materialized base, also when they start together", async () => {
    const image = imageTree("shared");
    const first = await uploadExpanded(image, dir({ "a.txt": file("a\n") }));
    const second = await uploadExpanded(image, dir({ "b.txt": file("b\n") }));
    assert.deepEqual(first.base, second.base);
    const before = expandedRoots.materializations;
    const [a, b] = await Promise.all([
      run(assignmentFor(first, { script: "cat a.txt /etc/marker" })),
      run(assignmentFor(second, { script: "cat b.txt /etc/marker" })),
    ]);
    assert.equal((await succeeded(a)).stdout, "a\nshared\n");
    assert.equal((await succeeded(b)).stdout, "b\nshared\n");
    assert.equal(expandedRoots.materializations, before + 1);

    const held = await expandedRoots.acquire(
      SHA256,
      parseDigest(SHA256, first.base, "base"),
      cas,
      executor.inputs.files,
      executor.inputs.directories,
    );
    const inode = (await stat(held.dir)).ino;
    await held.release();
    const third = await run(assignmentFor(first, { script: "cat a.txt" }));
    assert.equal((await succeeded(third)).stdout, "a\n");
    assert.equal(expandedRoots.materializations, before + 1);
    const again = await expandedRoots.acquire(
      SHA256,
      parseDigest(SHA256, first.base, "base"),
      cas,
      executor.inputs.files,
      executor.inputs.directories,
    );
    assert.equal((await stat(again.dir)).ino, inode);
    await again.release();
  });

  test("a blob missing from the image or from the input is FAILED_PRECONDITION with a MISSING violation", async () => {
    const lost = file("lost from the image\n");
    const fromImage = await uploadExpanded(imageTree("missing", { opt: dir({ lost }) }), dir(), [sha256(lost.content)]);
    const lostInput = file("lost from the input\n");
    const fromInput = await uploadExpanded(imageTree("missing input"), dir({ lostInput }), [sha256(lostInput.content)]);
    for (const [expanded, content] of [
      [fromImage, lost.content],
      [fromInput, lostInput.content],
    ] as const) {
      const completion = await run(assignmentFor(expanded, { script: "true" }));
      assert.equal(completion.status?.code, Code.FAILED_PRECONDITION, completion.status?.message);
      const details = completion.status?.details.find((d) => d.typeUrl.endsWith("google.rpc.PreconditionFailure"));
      assert.ok(details, "PreconditionFailure in the status");
      const missing = sha256(content);
      assert.deepEqual(
        PreconditionFailure.decode(details.value).violations.map((v) => [v.type, v.subject]),
        [["MISSING", `blobs/${missing.hash}/${missing.sizeBytes}`]],
      );
    }
  });

  test("a tree that is not the base with the input grafted, or a working directory outside the input root, is INVALID_ARGUMENT", async () => {
    const expanded = await uploadExpanded(imageTree("graft"), dir({ "x.txt": file("x\n") }));
    const other = await uploadExpanded(imageTree("another image"), dir());
    const mismatched = await run(assignmentFor({ base: other.base, merged: expanded.merged }, { script: "true" }));
    assert.equal(mismatched.status?.code, Code.INVALID_ARGUMENT, mismatched.status?.message);

    const outside = assignmentFor(expanded, { script: "true" });
    (outside.command as Command).workingDirectory = "etc";
    const refused = await run(outside);
    assert.equal(refused.status?.code, Code.INVALID_ARGUMENT);
    assert.match(refused.status?.message ?? "", /working_directory/);

    const climbing = await run(assignmentFor(expanded, { script: "true", outputFiles: ["../../escaped"] }));
    assert.equal(climbing.status?.code, Code.INVALID_ARGUMENT);
  });

  test("a worker without expanded roots fails the action with FAILED_PRECONDITION", async () => {
    const expanded = await uploadExpanded(imageTree("no store"), dir());
    const bare = await testExecutor(join(workDir, "bare"), cas, { workerName: "expand-test" });
    const completion = await run(assignmentFor(expanded, { script: "true" }), bare);
    await bare.trash.drain();
    assert.equal(completion.status?.code, Code.FAILED_PRECONDITION);
    assert.match(completion.status?.message ?? "", /expanded images/);
  });
});
