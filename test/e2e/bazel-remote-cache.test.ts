import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { type ServerProcess, spawnBerth } from "../support/farm.js";
import {
  assertNoRemoteWarnings,
  BAZEL,
  describeRun,
  processSummary,
  runBazel,
  startupOptions,
  tearDownBazel,
} from "./bazel.js";

/**
 * Bazel 4.2.3 (Debian's bazel-bootstrap) against a spawned `berth serve` as its --remote_cache: a cold build
 * uploads every action, and after `bazel clean` every action comes back as a remote cache hit, also after
 * Berth restarts on the same data directory.
 */

function buildOptions(berthAddress: string, grpcLog: string): string[] {
  return [
    `--remote_cache=grpc://${berthAddress}`,
    // The Debian rc turns on --sandbox_debug, whose chatter would end up in the cached stderr; sandboxing is
    // beside the point here and may be unavailable in CI containers.
    "--spawn_strategy=local",
    // The runner's PATH must not leak into the action keys.
    "--incompatible_strict_action_env",
    "--color=no",
    "--curses=no",
    // Lets the test see which RPCs carried the large blob.
    `--experimental_remote_grpc_log=${grpcLog}`,
  ];
}

// 65,536 lines of 16 bytes: exactly 1 MiB, and not all zeros so that a corrupted chunk would show.
const BIG_LINES = 65_536;
const BIG_CONTENT = Array.from({ length: BIG_LINES }, (_, i) => `${String(i).padStart(15, "0")}\n`).join("");
const BIG_SHA256 = createHash("sha256").update(BIG_CONTENT).digest("hex");

const BUILD_FILE = `
genrule(
    name = "upper",
    srcs = ["a.txt"],
    outs = ["upper.txt"],
    cmd = "tr a-z A-Z < $< > $@",
)

genrule(
    name = "concat",
    srcs = [":upper", "b.txt"],
    outs = ["concat.txt"],
    cmd = "cat $(location :upper) $(location b.txt) > $@",
)

genrule(
    name = "pair",
    srcs = ["b.txt"],
    outs = ["first.txt", "second.txt"],
    cmd = "echo first > $(location first.txt); rev < $(location b.txt) > $(location second.txt)",
)

genrule(
    name = "big",
    outs = ["big.bin"],
    cmd = "awk 'BEGIN { for (i = 0; i < ${BIG_LINES}; i++) printf \\"%015d\\\\n\\", i }' > $@",
)
`;

const GENRULE_COUNT = 4;

const EXPECTED_OUTPUTS: Record<string, string> = {
  "upper.txt": "HELLO\n",
  "concat.txt": "HELLO\nworld\n",
  "first.txt": "first\n",
  "second.txt": "dlrow\n",
  "big.bin": BIG_CONTENT,
};

async function writeWorkspace(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, "WORKSPACE"), 'workspace(name = "berth_e2e")\n');
  await writeFile(join(dir, "BUILD"), BUILD_FILE);
  await writeFile(join(dir, "a.txt"), "hello\n");
  await writeFile(join(dir, "b.txt"), "world\n");
}

async function readOutputs(workspace: string): Promise<Record<string, string>> {
  const outputs: Record<string, string> = {};
  for (const name of Object.keys(EXPECTED_OUTPUTS)) {
    outputs[name] = await readFile(join(workspace, "bazel-bin", name), "utf8");
  }
  return outputs;
}

function assertOutputsExpected(outputs: Record<string, string>): void {
  for (const [name, expected] of Object.entries(EXPECTED_OUTPUTS)) {
    const actual = outputs[name] ?? "";
    // Comparing the 1 MiB file by digest keeps a failure message readable.
    assert.equal(
      createHash("sha256").update(actual).digest("hex"),
      createHash("sha256").update(expected).digest("hex"),
      `${name} has ${actual.length} bytes starting ${JSON.stringify(actual.slice(0, 40))}`,
    );
  }
}

describe("Bazel 4.2.3 with Berth as its remote cache", { timeout: 300_000 }, () => {
  let root = "";
  let workspace = "";
  let dataDir = "";
  let berth: ServerProcess | undefined;
  let firstOutputs: Record<string, string> | undefined;
  let grpcLogs = 0;

  const bazel = (command: string, args: string[] = []) => {
    const full = [...startupOptions(root), command, ...args];
    return runBazel(workspace, full).then((result) => ({ args: full, result }));
  };

  /** `bazel build //...` against the running Berth; returns the summary and the gRPC log of the build. */
  const build = async () => {
    assert.ok(berth, "berth is not running");
    const grpcLog = join(root, `grpc-${++grpcLogs}.log`);
    const { args, result } = await bazel("build", [...buildOptions(berth.address, grpcLog), "//..."]);
    assert.equal(result.code, 0, describeRun(args, result));
    assertNoRemoteWarnings(result.stderr);
    return { summary: processSummary(result.stderr), grpcLog: await readFile(grpcLog) };
  };

  const clean = async () => {
    const { args, result } = await bazel("clean");
    assert.equal(result.code, 0, describeRun(args, result));
  };

  const assertAllRemoteCacheHits = (summary: { line: string; counts: Map<string, number> }) => {
    const kinds = [...summary.counts.keys()].filter((kind) => kind !== "internal");
    assert.deepEqual(kinds, ["remote cache hit"], `not every action came from the cache: ${summary.line}`);
    assert.equal(summary.counts.get("remote cache hit"), GENRULE_COUNT, summary.line);
  };

  before(async () => {
    assert.ok(
      existsSync(BAZEL),
      `Bazel is not installed at ${BAZEL}; run \`bash scripts/install.sh --test\` to install bazel-bootstrap`,
    );
    root = await mkdtemp(join(tmpdir(), "berth-bazel-e2e-"));
    workspace = join(root, "workspace");
    dataDir = join(root, "data");
    await writeWorkspace(workspace);
    berth = await spawnBerth(["--data-dir", dataDir]);
  });

  after(() => tearDownBazel(root, workspace, root === "" ? [] : startupOptions(root), [() => berth?.stop()]));

  it("builds every target locally and uploads the results, the 1 MiB output over ByteStream", async () => {
    const { summary, grpcLog } = await build();
    console.log(`cold build: ${summary.line}`);
    assert.deepEqual(
      [...summary.counts.keys()].filter((kind) => kind !== "internal"),
      ["local"],
      `a fresh cache should have no hits: ${summary.line}`,
    );
    assert.equal(summary.counts.get("local"), GENRULE_COUNT, summary.line);

    firstOutputs = await readOutputs(workspace);
    assertOutputsExpected(firstOutputs);

    // Bazel 4 uploads every blob with ByteStream.Write; the resource name is stored verbatim in its gRPC log.
    assert.ok(grpcLog.includes("google.bytestream.ByteStream/Write"), "no ByteStream.Write in Bazel's gRPC log");
    assert.ok(grpcLog.includes(`blobs/${BIG_SHA256}/${BIG_CONTENT.length}`), "the 1 MiB output was not uploaded");
    assert.ok(grpcLog.includes("ActionCache/UpdateActionResult"), "no action result was uploaded");
  });

  it("after bazel clean, takes every action from the cache with identical outputs", async () => {
    assert.ok(firstOutputs, "the cold build did not complete");
    await clean();
    const { summary, grpcLog } = await build();
    console.log(`warm build: ${summary.line}`);
    assertAllRemoteCacheHits(summary);
    assert.deepEqual(await readOutputs(workspace), firstOutputs);
    assert.ok(grpcLog.includes("google.bytestream.ByteStream/Read"), "no ByteStream.Read in Bazel's gRPC log");
    assert.ok(grpcLog.includes(`blobs/${BIG_SHA256}/${BIG_CONTENT.length}`), "the 1 MiB output was not downloaded");
  });

  it("after Berth restarts on the same data directory, still takes every action from the cache", async () => {
    assert.ok(firstOutputs, "the cold build did not complete");
    assert.ok(berth);
    const code = await berth.stop();
    berth = undefined;
    assert.equal(code, 0, "berth serve should exit cleanly on SIGTERM");
    berth = await spawnBerth(["--data-dir", dataDir]);

    await clean();
    const { summary } = await build();
    console.log(`build after restart: ${summary.line}`);
    assertAllRemoteCacheHits(summary);
    assert.deepEqual(await readOutputs(workspace), firstOutputs);
  });
});
