import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { chmod, lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { type ServerProcess, spawnBerth } from "../support/farm.js";
import { busyboxImage, startRegistry, type TestRegistry } from "../support/registry.js";
import {
  assertInstalled,
  assertNoRemoteWarnings,
  BAZEL,
  describeRun,
  nonInternalKinds,
  processSummary,
  readExecutionLog,
  runBazel,
  type SpawnExec,
  startupOptions,
} from "./bazel.js";

/**
 * Bazel 4.2.3 (Debian's bazel-bootstrap) against a spawned `berth serve`, for what Bazel expects of a remote
 * worker beyond running a command: a genrule may write scratch files in its working directory (and reopen its
 * stderr by name); outputs that are absolute symlinks into the action's own tree come back as the files and
 * directories they point to, while relative symlinks stay symlinks; and the platform properties remote
 * toolchain configurations set (OSFamily, ISA, Arch) find Berth's workers. Once on the host's root, and the
 * first two again inside a busybox image.
 */

/** Bazel's exit code for a remote execution failure (ExitCode.REMOTE_ERROR). */
const BAZEL_REMOTE_ERROR = 34;

/** This machine's architecture as a remote toolchain configuration spells it, another spelling, and another one. */
const ISA = process.arch === "arm64" ? "aarch64" : "x86-64";
const ARCH = process.arch === "arm64" ? "arm64" : "amd64";
const OTHER_ISA = process.arch === "arm64" ? "x86-64" : "aarch64";

const RULES_BZL = `"""An action whose outputs are symlinks, absolute and relative, to a file and a directory."""

def _link_outputs_impl(ctx):
    outs = [
        ctx.actions.declare_directory(ctx.attr.name + "/dir"),
        ctx.actions.declare_file(ctx.attr.name + "/a"),
        ctx.actions.declare_directory(ctx.attr.name + "/ad"),
        ctx.actions.declare_symlink(ctx.attr.name + "/r"),
        ctx.actions.declare_symlink(ctx.attr.name + "/rd"),
    ]
    ctx.actions.run_shell(
        outputs = outs,
        # The worker made the output directories; ad is to be a link instead.
        command = "set -e; rmdir $3; mkdir -p $1/sub; echo foo > $1/foo; echo deep > $1/sub/deep; " +
                  "ln -s foo $1/rel; ln -s $PWD/$1/foo $1/abs; " +
                  "ln -s $PWD/$1/foo $2; ln -s $PWD/$1 $3; ln -s dir/foo $4; ln -s dir $5",
        arguments = [out.path for out in outs],
        mnemonic = "LinkOutputs",
    )
    return [DefaultInfo(files = depset(outs))]

link_outputs = rule(implementation = _link_outputs_impl)
`;

const BUILD = `load(":rules.bzl", "link_outputs")

# Scratch files in the working directory (the input root): a copy of an input, copied over and appended to (Bazel
# sends every input as executable), a directory; and the action's stderr reopened by name.
genrule(
    name = "scratch",
    srcs = ["x.txt"],
    outs = ["scratch.txt"],
    cmd = "cp $(location x.txt) tmp.txt; cp $(location x.txt) tmp.txt && echo again >> tmp.txt; " +
          "mkdir -p scratch/dir && echo more > scratch/dir/f; " +
          "cat tmp.txt scratch/dir/f >> $@; echo scratch genrule reopened its stderr > /dev/stderr",
)

# A genrule's output that is an absolute link to its input.
genrule(
    name = "abs_file",
    srcs = ["x.txt"],
    outs = ["abs_file.txt"],
    cmd = "ln -s $$PWD/$(location x.txt) $@",
)

link_outputs(name = "links")

genrule(
    name = "linux_isa",
    outs = ["linux_isa.txt"],
    cmd = "uname -s > $@",
    exec_properties = {"OSFamily": "Linux", "ISA": "${ISA}"},
)

genrule(
    name = "linux_arch",
    outs = ["linux_arch.txt"],
    cmd = "uname -s > $@",
    exec_properties = {"OSFamily": "linux", "Arch": "${ARCH}"},
)

genrule(
    name = "other_isa",
    outs = ["other_isa.txt"],
    cmd = "uname -s > $@",
    exec_properties = {"OSFamily": "Linux", "ISA": "${OTHER_ISA}"},
)
`;

const BAZELRC = [
  // ctx.actions.declare_symlink is experimental in Bazel 4.
  "build --experimental_allow_unresolved_symlinks",
  // The runner's PATH must not reach the actions (it would also change their keys).
  "build --incompatible_strict_action_env",
  "build --color=no --curses=no",
  "",
].join("\n");

/** What bazel-bin/links holds: a symlink as "-> TARGET", a directory as "dir", a file as its contents. */
const EXPECTED_LINKS: Record<string, string> = {
  "links/dir": "dir",
  "links/dir/foo": "foo\n",
  "links/dir/sub": "dir",
  "links/dir/sub/deep": "deep\n",
  "links/dir/rel": "-> foo",
  // An absolute link inside the directory output: its file.
  "links/dir/abs": "foo\n",
  // Absolute links: the file and the directory they point to, the directory's own relative link kept.
  "links/a": "foo\n",
  "links/ad": "dir",
  "links/ad/foo": "foo\n",
  "links/ad/abs": "foo\n",
  "links/ad/sub": "dir",
  "links/ad/sub/deep": "deep\n",
  "links/ad/rel": "-> foo",
  // Relative links stay links.
  "links/r": "-> dir/foo",
  "links/rd": "-> dir",
};

/** Every entry below `dir` (a workspace's bazel-bin), described as EXPECTED_LINKS does; symlinks are not entered. */
async function describeTree(base: string, below: string): Promise<Record<string, string>> {
  const found: Record<string, string> = {};
  const visit = async (path: string) => {
    const full = join(base, path);
    const info = await lstat(full);
    if (info.isSymbolicLink()) found[path] = `-> ${await readlink(full)}`;
    else if (info.isFile()) found[path] = await readFile(full, "utf8");
    else if (info.isDirectory()) {
      if (path !== below) found[path] = "dir";
      for (const name of await readdir(full)) await visit(`${path}/${name}`);
    }
  };
  await visit(below);
  return found;
}

/** One Berth serves both suites: its workers run as root, so they run images too. */
let berth: ServerProcess | undefined;
let registry: TestRegistry | undefined;
let image = "";
let root = "";

before(async () => {
  assertInstalled(BAZEL);
  root = await mkdtemp(join(tmpdir(), "berth-bazel-semantics-"));
  // Berth's sandbox runs actions as an unprivileged user, who must get through to the data directory.
  await chmod(root, 0o755);
  registry = await startRegistry();
  image = await registry.push(await busyboxImage("berth e2e: semantics"), "team/busybox", "1");
  berth = await spawnBerth(["--data-dir", join(root, "data"), "--workers", "2"]);
});

after(async () => {
  await berth?.stop();
  await registry?.stop();
  // Bazel marks its output tree read-only; force removal still succeeds as the owner.
  if (root !== "") await rm(root, { recursive: true, force: true });
});

/** A workspace of its own (and a Bazel server of its own) for each suite. */
function suite(name: string, extraOptions: () => string[], body: (ctx: SuiteContext) => void): void {
  describe(name, { timeout: 240_000 }, () => {
    const ctx: SuiteContext = { workspace: "", build: async () => assert.fail("not started") };
    let rcFile = "";
    let logs = 0;
    const startup = () => startupOptions(join(root, name.replace(/\W+/g, "-")), rcFile);

    before(async () => {
      const dir = join(root, name.replace(/\W+/g, "-"));
      ctx.workspace = join(dir, "workspace");
      await mkdir(ctx.workspace, { recursive: true });
      await writeFile(join(ctx.workspace, "WORKSPACE"), 'workspace(name = "berth_semantics")\n');
      await writeFile(join(ctx.workspace, "BUILD"), BUILD);
      await writeFile(join(ctx.workspace, "rules.bzl"), RULES_BZL);
      await writeFile(join(ctx.workspace, "x.txt"), "hello\n");
      rcFile = join(dir, "semantics.bazelrc");
      await writeFile(rcFile, BAZELRC);
      ctx.build = async (targets: string[]) => {
        assert.ok(berth, "berth is not running");
        const executionLog = join(dir, `execution-${++logs}.json`);
        const full = [
          ...startup(),
          "build",
          `--remote_executor=grpc://${berth.address}`,
          // Every spawn runs remotely or the build fails: no local fallback.
          "--spawn_strategy=remote",
          `--execution_log_json_file=${executionLog}`,
          ...extraOptions(),
          ...targets,
        ];
        const result = await runBazel(ctx.workspace, full);
        const report = describeRun(full, result);
        const spawns = existsSync(executionLog) ? await readExecutionLog(executionLog) : [];
        return { result, report, spawns };
      };
    });

    after(async () => {
      if (ctx.workspace !== "" && existsSync(join(ctx.workspace, "WORKSPACE"))) {
        await runBazel(ctx.workspace, [...startup(), "shutdown"], 60_000).catch(() => undefined);
      }
    });

    body(ctx);
  });
}

interface SuiteContext {
  workspace: string;
  build(
    targets: string[],
  ): Promise<{ result: { code: number | null; stderr: string }; report: string; spawns: SpawnExec[] }>;
}

/** The build succeeded with every spawn run remotely, on Berth. */
function assertRemote(run: Awaited<ReturnType<SuiteContext["build"]>>): void {
  const { result, report, spawns } = run;
  assert.equal(result.code, 0, report);
  assertNoRemoteWarnings(result.stderr);
  assert.deepEqual(nonInternalKinds(processSummary(result.stderr)), ["remote"], report);
  assert.ok(spawns.length > 0, report);
  for (const spawn of spawns) assert.equal(spawn.runner, "remote", report);
}

function commonTests(ctx: SuiteContext): void {
  test("a genrule writes scratch files in its working directory and reopens its stderr by name", async () => {
    const run = await ctx.build(["//:scratch"]);
    assertRemote(run);
    assert.equal(await readFile(join(ctx.workspace, "bazel-bin", "scratch.txt"), "utf8"), "hello\nagain\nmore\n");
    assert.match(run.result.stderr, /^scratch genrule reopened its stderr$/m, run.report);
  });

  test("absolute output links come back as their files and directories; the links Bazel shows are the relative ones", async () => {
    const run = await ctx.build(["//:links", "//:abs_file"]);
    assertRemote(run);
    const bin = join(ctx.workspace, "bazel-bin");
    assert.deepEqual(await describeTree(bin, "links"), EXPECTED_LINKS);
    const absFile = await lstat(join(bin, "abs_file.txt"));
    assert.ok(absFile.isFile(), "abs_file.txt is a file, not a link");
    assert.equal(await readFile(join(bin, "abs_file.txt"), "utf8"), "hello\n");
  });
}

suite(
  "Bazel 4.2.3: what a remote worker is expected to allow, on the host's root",
  () => [],
  (ctx) => {
    commonTests(ctx);

    test("exec_properties OSFamily/ISA/Arch, as remote toolchain configurations spell them, build remotely", async () => {
      const run = await ctx.build(["//:linux_isa", "//:linux_arch"]);
      assertRemote(run);
      const genrules = run.spawns.filter((s) => s.mnemonic === "Genrule");
      assert.deepEqual(
        genrules.map((s) => (s.platform?.properties ?? []).map((p) => `${p.name}=${p.value}`).sort()).sort(),
        [
          [`ISA=${ISA}`, "OSFamily=Linux"],
          [`Arch=${ARCH}`, "OSFamily=linux"],
        ].sort(),
        run.report,
      );
      for (const name of ["linux_isa", "linux_arch"]) {
        assert.equal(await readFile(join(ctx.workspace, "bazel-bin", `${name}.txt`), "utf8"), "Linux\n");
      }
    });

    test("another architecture fails the build with Berth's FAILED_PRECONDITION naming the property", async () => {
      const { result, report } = await ctx.build(["//:other_isa"]);
      assert.equal(result.code, BAZEL_REMOTE_ERROR, report);
      assert.match(result.stderr, /Failed Precondition/, report);
      assert.match(result.stderr, new RegExp(`no worker of this farm offers the platform property ISA=${OTHER_ISA}`));
    });
  },
);

suite(
  "Bazel 4.2.3: what a remote worker is expected to allow, in a container image (mount mode)",
  () => [
    `--remote_default_exec_properties=container-image=docker://${image}`,
    // A busybox image has no bash; its /bin/sh sources Bazel's genrule-setup.sh as is.
    "--shell_executable=/bin/sh",
  ],
  commonTests,
);
