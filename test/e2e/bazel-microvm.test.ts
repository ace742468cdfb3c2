import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { chmod, cp, mkdir, mkdtemp, readFile, writeFile } from "node:fs/promises";
import { homedir, release, tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { gzipSync } from "node:zlib";
import type { GuestAssets } from "../../src/vm/guest-assets.js";
import type { ServerProcess } from "../support/farm.js";
import { testGuestAssets } from "../support/guest.js";
import { MEDIA_TYPES, makeLayer } from "../support/layers.js";
import { busyboxImage, imageWithLayers, MARKER_PATH, startRegistry, type TestRegistry } from "../support/registry.js";
import {
  assertInstalled,
  assertNoRemoteWarnings,
  BAZEL,
  describeRun,
  FIXTURES,
  nonInternalKinds,
  processSummary,
  readExecutionLog,
  runBazel,
  type SpawnExec,
  spawnFarm,
  startupOptions,
  stubOverrides,
  tearDownBazel,
} from "./bazel.js";

/**
 * Bazel 4.2.3 (Debian's bazel-bootstrap) against a spawned `berth serve` whose worker runs microVMs (QEMU under
 * TCG, the guest of scripts/guest-assets.sh): a genrule and two sh_tests whose exec_properties ask for
 * workload-isolation-type=firecracker in an image from a loopback registry run, remotely, each in a VM booted on
 * that image. The genrule records the kernel it ran on; the passing sh_test checks, inside the VM, the guest's
 * kernel, the image's marker, its runfiles (a source file and the genrule's output), its TEST_TMPDIR, what shell
 * tests use (process substitution, /dev/stdout), and, as a hostile test would, that it cannot write its inputs;
 * the other sh_test expects the host's kernel and must fail, which shows the checks can fail. A farm without
 * VMs fails the same kind of genrule at once.
 *
 * What Bazel sends: runfiles as regular files (no symlinks in Bazel 4's input trees), which the guest sees
 * through the 9p share of the input root, as it sees TEST_TMPDIR (execroot/_tmp/…); the test runs as root in its
 * VM (Berth's default for microVM actions without unixUid).
 *
 * Bazel 4 runs a test as `test-setup.sh ./TEST` and writes its test.xml with a second spawn,
 * `generate-xml.sh`; both are `#!/bin/bash` scripts, as is the genrule's `/bin/bash -c`, so the image is busybox
 * with Debian's statically linked bash (bash-static) as /bin/bash.
 */

const BASH_STATIC = "/bin/bash-static";
const QEMU = "/usr/bin/qemu-system-x86_64";
/** What the image's /etc/berth-image-marker holds; the host has no such file. */
const IMAGE_MARKER = "berth e2e: the microVM's image";
/** The passing sh_test's last line, printed only once every check inside the VM held. */
const PASSED_LINE = "in_vm_test: every check held";
/** A source file the passing sh_test reads from its runfiles. */
const GREETING = "hello through the runfiles\n";
/** Bazel 4 runs a test with one spawn, and writes its test.xml with another (--experimental_split_xml_generation). */
const TEST_SCRIPTS = ["generate-xml.sh", "test-setup.sh"];
/** Bazel's exit code for a remote execution failure (ExitCode.REMOTE_ERROR). */
const BAZEL_REMOTE_ERROR = 34;
/** `bazel test`'s exit code when the build succeeded but a test failed. */
const BAZEL_TESTS_FAILED = 3;

function bazelrc(stubs: string): string {
  const overrides = stubOverrides(stubs);
  return [
    `build ${overrides}`,
    // The runner's PATH must not reach the actions (it would also change their keys); this one has /bin.
    "build --incompatible_strict_action_env",
    "build --color=no --curses=no",
    "test --test_output=errors",
    "",
  ].join("\n");
}

/** busybox (with the marker) and bash-static as /bin/bash, in a second layer. */
async function bashImage(): Promise<Awaited<ReturnType<typeof busyboxImage>>> {
  const tar = await makeLayer([
    { name: "bin/", type: "directory" },
    { name: "bin/bash", content: await readFile(BASH_STATIC), mode: 0o755 },
  ]);
  const diffId = `sha256:${createHash("sha256").update(tar).digest("hex")}`;
  return imageWithLayers(await busyboxImage(IMAGE_MARKER), "bash-static", [
    { blob: gzipSync(tar), diffId, mediaType: MEDIA_TYPES.gzip },
  ]);
}

/** The shell of a test that expects the kernel `expected`, and, when `thorough`, checks the rest of its world. */
function testScript(name: string, expected: string, thorough: boolean): string {
  const lines = [
    "#!/bin/bash",
    "set -euo pipefail",
    `echo "${name} runs on kernel $(uname -r)"`,
    `[[ "$(uname -r)" == "${expected}" ]] || { echo "${name}: expected kernel ${expected}" >&2; exit 1; }`,
  ];
  if (thorough) {
    lines.push(
      // Only the image has its marker.
      `[[ "$(cat /${MARKER_PATH})" == "${IMAGE_MARKER}" ]] || { echo "no image marker" >&2; exit 1; }`,
      // The runfiles: a source file, and the genrule's output, made in another VM.
      'runfiles="$TEST_SRCDIR/$TEST_WORKSPACE"',
      `[[ "$(cat "$runfiles/greeting.txt")" == "${GREETING.trim()}" ]] || { echo "bad greeting.txt" >&2; exit 1; }`,
      `[[ "$(cat "$runfiles/kernel.txt")" == "${expected}" ]] || { echo "bad kernel.txt" >&2; exit 1; }`,
      // A writable temporary directory of its own.
      'echo scratch > "$TEST_TMPDIR/scratch.txt"',
      '[[ "$(cat "$TEST_TMPDIR/scratch.txt")" == scratch ]]',
      // What shell tests do: process substitution (bash opens /dev/fd/N) and writing to /dev/stdout.
      'diff <(echo same) <(echo same) || { echo "process substitution failed" >&2; exit 1; }',
      '[[ "$(echo out > /dev/stdout)" == out ]] || { echo "no /dev/stdout" >&2; exit 1; }',
      // A hostile test, root in its VM: its inputs are the worker's cached files, shared by 9p; none is writable.
      `if { echo poisoned > "$runfiles/greeting.txt"; } 2>/dev/null; then echo "wrote to an input" >&2; exit 1; fi`,
      `[[ "$(cat "$runfiles/greeting.txt")" == "${GREETING.trim()}" ]] || { echo "an input changed" >&2; exit 1; }`,
      `echo "${PASSED_LINE}"`,
    );
  }
  return `${lines.join("\n")}\n`;
}

function describeSpawns(spawns: SpawnExec[]): string {
  return spawns
    .map((s) => `${s.mnemonic} [${s.runner}] exit ${s.exitCode ?? 0}: ${s.commandArgs.join(" ")}`)
    .join("\n");
}

/** The scripts of the spawns of `test`: the one that runs it (test-setup.sh), the one that writes its test.xml. */
function testScripts(spawns: SpawnExec[], test: string): string[] {
  return spawns
    .filter(
      (s) =>
        s.mnemonic === "TestRunner" &&
        s.commandArgs.some((arg) => arg === `./${test}` || arg.includes(`/testlogs/${test}/`)),
    )
    .map((s) => s.commandArgs[0]?.split("/").at(-1) ?? "")
    .sort();
}

/**
 * `berth serve` with one local worker, once that worker has joined: until then the farm knows no worker's
 * platform and refuses a microVM action (as any other) as unsatisfiable. `log` collects its log's lines.
 */
describe("Bazel 4.2.3 running a genrule and sh_tests in microVMs on Berth", { timeout: 600_000 }, () => {
  let root = "";
  let workspace = "";
  let rcFile = "";
  let registry: TestRegistry | undefined;
  let berth: ServerProcess | undefined;
  let assets: GuestAssets;
  let image = "";
  let logs = 0;
  const berthLog: string[] = [];

  const startup = () => startupOptions(root, rcFile);

  /** A remote `bazel COMMAND ARGS…`: every spawn on Berth (`farm`, by default the one with VMs), or it fails. */
  const remote = async (command: string, args: string[], farm = berth) => {
    assert.ok(farm, "berth is not running");
    const executionLog = join(root, `execution-${++logs}.json`);
    const full = [
      ...startup(),
      command,
      `--remote_executor=grpc://${farm.address}`,
      "--spawn_strategy=remote",
      `--execution_log_json_file=${executionLog}`,
      ...args,
    ];
    const result = await runBazel(workspace, full, 300_000);
    const report = describeRun(full, result);
    const spawns = existsSync(executionLog) ? await readExecutionLog(executionLog) : [];
    const summary = result.stderr.split("\n").filter((line) => / process(es)?: /.test(line));
    console.log(`bazel ${command} ${args.join(" ")}: ${summary.at(-1)}\n${describeSpawns(spawns)}`);
    return { result, report: `${report}\n--- spawns ---\n${describeSpawns(spawns)}`, spawns };
  };

  /** Each spawn ran on Berth (no cache hit) and asked for a microVM in the test image. */
  const assertRanInVms = (spawns: SpawnExec[], report: string) => {
    assert.ok(spawns.length > 0, report);
    for (const spawn of spawns) {
      assert.equal(spawn.runner, "remote", report);
      assert.equal(spawn.remoteCacheHit ?? false, false, report);
      const properties = Object.fromEntries((spawn.platform?.properties ?? []).map((p) => [p.name, p.value]));
      assert.deepEqual(
        properties,
        { "container-image": `docker://${image}`, "workload-isolation-type": "firecracker" },
        `${spawn.mnemonic} ${spawn.commandArgs.join(" ")}: ${report}`,
      );
    }
  };

  before(async () => {
    for (const program of [BAZEL, QEMU, BASH_STATIC, "/usr/bin/docker-registry", "/usr/bin/umoci", "/bin/busybox"]) {
      assertInstalled(program);
    }
    assets = await testGuestAssets();
    assert.notEqual(assets.kernelRelease, release(), "the guest's kernel must differ from the host's");
    root = await mkdtemp(join(tmpdir(), "berth-bazel-microvm-"));
    // Berth's data directory must be reachable by the slots' users; mkdtemp makes the directory private to root.
    await chmod(root, 0o755);
    registry = await startRegistry();
    image = await registry.push(await bashImage(), "team/bash", "vm");

    const vm = `{"workload-isolation-type": "firecracker", "container-image": "docker://${image}"}`;
    workspace = join(root, "workspace");
    await mkdir(workspace);
    await writeFile(join(workspace, "WORKSPACE"), 'workspace(name = "berth_microvm")\n');
    await writeFile(
      join(workspace, "BUILD"),
      [
        `VM = ${vm}`,
        "",
        "genrule(",
        '    name = "kernel",',
        '    outs = ["kernel.txt"],',
        '    cmd = "uname -r > $@",',
        "    exec_properties = VM,",
        ")",
        "",
        "sh_test(",
        '    name = "in_vm_test",',
        '    srcs = ["in_vm_test.sh"],',
        '    data = [":kernel", "greeting.txt"],',
        "    exec_properties = VM,",
        ")",
        "",
        "sh_test(",
        '    name = "host_kernel_test",',
        '    srcs = ["host_kernel_test.sh"],',
        "    exec_properties = VM,",
        ")",
        "",
        "# Built only against a farm without VMs.",
        "genrule(",
        '    name = "refused",',
        '    outs = ["refused.txt"],',
        '    cmd = "uname -r > $@",',
        "    exec_properties = VM,",
        ")",
        "",
      ].join("\n"),
    );
    await writeFile(join(workspace, "greeting.txt"), GREETING);
    await writeFile(join(workspace, "in_vm_test.sh"), testScript("in_vm_test", assets.kernelRelease, true), {
      mode: 0o755,
    });
    await writeFile(join(workspace, "host_kernel_test.sh"), testScript("host_kernel_test", release(), false), {
      mode: 0o755,
    });
    const stubs = join(root, "stubs");
    await cp(join(FIXTURES, "bazel-stubs"), stubs, { recursive: true });
    rcFile = join(root, "microvm.bazelrc");
    await writeFile(rcFile, bazelrc(stubs));

    const config = join(root, "berth.json");
    const guestDir = process.env.BERTH_VM_DIR ?? join(homedir(), ".cache", "berth", "vm");
    await writeFile(config, JSON.stringify({ worker: { vm: { dir: guestDir, accelerator: "tcg" } } }));
    berth = await spawnFarm(["--data-dir", join(root, "data"), "--config", config], berthLog);
    assert.ok(
      berthLog.some((line) =>
        line.includes(`microVMs on this worker: QEMU under tcg, guest kernel ${assets.kernelRelease}`),
      ),
      `the worker runs no VMs:\n${berthLog.join("\n")}`,
    );
  });

  after(() =>
    tearDownBazel(root, workspace, root === "" ? [] : startup(), [() => berth?.stop(), () => registry?.stop()]),
  );

  test("a genrule with exec_properties firecracker runs remotely in a VM on the guest's kernel", async () => {
    const { result, report, spawns } = await remote("build", ["//:kernel"]);
    assert.equal(result.code, 0, report);
    assertNoRemoteWarnings(result.stderr);
    const summary = processSummary(result.stderr);
    assert.deepEqual(nonInternalKinds(summary), ["remote"], `${summary.line}\n${report}`);
    assert.equal(summary.counts.get("remote"), 1, `${summary.line}\n${report}`);
    assert.deepEqual(
      spawns.map((s) => s.mnemonic),
      ["Genrule"],
      report,
    );
    assertRanInVms(spawns, report);
    const kernel = await readFile(join(workspace, "bazel-bin", "kernel.txt"), "utf8");
    assert.equal(kernel, `${assets.kernelRelease}\n`);
    assert.notEqual(kernel.trim(), release());
  });

  test("an sh_test runs remotely in a VM on its image, with its runfiles and TEST_TMPDIR, and passes", async () => {
    assert.equal(existsSync(`/${MARKER_PATH}`), false, `the host must not have /${MARKER_PATH}`);
    const { result, report, spawns } = await remote("test", ["//:in_vm_test"]);
    assert.equal(result.code, 0, report);
    assertNoRemoteWarnings(result.stderr);
    assert.match(result.stdout + result.stderr, /^\/\/:in_vm_test +PASSED in /m, report);
    const summary = processSummary(result.stderr);
    assert.deepEqual(nonInternalKinds(summary), ["remote"], report);
    // The genrule's output is in Bazel's output tree from the first test; the test and its XML ran in VMs.
    assert.equal(summary.counts.get("remote"), 2, report);
    assert.deepEqual(testScripts(spawns, "in_vm_test"), TEST_SCRIPTS, report);
    assertRanInVms(spawns, report);
    const log = await readFile(join(workspace, "bazel-testlogs", "in_vm_test", "test.log"), "utf8");
    assert.match(log, new RegExp(`^in_vm_test runs on kernel ${assets.kernelRelease.replace(/\./g, "\\.")}$`, "m"));
    assert.match(log, new RegExp(`^${PASSED_LINE}$`, "m"), log);
  });

  test("an sh_test expecting the host's kernel fails in the VM: the checks are real", async () => {
    const { result, report, spawns } = await remote("test", ["//:host_kernel_test"]);
    assert.equal(result.code, BAZEL_TESTS_FAILED, report);
    assertNoRemoteWarnings(result.stderr);
    assert.match(result.stdout + result.stderr, /^\/\/:host_kernel_test +FAILED in /m, report);
    assert.deepEqual(testScripts(spawns, "host_kernel_test"), TEST_SCRIPTS, report);
    assertRanInVms(spawns, report);
    const run = spawns.find((s) => s.commandArgs[0]?.endsWith("/test-setup.sh"));
    assert.equal(run?.exitCode, 1, report);
    const log = await readFile(join(workspace, "bazel-testlogs", "host_kernel_test", "test.log"), "utf8");
    assert.ok(log.includes(`host_kernel_test: expected kernel ${release()}`), log);
    assert.ok(log.includes(`host_kernel_test runs on kernel ${assets.kernelRelease}`), log);
  });

  test("a farm whose worker runs no VMs fails the build at once with FAILED_PRECONDITION naming the property", async () => {
    // The same Bazel server and image, another farm: a plain `berth serve`, whose worker offers no microVMs.
    const plainLog: string[] = [];
    const plainData = join(root, "plain-data");
    const plain = await spawnFarm(["--data-dir", plainData], plainLog);
    try {
      // Its guest would be in <dataDir>/vm, which has none, whatever the default data directory holds.
      const noGuest = `no microVMs on this worker: no guest in ${join(plainData, "vm")} `;
      assert.ok(
        plainLog.some((line) => line.includes(noGuest)),
        `the plain farm's worker does not say "${noGuest}":\n${plainLog.join("\n")}`,
      );
      const started = performance.now();
      const { result, report, spawns } = await remote("build", ["//:refused"], plain);
      assert.equal(result.code, BAZEL_REMOTE_ERROR, report);
      assert.match(
        result.stderr,
        /^ERROR: .*\/BUILD:\d+:\d+: Executing genrule \/\/:refused failed: \(Exit 34\): Remote Execution Failure:$/m,
        report,
      );
      assert.match(
        result.stderr,
        /^Failed Precondition: no worker of this farm runs microVMs .*workload-isolation-type/m,
        report,
      );
      assert.match(
        result.stderr,
        /^ +\(UNSATISFIABLE_PLATFORM\) workload-isolation-type: no worker runs microVMs/m,
        report,
      );
      // Nothing ran: no remote process.
      assert.deepEqual(nonInternalKinds(processSummary(result.stderr)), [], report);
      assert.equal(spawns.find((s) => s.mnemonic === "Genrule")?.status, "EXECUTION_FAILED", report);
      assert.equal(existsSync(join(workspace, "bazel-bin", "refused.txt")), false);
      // Refused, not queued: the whole command (Bazel's analysis included) takes seconds.
      assert.ok(performance.now() - started < 60_000, "refused at once");
    } finally {
      await plain.stop();
    }
  });
});
