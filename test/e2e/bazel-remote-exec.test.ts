import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { chmod, cp, mkdtemp, readdir, readFile, readlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { type ServerProcess, spawnBerth } from "../support/farm.js";
import {
  assertInstalled,
  assertNoRemoteWarnings,
  BAZEL,
  type CommandResult,
  describeRun,
  FIXTURES,
  nonInternalKinds,
  type ProcessSummary,
  processSummary,
  readExecutionLog,
  runBazel,
  type SpawnExec,
  startupOptions,
  stubOverrides,
  tearDownBazel,
} from "./bazel.js";

/**
 * Bazel 4.2.3 (Debian's bazel-bootstrap) with a spawned `berth serve` as its --remote_executor, and nothing
 * else: genrules, a directory output, a symlink output, a C binary compiled and linked with the host's gcc and
 * two sh_tests all run on Berth's local workers, inside its bubblewrap sandbox. After `bazel clean` everything
 * but the failing test comes back from Berth's action cache.
 */

const GCC = "/usr/bin/gcc";
/** The user Berth's sandbox runs actions as; Bazel itself runs as root here. */
const SANDBOX_UID = "65534";
const GREETING = "Hello from a binary compiled and linked by Berth\n";
/**
 * What fail_test.sh prints to its standard error. Bazel's test-setup.sh sends the test's stderr to its own
 * stdout (`exec 2>&1`), so this reaches test.log through the stdout of Berth's action result; //:noisy covers the
 * stderr stream.
 */
const FAIL_TEST_STDERR = "fail_test says this on stderr: failing on purpose";
const FAIL_TEST_EXIT_CODE = 3;
/** What the genrule //:noisy prints; Bazel passes an action's stdout to its own stdout, stderr to stderr. */
const NOISY_STDOUT = "noisy genrule says this on stdout";
const NOISY_STDERR = "noisy genrule says this on stderr";
/** `bazel test`'s exit code when the build succeeded but a test failed. */
const BAZEL_TESTS_FAILED = 3;

/** Files of bazel-bin and their contents (for a symlink: "-> TARGET"). */
const EXPECTED_OUTPUTS: Record<string, string> = {
  "upper.txt": "HELLO\n",
  "concat.txt": "HELLO\nworld\n",
  "uid.txt": `${SANDBOX_UID}\n`,
  "noisy.txt": "quiet\n",
  "tree.d/one.txt": "one\n",
  "tree.d/sub/two.txt": "two\n",
  "tree_contents.txt": "./one.txt\n./sub/two.txt\none\ntwo\n",
  "link.symlink": "-> tree.d/sub/two.txt",
};

/** The spawns `bazel build //...` runs, by mnemonic; the C++ rules' links (binary, .a and .so) vary by toolchain. */
const EXPECTED_BUILD_SPAWNS: Record<string, number | "some"> = {
  Genrule: 5,
  OutputDirectory: 1,
  OutputSymlink: 1,
  CppCompile: 2,
  CppLink: "some",
};

/** Options of every build and test; the executor's address is given on the command line. */
function bazelrc(stubs: string): string {
  const overrides = stubOverrides(stubs);
  return [
    // `test` and `clean` inherit the options of `build`; `query` does not.
    `build ${overrides}`,
    `query ${overrides}`,
    // ctx.actions.declare_symlink is experimental in Bazel 4.
    "build --experimental_allow_unresolved_symlinks",
    // The runner's PATH must not leak into the action keys.
    "build --incompatible_strict_action_env",
    "build --color=no --curses=no",
    "",
  ].join("\n");
}

function remoteOptions(berthAddress: string, executionLog: string, grpcLog: string): string[] {
  return [
    `--remote_executor=grpc://${berthAddress}`,
    // Every spawn runs remotely or the command fails: no local fallback, no sandboxed local execution.
    "--spawn_strategy=remote",
    `--execution_log_json_file=${executionLog}`,
    `--experimental_remote_grpc_log=${grpcLog}`,
  ];
}

async function runLocally(program: string): Promise<string> {
  const { stdout } = await promisify(execFile)(program, [], { timeout: 10_000 });
  return stdout;
}

async function readOutputs(workspace: string): Promise<Record<string, string>> {
  const outputs: Record<string, string> = {};
  for (const name of Object.keys(EXPECTED_OUTPUTS)) {
    const path = join(workspace, "bazel-bin", name);
    outputs[name] = name.endsWith(".symlink") ? `-> ${await readlink(path)}` : await readFile(path, "utf8");
  }
  return outputs;
}

/** The streams of //:noisy, taken from the action result, as Bazel shows them. */
function assertNoisyOutput(result: CommandResult): void {
  assert.match(result.stderr, new RegExp(`^INFO: From Executing genrule //:noisy:\n${NOISY_STDERR}$`, "m"));
  assert.match(result.stdout, new RegExp(`^${NOISY_STDOUT}$`, "m"), `Bazel's stdout:\n${result.stdout}`);
}

function spawnsByMnemonic(spawns: SpawnExec[]): Map<string, number> {
  const counts = new Map<string, number>();
  for (const spawn of spawns) counts.set(spawn.mnemonic, (counts.get(spawn.mnemonic) ?? 0) + 1);
  return counts;
}

function assertBuildSpawns(spawns: SpawnExec[]): void {
  const counts = spawnsByMnemonic(spawns);
  const described = JSON.stringify(Object.fromEntries(counts));
  assert.deepEqual([...counts.keys()].sort(), Object.keys(EXPECTED_BUILD_SPAWNS).sort(), described);
  for (const [mnemonic, expected] of Object.entries(EXPECTED_BUILD_SPAWNS)) {
    if (expected === "some") assert.ok((counts.get(mnemonic) ?? 0) > 0, described);
    else assert.equal(counts.get(mnemonic), expected, `${mnemonic} spawns: ${described}`);
  }
}

function describeSpawns(spawns: SpawnExec[]): string {
  return spawns
    .map((s) => `${s.mnemonic} [${s.runner}] exit ${s.exitCode ?? 0}: ${s.commandArgs.join(" ")}`)
    .join("\n");
}

/** The spawn that runs the test (test-setup.sh), or the one that writes its test.xml (generate-xml.sh). */
function testSpawn(spawns: SpawnExec[], test: string, kind: "run" | "xml"): SpawnExec {
  const script = kind === "run" ? "test-setup.sh" : "generate-xml.sh";
  const found = spawns.filter(
    (s) =>
      s.mnemonic === "TestRunner" &&
      s.commandArgs[0]?.endsWith(`/${script}`) &&
      s.commandArgs.some((arg) => arg === `./${test}` || arg.includes(`/testlogs/${test}/`)),
  );
  assert.equal(found.length, 1, `expected one ${script} spawn of ${test}:\n${describeSpawns(spawns)}`);
  return found[0] as SpawnExec;
}

describe("Bazel 4.2.3 with Berth as its remote executor", { timeout: 300_000 }, () => {
  let root = "";
  let workspace = "";
  let rcFile = "";
  let berth: ServerProcess | undefined;
  let logs = 0;
  let coldBuild: { remoteSpawns: number; outputs: Record<string, string> } | undefined;

  const startup = () => startupOptions(root, rcFile);

  /** Runs a remote `bazel COMMAND ARGS…`; returns its result, process summary, spawns and gRPC log. */
  const remote = async (command: string, args: string[]) => {
    assert.ok(berth, "berth is not running");
    const n = ++logs;
    const executionLog = join(root, `execution-${n}.json`);
    const grpcLog = join(root, `grpc-${n}.log`);
    const full = [...startup(), command, ...remoteOptions(berth.address, executionLog, grpcLog), ...args];
    const result = await runBazel(workspace, full);
    const report = describeRun(full, result);
    const spawns = existsSync(executionLog) ? await readExecutionLog(executionLog) : [];
    const grpc = existsSync(grpcLog) ? await readFile(grpcLog) : Buffer.alloc(0);
    return { result, report, spawns, grpc, summary: () => processSummary(result.stderr) };
  };

  const assertOnly = (summary: ProcessSummary, kind: string, report: string) => {
    assert.deepEqual(nonInternalKinds(summary), [kind], `expected only "${kind}" besides internal: ${report}`);
  };

  const testLog = (test: string) => readFile(join(workspace, "bazel-testlogs", test, "test.log"), "utf8");

  before(async () => {
    assertInstalled(BAZEL);
    assertInstalled(GCC);
    root = await mkdtemp(join(tmpdir(), "berth-bazel-rex-"));
    // mkdtemp makes the directory private to its owner, root, but Berth's sandbox runs as nobody and fails to
    // set up (bwrap: "Can't find source path …/root: Permission denied") unless every directory above the data
    // directory lets others through.
    await chmod(root, 0o755);
    workspace = join(root, "workspace");
    const stubs = join(root, "stubs");
    await cp(join(FIXTURES, "bazel-remote-exec"), workspace, { recursive: true });
    await cp(join(FIXTURES, "bazel-stubs"), stubs, { recursive: true });
    // Bazel sends a test's script with the executable bit of the file, whatever git checked out.
    for (const name of await readdir(workspace)) {
      if (name.endsWith(".sh")) await chmod(join(workspace, name), 0o755);
    }
    rcFile = join(root, "remote-exec.bazelrc");
    await writeFile(rcFile, bazelrc(stubs));
    berth = await spawnBerth(["--data-dir", join(root, "data"), "--workers", "2"]);
  });

  after(() => tearDownBazel(root, workspace, root === "" ? [] : startup(), [() => berth?.stop()]));

  it("builds every target remotely, in Berth's sandbox, with correct outputs", async () => {
    const { result, report, spawns, grpc, summary } = await remote("build", ["//..."]);
    assert.equal(result.code, 0, report);
    assertNoRemoteWarnings(result.stderr);
    const { line, counts } = summary();
    console.log(`remote build: ${line}`);
    assertNoisyOutput(result);
    assertOnly({ line, counts }, "remote", report);

    // Every spawn Bazel did not run in its own process went to Berth, and ran there: none came from a cache.
    assertBuildSpawns(spawns);
    assert.deepEqual(
      spawns.filter((s) => s.runner !== "remote" || s.remoteCacheHit === true),
      [],
      describeSpawns(spawns),
    );
    assert.equal(counts.get("remote"), spawns.length, `${line}\n${describeSpawns(spawns)}`);
    assert.ok(grpc.includes("build.bazel.remote.execution.v2.Execution/Execute"), "no Execute in Bazel's gRPC log");

    const outputs = await readOutputs(workspace);
    assert.deepEqual(outputs, EXPECTED_OUTPUTS);
    assert.equal(await runLocally(join(workspace, "bazel-bin", "hello", "hello")), GREETING);
    coldBuild = { remoteSpawns: spawns.length, outputs };
  });

  it("runs the sh_tests remotely: one passes, the failing one's remote stderr is in its test.log", async () => {
    const { result, report, spawns, summary } = await remote("test", ["//:pass_test", "//:fail_test"]);
    assert.equal(result.code, BAZEL_TESTS_FAILED, report);
    assertNoRemoteWarnings(result.stderr);
    const { line, counts } = summary();
    console.log(`remote test: ${line}`);
    assertOnly({ line, counts }, "remote", report);

    const output = result.stdout + result.stderr;
    assert.match(output, /^\/\/:pass_test +PASSED in /m, report);
    assert.match(output, /^\/\/:fail_test +FAILED in /m, report);

    const pass = testSpawn(spawns, "pass_test", "run");
    const fail = testSpawn(spawns, "fail_test", "run");
    assert.equal(pass.runner, "remote", describeSpawns(spawns));
    assert.equal(pass.exitCode ?? 0, 0, describeSpawns(spawns));
    assert.equal(fail.runner, "remote", describeSpawns(spawns));
    assert.equal(fail.exitCode, FAIL_TEST_EXIT_CODE, describeSpawns(spawns));
    assert.equal(spawns.length, 4, describeSpawns(spawns));
    assert.deepEqual(
      spawns.filter((s) => s.runner !== "remote"),
      [],
      describeSpawns(spawns),
    );
    assert.equal(counts.get("remote"), spawns.length, line);

    assert.match(await testLog("pass_test"), new RegExp(`^pass_test ran as uid ${SANDBOX_UID}$`, "m"));
    const failLog = await testLog("fail_test");
    assert.ok(failLog.includes(FAIL_TEST_STDERR), `fail_test's test.log lacks its stderr:\n${failLog}`);
    assert.ok(failLog.includes("fail_test says this on stdout"), `fail_test's test.log lacks its stdout:\n${failLog}`);
  });

  it("after bazel clean, takes every action from Berth's cache except the failing test", async () => {
    assert.ok(coldBuild, "the remote build did not complete");
    const clean = [...startup(), "clean"];
    const cleaned = await runBazel(workspace, clean);
    assert.equal(cleaned.code, 0, describeRun(clean, cleaned));

    const build = await remote("build", ["//..."]);
    assert.equal(build.result.code, 0, build.report);
    assertNoRemoteWarnings(build.result.stderr);
    const buildSummary = build.summary();
    console.log(`build after clean: ${buildSummary.line}`);
    assertOnly(buildSummary, "remote cache hit", build.report);
    assert.equal(buildSummary.counts.get("remote cache hit"), coldBuild.remoteSpawns, buildSummary.line);
    assertBuildSpawns(build.spawns);
    assert.deepEqual(
      build.spawns.filter((s) => s.runner !== "remote cache hit"),
      [],
      describeSpawns(build.spawns),
    );
    assert.ok(build.grpc.includes("ActionCache/GetActionResult"), "no GetActionResult in Bazel's gRPC log");
    assert.ok(!build.grpc.includes("Execution/Execute"), "a cache hit should not call Execute");
    assertNoisyOutput(build.result);
    assert.deepEqual(await readOutputs(workspace), coldBuild.outputs);
    assert.equal(await runLocally(join(workspace, "bazel-bin", "hello", "hello")), GREETING);

    const test = await remote("test", ["//:pass_test", "//:fail_test"]);
    assert.equal(test.result.code, BAZEL_TESTS_FAILED, test.report);
    assertNoRemoteWarnings(test.result.stderr);
    const testSummary = test.summary();
    console.log(`test after clean: ${testSummary.line}`);
    const output = test.result.stdout + test.result.stderr;
    assert.match(output, /^\/\/:pass_test +\(cached\) PASSED in /m, test.report);
    assert.match(output, /^\/\/:fail_test +FAILED in /m, test.report);

    // A failed action is not cached, so the failing test runs again; its test.xml is derived from the test's
    // log and its duration in whole seconds, so it is normally a cache hit but may run again too.
    const rerun = testSpawn(test.spawns, "fail_test", "run");
    assert.equal(rerun.runner, "remote", describeSpawns(test.spawns));
    assert.equal(rerun.exitCode, FAIL_TEST_EXIT_CODE, describeSpawns(test.spawns));
    const failXml = testSpawn(test.spawns, "fail_test", "xml");
    assert.ok(["remote", "remote cache hit"].includes(failXml.runner), describeSpawns(test.spawns));
    for (const spawn of [testSpawn(test.spawns, "pass_test", "run"), testSpawn(test.spawns, "pass_test", "xml")]) {
      assert.equal(spawn.runner, "remote cache hit", describeSpawns(test.spawns));
    }
    assert.equal(test.spawns.length, 4, describeSpawns(test.spawns));
    assert.deepEqual(nonInternalKinds(testSummary), ["remote", "remote cache hit"], testSummary.line);
    const rerunXml = failXml.runner === "remote" ? 1 : 0;
    assert.equal(testSummary.counts.get("remote"), 1 + rerunXml, testSummary.line);
    assert.equal(testSummary.counts.get("remote cache hit"), 3 - rerunXml, testSummary.line);

    const failLog = await testLog("fail_test");
    assert.ok(failLog.includes(FAIL_TEST_STDERR), `fail_test's test.log lacks its stderr:\n${failLog}`);
  });
});
