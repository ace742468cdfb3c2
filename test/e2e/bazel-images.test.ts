import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { chmod, mkdir, mkdtemp, readFile, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { type ServerProcess, spawnBerth } from "../support/farm.js";
import { busyboxImage, MARKER_PATH, startRegistry, type TestRegistry } from "../support/registry.js";
import {
  assertInstalled,
  assertNoRemoteWarnings,
  BAZEL,
  describeRun,
  nonInternalKinds,
  processSummary,
  readExecutionLog,
  runBazel,
  startupOptions,
  tearDownBazel,
} from "./bazel.js";

/**
 * Bazel 4.2.3 (Debian's bazel-bootstrap) with a spawned `berth serve` as its --remote_executor, running genrules
 * inside busybox images from a real registry on loopback, in mount mode (workers pull the image) and in expand mode
 * (the server expands it into the CAS): the image is chosen per target with
 * `exec_properties`, for every target with --remote_default_exec_properties, and a missing image fails the build
 * with Berth's FAILED_PRECONDITION naming it.
 *
 * Bazel 4 runs a genrule as `/bin/bash -c "source …/genrule-setup.sh; CMD"` (the shell of --shell_executable,
 * /bin/bash by default; `cmd_bash` only changes CMD). A busybox image has no bash, so the actions fail with
 * "execvp /bin/bash: No such file or directory" unless Bazel is told to use the image's /bin/sh, which busybox
 * provides and which sources Bazel's genrule-setup.sh as is.
 */

/** A file each test image has, holding its marker and a newline; the host has none. */
const MARKER_FILE = `/${MARKER_PATH}`;
const FIRST_MARKER = "berth e2e: the first image";
const SECOND_MARKER = "berth e2e: the second image";
/** Bazel's exit code for a remote execution failure (ExitCode.REMOTE_ERROR). */
const BAZEL_REMOTE_ERROR = 34;

/** Options of every build; the executor's address and the default image are given on the command line. */
const BAZELRC = [
  "build --shell_executable=/bin/sh",
  // The runner's PATH must not reach the actions (it would also change their keys); this one has /bin.
  "build --incompatible_strict_action_env",
  "build --color=no --curses=no",
  "",
].join("\n");

/** The same genrule for every image: only its name, its output and the image it names differ. */
function markerGenrule(name: string, image?: string): string {
  const properties = image === undefined ? "" : `    exec_properties = {"container-image": "docker://${image}"},\n`;
  return [
    "genrule(",
    `    name = "${name}",`,
    `    outs = ["${name}.txt"],`,
    `    cmd = "cat ${MARKER_FILE} > $@",`,
    properties,
    ")",
    "",
  ].join("\n");
}

// Both ways of honouring container-image, with the same builds and the same expected outputs.
for (const mode of ["mount", "expand"] as const) {
  describe(`Bazel 4.2.3 running genrules in container images on Berth (${mode} mode)`, { timeout: 180_000 }, () => {
    let root = "";
    let workspace = "";
    let rcFile = "";
    let registry: TestRegistry | undefined;
    let berth: ServerProcess | undefined;
    let firstImage = "";
    let secondImage = "";
    let absentImage = "";
    let logs = 0;

    const startup = () => startupOptions(root, rcFile);

    /** `bazel build ARGS…` against Berth with remote execution only; its result, spawns and process summary. */
    const build = async (args: string[]) => {
      assert.ok(berth, "berth is not running");
      const executionLog = join(root, `execution-${++logs}.json`);
      const full = [
        ...startup(),
        "build",
        `--remote_executor=grpc://${berth.address}`,
        // Every spawn runs remotely or the build fails: no local fallback.
        "--spawn_strategy=remote",
        `--execution_log_json_file=${executionLog}`,
        ...args,
      ];
      const result = await runBazel(workspace, full);
      const report = describeRun(full, result);
      const spawns = existsSync(executionLog) ? await readExecutionLog(executionLog) : [];
      return { result, report, spawns };
    };

    const output = (name: string) => readFile(join(workspace, "bazel-bin", `${name}.txt`), "utf8");

    /** The build succeeded, and each of `targets` ran as one remote spawn (not a cache hit) of /bin/sh. */
    const assertRanRemotely = (run: Awaited<ReturnType<typeof build>>, targets: string[]) => {
      const { result, report, spawns } = run;
      assert.equal(result.code, 0, report);
      assertNoRemoteWarnings(result.stderr);
      const summary = processSummary(result.stderr);
      assert.deepEqual(nonInternalKinds(summary), ["remote"], `${summary.line}\n${report}`);
      assert.equal(summary.counts.get("remote"), targets.length, `${summary.line}\n${report}`);
      const genrules = spawns.filter((s) => s.mnemonic === "Genrule");
      assert.deepEqual(
        genrules.map((s) => s.listedOutputs?.[0]?.split("/").at(-1)).sort(),
        targets.map((t) => `${t}.txt`).sort(),
        report,
      );
      for (const spawn of genrules) {
        assert.equal(spawn.runner, "remote", report);
        assert.equal(spawn.remoteCacheHit ?? false, false, report);
        assert.equal(spawn.commandArgs[0], "/bin/sh", `Bazel sent ${JSON.stringify(spawn.commandArgs)}`);
      }
    };

    before(async () => {
      assertInstalled(BAZEL);
      for (const program of ["/usr/bin/docker-registry", "/usr/bin/skopeo", "/usr/bin/umoci", "/bin/busybox"]) {
        assertInstalled(program);
      }
      root = await mkdtemp(join(tmpdir(), "berth-bazel-images-"));
      // Berth's sandbox runs actions as nobody and cannot set up unless every directory above its data directory
      // lets others through; mkdtemp makes the directory private to root.
      await chmod(root, 0o755);
      registry = await startRegistry();
      const [first, second] = await Promise.all([busyboxImage(FIRST_MARKER), busyboxImage(SECOND_MARKER)]);
      firstImage = await registry.push(first, "team/busybox", "1");
      secondImage = await registry.push(second, "team/other", "1");
      absentImage = `${registry.host}/team/absent:1`;

      workspace = join(root, "workspace");
      await mkdir(workspace);
      await writeFile(join(workspace, "WORKSPACE"), 'workspace(name = "berth_images")\n');
      await writeFile(
        join(workspace, "BUILD"),
        [
          markerGenrule("first", firstImage),
          markerGenrule("second", secondImage),
          markerGenrule("by_default"),
          markerGenrule("absent", absentImage),
        ].join("\n"),
      );
      rcFile = join(root, "images.bazelrc");
      await writeFile(rcFile, BAZELRC);
      const config = join(root, "berth.json");
      await writeFile(config, JSON.stringify({ images: { mode } }));
      berth = await spawnBerth(["--data-dir", join(root, "data"), "--workers", "2", "--config", config]);
    });

    after(() =>
      tearDownBazel(root, workspace, root === "" ? [] : startup(), [() => berth?.stop(), () => registry?.stop()]),
    );

    test("a genrule with exec_properties container-image runs inside that image", async () => {
      assert.equal(existsSync(MARKER_FILE), false, `the host must not have ${MARKER_FILE}`);
      const run = await build(["//:first"]);
      assertRanRemotely(run, ["first"]);
      assert.deepEqual(run.spawns.find((s) => s.mnemonic === "Genrule")?.commandArgs.slice(0, 2), ["/bin/sh", "-c"]);
      assert.equal(await output("first"), `${FIRST_MARKER}\n`);
    });

    test("the same genrule naming another image gives that image's marker", async () => {
      const run = await build(["//:second"]);
      assertRanRemotely(run, ["second"]);
      assert.equal(await output("second"), `${SECOND_MARKER}\n`);
      assert.equal(await output("first"), `${FIRST_MARKER}\n`);
    });

    test("--remote_default_exec_properties=container-image=… runs a genrule without exec_properties in that image", async () => {
      const run = await build([
        `--remote_default_exec_properties=container-image=docker://${secondImage}`,
        "//:by_default",
      ]);
      assertRanRemotely(run, ["by_default"]);
      assert.equal(await output("by_default"), `${SECOND_MARKER}\n`);

      // With the other image as the default, the genrule's cmd is the same but its platform is not: a new action.
      const other = await build([
        `--remote_default_exec_properties=container-image=docker://${firstImage}`,
        "//:by_default",
      ]);
      assertRanRemotely(other, ["by_default"]);
      assert.equal(await output("by_default"), `${FIRST_MARKER}\n`);
    });

    test("an image that does not exist fails the build with Berth's FAILED_PRECONDITION naming it", async () => {
      const { result, report, spawns } = await build(["//:absent"]);
      assert.equal(result.code, BAZEL_REMOTE_ERROR, report);
      const escaped = absentImage.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
      // ERROR: …/BUILD:24:8: Executing genrule //:absent failed: (Exit 34): Remote Execution Failure:
      // Failed Precondition: image 127.0.0.1:PORT/team/absent:1: tag "1" does not exist in repository team/absent …
      assert.match(
        result.stderr,
        /^ERROR: .*\/BUILD:\d+:\d+: Executing genrule \/\/:absent failed: \(Exit 34\): Remote Execution Failure:$/m,
        report,
      );
      assert.match(result.stderr, new RegExp(`^Failed Precondition: .*${escaped}`, "m"), report);
      // Berth's PreconditionFailure violation, which Bazel prints under the message: type IMAGE, subject the image.
      assert.match(result.stderr, new RegExp(`^ +\\(IMAGE\\) ${escaped}: `, "m"), report);
      assert.match(result.stderr, /^FAILED: Build did NOT complete successfully/m, report);
      assert.equal(existsSync(join(workspace, "bazel-bin", "absent.txt")), false);
      // The command never ran: Bazel counts no remote process, and logs the spawn as failed to execute, with its own
      // exit code rather than one of the command.
      assert.deepEqual(nonInternalKinds(processSummary(result.stderr)), [], report);
      const genrule = spawns.find((s) => s.mnemonic === "Genrule");
      assert.equal(genrule?.status, "EXECUTION_FAILED", report);
      assert.equal(genrule?.exitCode, BAZEL_REMOTE_ERROR, report);
    });
  });
}
