import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { type ActionSpec, execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { busyboxImage, startRegistry, type TestRegistry } from "../../test/support/registry.js";
import { dir, file } from "../../test/support/trees.js";
import { Code } from "../status/status.js";

/**
 * Bazel's remote-execution semantics for the input root: an action may create
 * files and directories in any directory of its input root (a genrule's
 * `cp $(location x) tmp.txt`), also in one whose unix_mode says it is not
 * writable, as Bazel's own remote worker makes every input directory
 * writable. The input files themselves, hard links to the worker's file
 * cache, stay read-only and unchanged whatever the action tries, and the next
 * action sees nothing of what one wrote.
 */

/** The input root both actions get: files in the root and below, and a directory whose unix_mode is 0555. */
const INPUTS = dir({
  "x.txt": file("x\n"),
  pkg: dir({ "y.txt": file("y\n"), sub: dir({ "z.txt": file("z\n", true) }) }),
  locked: dir({ "w.txt": file("w\n") }, 0o555),
  // Enough entries that the worker lays the tree out with asynchronous calls (input-root.ts, SYNC_LAYOUT_LIMIT).
  many: dir(Object.fromEntries(Array.from({ length: 80 }, (_, i) => [`f${i}`, file(`${i}\n`)]))),
});

/**
 * The input files' modes as the action sees them: a root worker's file cache gives its copies the owner's write
 * bit (root's: the action is another user), so that what the action copies from them is writable.
 */
const INPUT_MODES = process.getuid?.() === 0 ? "644 x.txt\n755 pkg/sub/z.txt" : "444 x.txt\n555 pkg/sub/z.txt";

/** Everything an action can try against its input files and directories, each line reporting what happened. */
const VANDAL = [
  "cp x.txt tmp.txt && cat tmp.txt >> out.txt && echo scratch in the root",
  "mkdir -p pkg/new/deeper && echo n > pkg/new/deeper/n && echo scratch below",
  "echo s > pkg/sub/scratch && echo scratch beside an input",
  "echo m > many/scratch && echo scratch in a large tree",
  // A copy of an input is the action's, writable as a copy of a source file is under Bazel: copied over, appended to.
  "cp pkg/sub/z.txt copy && cp x.txt copy && echo more >> copy && chmod 600 copy && echo copies belong to the action",
  "echo l > locked/scratch && mkdir locked/d && echo scratch in a 0555 directory",
  "echo spoiled > x.txt || echo write refused",
  "echo spoiled >> pkg/sub/z.txt || echo append refused",
  "chmod 666 pkg/y.txt || echo chmod refused",
  "touch -d 2000-01-01 x.txt || echo touch refused",
  "truncate -s 0 locked/w.txt || echo truncate refused",
  // Replacing a name is allowed (the directory is the action's); the cached copy behind it is not touched.
  "rm -f pkg/y.txt && echo replaced > pkg/y.txt && echo y replaced",
  "mv locked/w.txt moved.txt && echo w moved",
].join("; ");

/** What the next action finds: the inputs as they came, and none of the first action's files. */
const INSPECT = [
  "cat x.txt pkg/y.txt pkg/sub/z.txt locked/w.txt",
  "find . | grep -v '^./many/f' | sort",
  "stat -c '%a %n' x.txt pkg/sub/z.txt",
].join("; ");

function tests(farmOf: () => TestFarm, platform: () => { name: string; value: string }[]) {
  const run = async (spec: ActionSpec) => {
    const action = await uploadAction(farmOf().clients, { inputRoot: INPUTS, platform: platform(), ...spec });
    const { response } = await execute(farmOf().clients, action);
    assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
    const result = response.result;
    return {
      result,
      stdout: await readBlob(farmOf().clients, result?.stdoutDigest),
      stderr: await readBlob(farmOf().clients, result?.stderrDigest),
    };
  };

  test("an action writes scratch files anywhere in its input root; its inputs stay as they came; the next sees none of it", async () => {
    const salt = `${Math.random()}`;
    const vandal = await run({ args: ["sh", "-c", VANDAL], outputFiles: ["out.txt"], salt });
    assert.equal(
      vandal.stdout,
      [
        "scratch in the root",
        "scratch below",
        "scratch beside an input",
        "scratch in a large tree",
        "copies belong to the action",
        "scratch in a 0555 directory",
        "write refused",
        "append refused",
        "chmod refused",
        "touch refused",
        "truncate refused",
        "y replaced",
        "w moved",
        "",
      ].join("\n"),
      vandal.stderr,
    );
    assert.equal(await readBlob(farmOf().clients, vandal.result?.outputFiles[0]?.digest), "x\n");
    // The same inputs again, on the same worker (its file cache holds them): as they came.
    const next = await run({ args: ["sh", "-c", INSPECT], salt });
    assert.equal(
      next.stdout,
      "x\ny\nz\nw\n.\n./locked\n./locked/w.txt\n./many\n./pkg\n./pkg/sub\n./pkg/sub/z.txt\n./pkg/y.txt\n./x.txt\n" +
        `${INPUT_MODES}\n`,
      next.stderr,
    );
  });

  test("the command may reopen its own stdout and stderr by name, as shell scripts do (> /dev/stderr)", async () => {
    const logs = await run({
      args: [
        "sh",
        "-c",
        "echo out > /dev/stdout; echo err > /dev/stderr; echo fd >> /proc/self/fd/2; echo again >> /dev/stdout",
      ],
      salt: `${Math.random()}`,
    });
    assert.equal(logs.result?.exitCode, 0, logs.stderr);
    assert.equal(logs.stdout, "out\nagain\n");
    assert.equal(logs.stderr, "err\nfd\n");
  });
}

describe("scratch files in the input root (host root)", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm({}, undefined, { workers: 1, runImages: false });
  });
  after(() => farm?.close());
  tests(
    () => farm,
    () => [],
  );
});

const isRoot = process.getuid?.() === 0;

for (const mode of ["mount", "expand"] as const) {
  describe(`scratch files in the input root (container image, ${mode} mode)`, { skip: !isRoot && "needs root" }, () => {
    let farm: TestFarm;
    let registry: TestRegistry;
    let image: string;
    before(async () => {
      registry = await startRegistry();
      image = await registry.push(await busyboxImage(`scratch writes, ${mode}`), "team/busybox", "1");
      farm = await startTestFarm({ images: { mode } }, undefined, { workers: 1 });
    });
    after(async () => {
      await farm?.close();
      await registry?.stop();
    });
    tests(
      () => farm,
      () => [{ name: "container-image", value: `docker://${image}` }],
    );
  });
}
