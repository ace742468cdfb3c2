import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { chmod, cp, mkdir, mkdtemp, readFile, writeFile } from "node:fs/promises";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { GuestAssets } from "../../src/vm/guest-assets.js";
import { DOCKER_IMAGE_MARKER, dockerImage } from "../support/docker-image.js";
import type { ServerProcess } from "../support/farm.js";
import { testGuestAssets } from "../support/guest.js";
import { busyboxImage, startRegistry, type TestRegistry } from "../support/registry.js";
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
 * The example of issue 16 with Bazel 4.2.3 (Debian's bazel-bootstrap) against a spawned `berth serve` whose
 * worker runs microVMs (QEMU under TCG): an sh_test whose script runs `docker run --rm IMAGE echo PASS`, with
 * exec_properties workload-isolation-type=firecracker, init-dockerd=true and recycle-runner=true, in a Debian
 * image with docker.io (test/support/docker-image.ts) from a loopback registry; IMAGE is a small busybox image
 * in the same registry, pulled by the daemon inside the VM through the worker's forwards.
 *
 * The test runs twice, the second time with a changed data file (a new action, no cache hit). The script says,
 * before its `docker run`, whether the marker a previous run leaves in the VM's /tmp is there, whether IMAGE is
 * already in the daemon's images, and the daemon's pid; then it leaves the marker. The first run finds neither
 * marker nor image; the second finds the first's marker, the image, and the same daemon: the warm VM, its
 * running dockerd and its pulled image were reused. Both runs' wall times are printed; the second must be the
 * shorter (no boot, no daemon start, no pull), which is the only timing asserted.
 *
 * Bazel 4 runs a test with one spawn (test-setup.sh) and writes its test.xml with another (generate-xml.sh);
 * both carry the test's exec_properties, so both run in the Docker VM (the second one recycled). The image has
 * bash, as Bazel's scripts need. Snapshots are off: the first VM is a cold boot.
 */

const QEMU = "/usr/bin/qemu-system-x86_64";
/** What the small image's /etc/berth-image-marker holds: only a container of it can print this. */
const SMALL_MARKER = "berth e2e: the container pulled inside the VM";
/** Where the test leaves its marker, inside the VM (not in its workspace, which is emptied between actions). */
const VM_MARKER = "/tmp/berth-docker-marker";
const TEST = "docker_test";

function bazelrc(stubs: string): string {
  const overrides = stubOverrides(stubs);
  return [
    `build ${overrides}`,
    // The runner's PATH must not reach the actions (it would also change their keys); this one has /usr/bin.
    "build --incompatible_strict_action_env",
    "build --color=no --curses=no",
    // A cold Docker VM under TCG (boot, daemon start, pull) takes about a minute before the test's first line.
    "build --remote_timeout=600",
    "test --test_output=all",
    "",
  ].join("\n");
}

/** The sh_test: where it runs, what the VM kept from an earlier run, then `docker run` and the marker. */
function testScript(small: string): string {
  return `${[
    "#!/bin/bash",
    "set -euo pipefail",
    'runfiles="$TEST_SRCDIR/$TEST_WORKSPACE"',
    'echo "input: $(cat "$runfiles/input.txt")"',
    'echo "kernel: $(uname -r)"',
    'echo "image: $(cat /etc/berth-image-marker)"',
    `if [[ -e ${VM_MARKER} ]]; then echo "marker: $(cat ${VM_MARKER})"; else echo "marker: none"; fi`,
    `if docker image inspect ${small} >/dev/null 2>&1; then echo "pulled before: yes"; else echo "pulled before: no"; fi`,
    'echo "dockerd pid: $(cat /var/run/docker.pid)"',
    `out="$(docker run --rm ${small} echo PASS)"`,
    'echo "docker run: $out"',
    '[[ "$out" == PASS ]] || { echo "docker run printed $out, not PASS" >&2; exit 1; }',
    `echo "in the container: $(docker run --rm ${small} cat /etc/berth-image-marker)"`,
    `echo "left by the run of input $(cat "$runfiles/input.txt")" >${VM_MARKER}`,
    "",
  ].join("\n")}`;
}

function describeSpawns(spawns: SpawnExec[]): string {
  return spawns
    .map((s) => `${s.mnemonic} [${s.runner}] exit ${s.exitCode ?? 0}: ${s.commandArgs.join(" ")}`)
    .join("\n");
}

/** The line `name: value` of a test log, or undefined. */
function said(log: string, name: string): string | undefined {
  const prefix = `${name}: `;
  return log
    .split("\n")
    .find((line) => line.startsWith(prefix))
    ?.slice(prefix.length);
}

describe("Bazel 4.2.3 running an sh_test that uses Docker in a recycled microVM on Berth", { timeout: 900_000 }, () => {
  let root = "";
  let workspace = "";
  let rcFile = "";
  let registry: TestRegistry | undefined;
  let berth: ServerProcess | undefined;
  let assets: GuestAssets;
  let image = "";
  let small = "";
  let logs = 0;
  const berthLog: string[] = [];
  const properties: Record<string, string> = {};

  const startup = () => startupOptions(root, rcFile);

  /** A remote `bazel test` of the sh_test: every spawn on Berth, or it fails. Also its wall time. */
  const remoteTest = async () => {
    assert.ok(berth, "berth is not running");
    const executionLog = join(root, `execution-${++logs}.json`);
    const full = [
      ...startup(),
      "test",
      `--remote_executor=grpc://${berth.address}`,
      "--spawn_strategy=remote",
      `--execution_log_json_file=${executionLog}`,
      `//:${TEST}`,
    ];
    const started = performance.now();
    const result = await runBazel(workspace, full, 600_000);
    const wallMs = performance.now() - started;
    const spawns = existsSync(executionLog) ? await readExecutionLog(executionLog) : [];
    const report = `${describeRun(full, result)}\n--- spawns ---\n${describeSpawns(spawns)}\n--- berth ---\n${berthLog.slice(-40).join("\n")}`;
    console.log(`bazel test //:${TEST} (run ${logs}): ${(wallMs / 1000).toFixed(1)} s\n${describeSpawns(spawns)}`);
    return { result, report, spawns, wallMs };
  };

  /** The run passed, both its spawns (the test, its XML) ran on Berth in the Docker VM the platform asks for. */
  const assertPassedRemotely = (run: Awaited<ReturnType<typeof remoteTest>>) => {
    const { result, report, spawns } = run;
    assert.equal(result.code, 0, report);
    assertNoRemoteWarnings(result.stderr);
    assert.match(result.stdout + result.stderr, new RegExp(`^//:${TEST} +PASSED in `, "m"), report);
    const summary = processSummary(result.stderr);
    assert.deepEqual(nonInternalKinds(summary), ["remote"], `${summary.line}\n${report}`);
    assert.equal(summary.counts.get("remote"), 2, `${summary.line}\n${report}`);
    assert.deepEqual(
      spawns.map((s) => s.commandArgs[0]?.split("/").at(-1)).sort(),
      ["generate-xml.sh", "test-setup.sh"],
      report,
    );
    for (const spawn of spawns) {
      assert.equal(spawn.runner, "remote", report);
      assert.equal(spawn.remoteCacheHit ?? false, false, report);
      const sent = Object.fromEntries((spawn.platform?.properties ?? []).map((p) => [p.name, p.value]));
      assert.deepEqual(sent, properties, report);
    }
  };

  before(async () => {
    for (const program of [BAZEL, QEMU, "/usr/bin/docker-registry", "/usr/bin/umoci", "/bin/busybox"]) {
      assertInstalled(program);
    }
    assets = await testGuestAssets();
    root = await mkdtemp(join(tmpdir(), "berth-bazel-docker-"));
    // Berth's data directory must be reachable by the slots' users; mkdtemp makes the directory private to root.
    await chmod(root, 0o755);
    registry = await startRegistry();
    image = await registry.push(await dockerImage(), "team/docker", "bazel");
    small = await registry.push(await busyboxImage(SMALL_MARKER), "team/small", "v1");
    Object.assign(properties, {
      "container-image": `docker://${image}`,
      "workload-isolation-type": "firecracker",
      "init-dockerd": "true",
      "recycle-runner": "true",
      EstimatedMemory: "1GB",
    });

    workspace = join(root, "workspace");
    await mkdir(workspace);
    await writeFile(join(workspace, "WORKSPACE"), 'workspace(name = "berth_docker")\n');
    await writeFile(
      join(workspace, "BUILD"),
      [
        "sh_test(",
        `    name = "${TEST}",`,
        `    srcs = ["${TEST}.sh"],`,
        '    data = ["input.txt"],',
        // A cold Docker VM under TCG takes about a minute; small's 60 s is the command's alone, but tight.
        '    timeout = "moderate",',
        `    exec_properties = ${JSON.stringify(properties)},`,
        ")",
        "",
      ].join("\n"),
    );
    await writeFile(join(workspace, "input.txt"), "one\n");
    await writeFile(join(workspace, `${TEST}.sh`), testScript(small), { mode: 0o755 });
    const stubs = join(root, "stubs");
    await cp(join(FIXTURES, "bazel-stubs"), stubs, { recursive: true });
    rcFile = join(root, "docker.bazelrc");
    await writeFile(rcFile, bazelrc(stubs));

    const config = join(root, "berth.json");
    const guestDir = process.env.BERTH_VM_DIR ?? join(homedir(), ".cache", "berth", "vm");
    await writeFile(
      config,
      JSON.stringify({
        images: { insecureRegistries: [registry.host] },
        // Snapshots off: the first VM boots cold (a snapshot would be another boot competing for the cores).
        worker: { vm: { dir: guestDir, accelerator: "tcg", snapshots: false } },
      }),
    );
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

  test("the sh_test's docker run passes in a Docker VM, and a second run with a changed input reuses that VM, its daemon and its image", async () => {
    const testLog = () => readFile(join(workspace, "bazel-testlogs", TEST, "test.log"), "utf8");

    // First run: a cold VM, the daemon started in it, the small image pulled from the loopback registry.
    const first = await remoteTest();
    assertPassedRemotely(first);
    const firstLog = await testLog();
    console.log(`first run's test.log:\n${firstLog}`);
    const context = `${firstLog}\n${first.report}`;
    assert.equal(said(firstLog, "input"), "one", context);
    assert.equal(said(firstLog, "kernel"), assets.kernelRelease, context);
    assert.equal(said(firstLog, "image"), DOCKER_IMAGE_MARKER, context);
    assert.equal(said(firstLog, "marker"), "none", context);
    assert.equal(said(firstLog, "pulled before"), "no", context);
    assert.equal(said(firstLog, "docker run"), "PASS", context);
    assert.equal(said(firstLog, "in the container"), SMALL_MARKER, context);
    const daemon = said(firstLog, "dockerd pid");
    assert.match(daemon ?? "", /^\d+$/, context);

    // Second run: a changed data file makes a new action (no cache hit), of the same platform: the warm VM.
    await writeFile(join(workspace, "input.txt"), "two\n");
    const second = await remoteTest();
    assertPassedRemotely(second);
    const secondLog = await testLog();
    console.log(`second run's test.log:\n${secondLog}`);
    const context2 = `${secondLog}\n${second.report}`;
    assert.equal(said(secondLog, "input"), "two", context2);
    assert.equal(said(secondLog, "kernel"), assets.kernelRelease, context2);
    // What the first run left in the VM, the image its daemon pulled, and the daemon itself are still there.
    assert.equal(said(secondLog, "marker"), "left by the run of input one", context2);
    assert.equal(said(secondLog, "pulled before"), "yes", context2);
    assert.equal(said(secondLog, "dockerd pid"), daemon, context2);
    assert.equal(said(secondLog, "docker run"), "PASS", context2);
    assert.equal(said(secondLog, "in the container"), SMALL_MARKER, context2);

    const passedIn = (run: typeof first) =>
      new RegExp(`^//:${TEST} +PASSED in (\\S+)`, "m").exec(run.result.stdout + run.result.stderr)?.[1];
    console.log(
      `bazel test wall time: first run ${(first.wallMs / 1000).toFixed(1)} s (Bazel: PASSED in ${passedIn(first)}), ` +
        `second run ${(second.wallMs / 1000).toFixed(1)} s (PASSED in ${passedIn(second)})`,
    );
    // No boot, no daemon start, no pull: the only timing asserted, and a generous one.
    assert.ok(second.wallMs < first.wallMs, `second run ${second.wallMs} ms, first ${first.wallMs} ms`);
  });
});
