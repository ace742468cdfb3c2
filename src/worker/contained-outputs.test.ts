import assert from "node:assert/strict";
import { chmod, mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { type ActionSpec, execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { sha256, type WireDigest } from "../../test/support/blobs.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { busyboxImage, startRegistry, type TestRegistry } from "../../test/support/registry.js";
import { unaryCall, unpackDetails } from "../../test/support/rpc.js";
import { type ExecuteResponse, Tree } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code } from "../status/status.js";

/**
 * Hostile actions against a real farm: the worker reads outputs and makes
 * their parents as root, and the action chooses the symlinks in its input
 * root and in what it leaves behind. None may make the worker read a host
 * file or create anything outside the action's directory.
 */

/** Where the actions of these tests see their input root (an image's too: images.inputRootPath's default). */
const INPUT_SEEN = "/run/berth/execroot";

/** Host files an action must never obtain through its outputs. */
const SECRETS = ["/etc/shadow", "/etc/passwd"];

/** A directory only root may enter, outside the farm, for the attacks that try to create things there. */
let rootOnly: string;
/** The host secrets' digests, read as the worker would have. */
let secretDigests: WireDigest[];

before(async () => {
  rootOnly = await mkdtemp(join(tmpdir(), "berth-root-only-"));
  await chmod(rootOnly, 0o700);
  secretDigests = await Promise.all(SECRETS.map(async (path) => sha256(await readFile(path))));
});
after(() => rm(rootOnly, { recursive: true, force: true }));

/** Which of `digests` the farm's CAS holds. */
async function held(farm: TestFarm, digests: WireDigest[]): Promise<WireDigest[]> {
  const response = await unaryCall(farm.clients.cas.findMissingBlobs.bind(farm.clients.cas), {
    instanceName: "",
    blobDigests: digests,
    digestFunction: 0,
  });
  const missing = new Set(response.missingBlobDigests.map((d) => d.hash));
  return digests.filter((d) => !missing.has(d.hash));
}

/** The Tree message an output directory names. */
async function readTree(farm: TestFarm, digest: WireDigest | undefined): Promise<Tree> {
  assert.ok(digest, "the output directory has a tree");
  const read = await unaryCall(farm.clients.cas.batchReadBlobs.bind(farm.clients.cas), {
    instanceName: "",
    digests: [digest],
    acceptableCompressors: [],
    digestFunction: 0,
  });
  return Tree.decode(read.responses[0]?.data ?? Buffer.alloc(0));
}

async function run(farm: TestFarm, spec: ActionSpec): Promise<ExecuteResponse> {
  const action = await uploadAction(farm.clients, { salt: `${Math.random()}`, ...spec });
  return (await execute(farm.clients, action)).response;
}

/** The response refuses exactly `fields` (Command fields) with INVALID_ARGUMENT, and the farm got no host secret. */
async function assertRefused(farm: TestFarm, response: ExecuteResponse, fields: Record<string, string>) {
  assert.equal(response.status?.code, Code.INVALID_ARGUMENT, response.status?.message);
  const message = response.status?.message ?? "";
  for (const [field, path] of Object.entries(fields)) {
    assert.ok(message.includes(`${field}: "${path}"`), `the message names ${field} "${path}": ${message}`);
  }
  const { badRequest } = unpackDetails(response.status ?? { code: 0, message: "", details: [] });
  assert.deepEqual(badRequest?.fieldViolations.map((v) => v.field).sort(), Object.keys(fields).sort());
  for (const violation of badRequest?.fieldViolations ?? []) {
    assert.match(
      violation.description,
      /leads out of the input root through the symbolic link|climbs above the input root/,
    );
  }
  const paths = new Set(Object.values(fields));
  const returned = [
    ...(response.result?.outputFiles ?? []),
    ...(response.result?.outputDirectories ?? []),
    ...(response.result?.outputSymlinks ?? []),
  ].map((o) => o.path);
  assert.deepEqual(
    returned.filter((p) => paths.has(p)),
    [],
    "no refused output is in the result",
  );
  assert.deepEqual(await held(farm, secretDigests), [], "no host secret reached the CAS");
}

/** The attacks, on the host root and in an image alike; `platform` puts the action into an image. */
function outputAttacks(farmOf: () => TestFarm, platform: () => { name: string; value: string }[]) {
  test("an input symlink to /etc (or /proc/self) does not make the worker read a host file: INVALID_ARGUMENT names each output", async () => {
    const farm = farmOf();
    const legacy = await run(farm, {
      args: ["sh", "-c", "echo ran"],
      symlinks: { y: "/etc", self: "/proc/self" },
      outputFiles: ["y/shadow", "y/passwd", "self/environ"],
      platform: platform(),
    });
    await assertRefused(farm, legacy, {
      "command.output_files[0]": "y/shadow",
      "command.output_files[1]": "y/passwd",
      "command.output_files[2]": "self/environ",
    });
    assert.match(legacy.status?.message ?? "", /the symbolic link "y" -> "\/etc"/);
    // The command ran: its logs come with the status, and nothing of it is cached.
    assert.equal(await readBlob(farm.clients, legacy.result?.stdoutDigest), "ran\n");
    const modern = await run(farm, {
      args: ["true"],
      symlinks: { y: "/etc" },
      outputPaths: ["y/shadow", "y"],
      platform: platform(),
    });
    await assertRefused(farm, modern, { "command.output_paths[0]": "y/shadow" });
    // The link itself is an output like any other: returned as a symlink, never followed.
    assert.deepEqual(
      modern.result?.outputSymlinks.map((s) => [s.path, s.target]),
      [["y", "/etc"]],
    );
  });

  test("a relative input symlink that climbs out of the root, and a working directory through a link, are refused too", async () => {
    const farm = farmOf();
    const climbing = await run(farm, {
      args: ["true"],
      symlinks: {
        "sub/up": "../../../../../../../../../../..",
        "sub/etc": "../../../../etc",
        "sub/in": "../sub/up/etc",
      },
      outputFiles: ["sub/up/etc/shadow", "sub/etc/passwd", "sub/in/passwd"],
      platform: platform(),
    });
    await assertRefused(farm, climbing, {
      "command.output_files[0]": "sub/up/etc/shadow",
      "command.output_files[1]": "sub/etc/passwd",
      "command.output_files[2]": "sub/in/passwd",
    });
    assert.match(climbing.status?.message ?? "", /climbs above the input root/);
    // The working directory through a link out of the root is refused before anything runs.
    const workingDir = await run(farm, {
      args: ["sh", "-c", "echo ran > /dev/stderr"],
      files: { "w/keep": "" },
      symlinks: { "w/in": "/etc" },
      workingDirectory: "w/in",
      outputFiles: ["shadow"],
      platform: platform(),
    });
    assert.equal(workingDir.status?.code, Code.INVALID_ARGUMENT);
    assert.equal(
      workingDir.status?.message,
      'command.working_directory: "w/in" leads out of the input root through the symbolic link "w/in" -> "/etc", an absolute path',
    );
    assert.equal(workingDir.result, undefined, "the command did not run");
    const climbing2 = await run(farm, {
      args: ["true"],
      symlinks: { "w/up": "../.." },
      workingDirectory: "w/up",
      platform: platform(),
    });
    assert.equal(climbing2.status?.code, Code.INVALID_ARGUMENT);
    assert.match(climbing2.status?.message ?? "", /^command.working_directory: "w\/up" climbs above the input root/);
  });

  test("symlinks the action makes itself are not followed either", async () => {
    const farm = farmOf();
    const response = await run(farm, {
      // The worker made y, up/etc and d as directories (output parents, Bazel 4's output directories) first.
      args: [
        "sh",
        "-c",
        "rm -r y up d && ln -s /etc y && ln -s ../../../../../../../../.. up && ln -s /etc/shadow s && ln -s /etc d" +
          // A hard link cannot stand in for a symlink: the input root is a mount of its own (EXDEV).
          "; ln /etc/passwd hard; echo $? > hard-status",
      ],
      outputFiles: ["y/passwd", "up/etc/shadow", "s", "hard", "hard-status"],
      outputDirectories: ["d"],
      platform: platform(),
    });
    await assertRefused(farm, response, {
      "command.output_files[0]": "y/passwd",
      "command.output_files[1]": "up/etc/shadow",
    });
    // Outputs that are links come back as links, whichever kind the client asked for.
    assert.deepEqual(
      response.result?.outputFileSymlinks.map((s) => [s.path, s.target]),
      [["s", "/etc/shadow"]],
    );
    assert.deepEqual(
      response.result?.outputDirectorySymlinks.map((s) => [s.path, s.target]),
      [["d", "/etc"]],
    );
    assert.deepEqual(response.result?.outputDirectories, []);
    const files = response.result?.outputFiles ?? [];
    assert.deepEqual(
      files.map((f) => f.path),
      ["hard-status"],
    );
    assert.notEqual(await readBlob(farm.clients, files[0]?.digest), "0\n", "ln /etc/passwd failed");
  });

  test("a process the action leaves behind, swapping outputs for links, is gone before outputs are read", async () => {
    const farm = farmOf();
    // Started just before the command exits, escaping its process group: it would swap f and y for links to
    // host files while the worker reads them, if it survived the command.
    const swapper = "while :; do ln -sfn /etc/shadow f; ln -sfn /etc y; done";
    const response = await run(farm, {
      args: ["sh", "-c", `rmdir y; echo mine > f; setsid sh -c '${swapper}' & sleep 0.2`],
      outputFiles: ["f", "y/shadow"],
      platform: platform(),
    });
    assert.deepEqual(await held(farm, secretDigests), [], "no host secret reached the CAS");
    assert.deepEqual(response.result?.outputFiles ?? [], [], "f is never read through the link");
    // Whatever state the swapper was killed in: f a link (or briefly absent), y a link, so y/shadow refused.
    assert.ok((response.result?.outputFileSymlinks.length ?? 0) <= 1);
    if (response.status?.code !== Code.OK)
      await assertRefused(farm, response, { "command.output_files[1]": "y/shadow" });
  });

  test("an output parent through a symlink to a root-only directory makes nothing there", async () => {
    const farm = farmOf();
    const response = await run(farm, {
      args: ["true"],
      symlinks: { o: rootOnly, rel: `../../../../../../../../../..${rootOnly}` },
      outputFiles: ["o/made/x", "rel/made-too/x"],
      outputDirectories: ["o/dir", "rel/dir-too"],
      platform: platform(),
    });
    assert.deepEqual(await readdir(rootOnly), [], "nothing was created in the root-only directory");
    await assertRefused(farm, response, {
      "command.output_files[0]": "o/made/x",
      "command.output_files[1]": "rel/made-too/x",
      "command.output_directories[0]": "o/dir",
      "command.output_directories[1]": "rel/dir-too",
    });
    const modern = await run(farm, {
      args: ["true"],
      symlinks: { o: rootOnly },
      outputPaths: ["o/made/x"],
      platform: platform(),
    });
    assert.equal(modern.status?.code, Code.INVALID_ARGUMENT);
    assert.deepEqual(await readdir(rootOnly), []);
  });

  test("an output directory holding links to host files is returned with those links as symlink nodes, no host bytes", async () => {
    const farm = farmOf();
    const response = await run(farm, {
      args: ["sh", "-c", "mkdir -p out/sub && ln -s /etc/shadow out/s && ln -s /etc out/sub/e && echo mine > out/f"],
      symlinks: { "out/given": "/proc/self/environ" },
      outputDirectories: ["out"],
      platform: platform(),
    });
    assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
    const treeDigest = response.result?.outputDirectories[0]?.treeDigest;
    const read = await unaryCall(farm.clients.cas.batchReadBlobs.bind(farm.clients.cas), {
      instanceName: "",
      digests: treeDigest ? [treeDigest] : [],
      acceptableCompressors: [],
      digestFunction: 0,
    });
    const tree = Tree.decode(read.responses[0]?.data ?? Buffer.alloc(0));
    assert.deepEqual(
      tree.root?.symlinks.map((s) => [s.name, s.target]),
      [
        ["given", "/proc/self/environ"],
        ["s", "/etc/shadow"],
      ],
    );
    assert.deepEqual(
      tree.root?.files.map((f) => f.name),
      ["f"],
    );
    assert.deepEqual(
      tree.children.flatMap((c) => c.symlinks.map((s) => [s.name, s.target])),
      [["e", "/etc"]],
    );
    assert.deepEqual(
      tree.children.flatMap((c) => c.files),
      [],
    );
    assert.deepEqual(await held(farm, secretDigests), []);
  });

  test("absolute links into the input root come back as what they point to, relative links as links (REAPI 2.0 and 2.1)", async () => {
    const farm = farmOf();
    const script =
      "mkdir -p dir/sub && echo foo > dir/foo && echo deep > dir/sub/deep && ln -s foo dir/rel && ln -s $PWD/dir/foo dir/abs" +
      " && ln -s $PWD/dir/foo a && ln -s $PWD/dir ad && ln -s $PWD/a chain && ln -s dir/foo r && ln -s dir rd" +
      " && ln -s $PWD/missing dangling";
    const check = async (response: ExecuteResponse, legacy: boolean) => {
      assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
      const result = response.result;
      assert.equal(result?.exitCode, 0, await readBlob(farm.clients, result?.stderrDigest));
      const files = new Map(result?.outputFiles.map((f) => [f.path, f.digest]));
      assert.deepEqual([...files.keys()].sort(), ["a", "chain"]);
      assert.equal(await readBlob(farm.clients, files.get("a")), "foo\n");
      assert.equal(await readBlob(farm.clients, files.get("chain")), "foo\n");
      assert.deepEqual(
        result?.outputDirectories.map((d) => d.path),
        ["ad"],
      );
      const tree = await readTree(farm, result?.outputDirectories[0]?.treeDigest);
      // The directory's own relative link stays a link; its absolute one into the root becomes the file.
      assert.deepEqual(
        tree.root?.files.map((f) => f.name),
        ["abs", "foo"],
      );
      assert.deepEqual(
        tree.root?.symlinks.map((l) => [l.name, l.target]),
        [["rel", "foo"]],
      );
      assert.deepEqual(
        tree.root?.directories.map((d) => d.name),
        ["sub"],
      );
      const links = (result?.outputSymlinks ?? []).map((l) => [l.path, l.target]);
      const relative = [
        ["r", "dir/foo"],
        ["rd", "dir"],
      ];
      if (legacy) {
        assert.deepEqual(
          result?.outputFileSymlinks.map((l) => [l.path, l.target]),
          [relative[0], ["dangling", `${INPUT_SEEN}/missing`]],
        );
        assert.deepEqual(
          result?.outputDirectorySymlinks.map((l) => [l.path, l.target]),
          [relative[1]],
        );
      } else {
        assert.deepEqual(links, [...relative, ["dangling", `${INPUT_SEEN}/missing`]]);
      }
    };
    await check(
      await run(farm, {
        args: ["sh", "-c", `rmdir ad rd && ${script}`],
        outputFiles: ["a", "chain", "r", "dangling"],
        outputDirectories: ["ad", "rd"],
        platform: platform(),
      }),
      true,
    );
    await check(
      await run(farm, {
        args: ["sh", "-c", script],
        outputPaths: ["a", "chain", "ad", "r", "rd", "dangling"],
        platform: platform(),
      }),
      false,
    );
  });

  test("a working directory through an absolute link into the root runs where the link leads", async () => {
    const farm = farmOf();
    const response = await run(farm, {
      args: ["sh", "-c", "pwd; echo made > out"],
      files: { "sub/keep": "" },
      symlinks: { w: `${INPUT_SEEN}/sub` },
      workingDirectory: "w",
      outputFiles: ["out"],
      platform: platform(),
    });
    assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
    assert.equal(response.result?.exitCode, 0, await readBlob(farm.clients, response.result?.stderrDigest));
    assert.equal(await readBlob(farm.clients, response.result?.stdoutDigest), `${INPUT_SEEN}/sub\n`);
    assert.equal(await readBlob(farm.clients, response.result?.outputFiles[0]?.digest), "made\n");
  });

  test("absolute links to host files, above the root's mount point, or chains that end outside stay links: no host bytes", async () => {
    const farm = farmOf();
    const response = await run(farm, {
      args: [
        "sh",
        "-c",
        "ln -s /etc/shadow s1 && ln -s $PWD/../../../etc/shadow s2 && ln -s $PWD/s1 s3 && ln -s $PWD/s2 s4" +
          " && ln -s $PWD/../../../etc e1 && ln -s $PWD/./../execroot/../../../etc e2 && ln -s /proc/self/root/etc e3" +
          " && mkdir -p d && ln -s /etc/shadow d/h && ln -s $PWD/s1 d/via && ln -s $PWD/../../../etc d/up && ln -s $PWD/d d/self",
      ],
      outputPaths: ["s1", "s2", "s3", "s4", "e1", "e2", "e3", "d"],
      platform: platform(),
    });
    assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
    const result = response.result;
    assert.equal(result?.exitCode, 0, await readBlob(farm.clients, result?.stderrDigest));
    assert.deepEqual(result?.outputFiles, []);
    assert.deepEqual(
      result?.outputSymlinks.map((l) => l.path),
      ["s1", "s2", "s3", "s4", "e1", "e2", "e3"],
    );
    assert.equal(result?.outputSymlinks.find((l) => l.path === "s3")?.target, `${INPUT_SEEN}/s1`);
    const tree = await readTree(farm, result?.outputDirectories[0]?.treeDigest);
    assert.deepEqual(tree.root?.files, []);
    assert.deepEqual(tree.root?.directories, []);
    assert.deepEqual(
      tree.root?.symlinks.map((l) => l.name),
      ["h", "self", "up", "via"],
    );
    assert.deepEqual(await held(farm, secretDigests), [], "no host secret reached the CAS");
  });

  test("a symlink that stays inside the root still works, for outputs and for the parents made for them", async () => {
    const farm = farmOf();
    const response = await run(farm, {
      args: ["sh", "-c", "echo hi > y/f && echo made > n/deep/g && echo back > w/up/k && echo dot > here/h"],
      files: { "sub/keep": "", "w/keep": "" },
      symlinks: { y: "sub", n: "new", "w/up": "..", here: "." },
      outputFiles: ["y/f", "n/deep/g", "w/up/k", "here/h"],
      platform: platform(),
    });
    assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
    assert.equal(response.result?.exitCode, 0, await readBlob(farm.clients, response.result?.stderrDigest));
    const files = new Map(response.result?.outputFiles.map((f) => [f.path, f.digest]));
    assert.equal(await readBlob(farm.clients, files.get("y/f")), "hi\n");
    assert.equal(await readBlob(farm.clients, files.get("n/deep/g")), "made\n");
    assert.equal(await readBlob(farm.clients, files.get("w/up/k")), "back\n");
    assert.equal(await readBlob(farm.clients, files.get("here/h")), "dot\n");
  });
}

describe("outputs stay inside the action (host root)", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm({}, undefined, { workers: 1, runImages: false });
  });
  after(() => farm?.close());
  outputAttacks(
    () => farm,
    () => [],
  );
});

const isRoot = process.getuid?.() === 0;

for (const mode of ["mount", "expand"] as const) {
  describe(`outputs stay inside the action (container image, ${mode} mode)`, { skip: !isRoot && "needs root" }, () => {
    let farm: TestFarm;
    let registry: TestRegistry;
    let image: string;
    before(async () => {
      registry = await startRegistry();
      image = await registry.push(await busyboxImage(`contained outputs, ${mode}`), "team/busybox", "1");
      farm = await startTestFarm({ images: { mode } }, undefined, { workers: 1 });
    });
    after(async () => {
      await farm?.close();
      await registry?.stop();
    });
    outputAttacks(
      () => farm,
      () => [{ name: "container-image", value: `docker://${image}` }],
    );
  });
}
