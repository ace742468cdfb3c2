import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { after, before, describe, test } from "node:test";
import { sha256, type WireDigest } from "../../test/support/blobs.js";
import {
  type BuildStreamRun,
  busyboxSysroot,
  executeAsBuildStream,
  type OutputEntry,
  readOutputDirectory,
} from "../../test/support/buildstream.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { unaryCall, unpackDetails } from "../../test/support/rpc.js";
import { file, symlink } from "../../test/support/trees.js";
import { ConfigError, parseConfig } from "../config/config.js";
import type { ExecuteResponse } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code } from "../status/status.js";

/**
 * BuildStream 2's remote actions (and buildbox-run's, recc's): the input
 * root is a whole sysroot and the action's "/". Berth runs them so for the
 * instance names in execution.inputRootAsRoot, and only for those.
 */

/** The instance listed in execution.inputRootAsRoot; "" is an ordinary one. */
const CHROOT = "buildstream";
/** What BuildStream sends for a build on x86-64 Linux. */
const LINUX_X86_64 = { os: "linux", arch: "x86-64" };
/** The element's build directory, BuildStream's working directory. */
const BUILD_DIR = "/buildstream/project/element";
const INSTALL_DIR = "/buildstream-install";

/** Host files no action may obtain. */
const HOST_SECRETS = ["/etc/shadow", "/etc/passwd", "/etc/hostname"].filter((p) => existsSync(p));
let hostSecretDigests: WireDigest[];

let farm: TestFarm;
before(async () => {
  hostSecretDigests = await Promise.all(HOST_SECRETS.map(async (p) => sha256(await readFile(p))));
  farm = await startTestFarm({ execution: { inputRootAsRoot: [CHROOT] } }, undefined, {
    workers: 2,
    // Until workers offer their OS and architecture themselves (issue #13, item 1).
    properties: [
      { name: "OSFamily", value: "linux" },
      { name: "ISA", value: "x86-64" },
    ],
  });
});
after(() => farm?.close());

/** A build as BuildStream batches it: `set -e`, absolute paths, an install root beside the build directory. */
function build(script: string, overrides: Partial<BuildStreamRun> = {}): BuildStreamRun {
  return {
    sysroot: busyboxSysroot({ "buildstream/project/element/hello.c": file("int main(void) { return 0; }\n") }),
    script,
    cwd: BUILD_DIR,
    env: { PATH: "/usr/bin:/bin", HOME: "/tmp", SALT: `${Math.random()}` },
    readWrite: [INSTALL_DIR, BUILD_DIR],
    config: { ...LINUX_X86_64, uid: 1000, gid: 1000 },
    ...overrides,
  };
}

function ok(response: ExecuteResponse): void {
  assert.equal(response.status?.code, Code.OK, response.status?.message);
}

async function stderrOf(response: ExecuteResponse): Promise<string> {
  const digest = response.result?.stderrDigest;
  if (!digest) return "";
  const read = await unaryCall(farm.clients.cas.batchReadBlobs.bind(farm.clients.cas), {
    instanceName: "",
    digests: [digest],
    acceptableCompressors: [],
    digestFunction: 0,
  });
  return read.responses[0]?.data.toString() ?? "";
}

/** The output directory named `path` in the result, read as BuildStream reads it (root_directory_digest). */
async function outputDirectory(response: ExecuteResponse, path: string): Promise<Map<string, OutputEntry>> {
  const found = response.result?.outputDirectories.find((d) => d.path === path);
  assert.ok(
    found,
    `the result has the output directory ${path}: ${JSON.stringify(response.result?.outputDirectories)}`,
  );
  return readOutputDirectory(farm.clients, CHROOT, found.rootDirectoryDigest as WireDigest);
}

function fileIn(entries: Map<string, OutputEntry>, path: string): string | undefined {
  const entry = entries.get(path);
  return entry && "file" in entry ? entry.file : undefined;
}

/** Which of the host's secrets the farm's CAS holds (none, ever). */
async function hostSecretsHeld(): Promise<string[]> {
  const { missingBlobDigests } = await unaryCall(farm.clients.cas.findMissingBlobs.bind(farm.clients.cas), {
    instanceName: CHROOT,
    blobDigests: hostSecretDigests,
    digestFunction: 0,
  });
  const missing = new Set(missingBlobDigests.map((d) => d.hash));
  return HOST_SECRETS.filter((_, i) => !missing.has(hostSecretDigests[i]?.hash ?? ""));
}

describe("a BuildStream 2 action under an instance in execution.inputRootAsRoot", () => {
  test("runs with its sysroot as /: absolute paths, outputs relative to a nested working directory, unixUID/unixGID", async () => {
    const response = await executeAsBuildStream(
      farm.clients,
      CHROOT,
      build(
        [
          `mkdir -p ${INSTALL_DIR}/usr/bin ${INSTALL_DIR}/usr/share/hello`,
          `cp hello.c ${INSTALL_DIR}/usr/share/hello/hello.c`,
          `printf '#!/bin/sh\\necho hello\\n' > ${INSTALL_DIR}/usr/bin/hello`,
          `chmod 755 ${INSTALL_DIR}/usr/bin/hello`,
          `ln -s /usr/bin/hello ${INSTALL_DIR}/usr/bin/hello-absolute`,
          `echo "$(id -u):$(id -g) $PWD" > ${INSTALL_DIR}/who`,
          `ls / > ${INSTALL_DIR}/root-listing`,
          `ls /etc > ${INSTALL_DIR}/etc-listing`,
          "test -c /dev/null && test -r /proc/self/status && test -d /dev/shm",
          `echo scratch > /tmp/scratch && cat /tmp/scratch > ${INSTALL_DIR}/tmp-works`,
          "echo built > build.log",
        ].join("\n"),
      ),
    );
    ok(response);
    assert.equal(response.result?.exitCode, 0, await stderrOf(response));
    // BuildStream's output paths, relative to its working directory, come back as it named them.
    assert.deepEqual(response.result?.outputDirectories.map((d) => d.path).sort(), [
      ".",
      "../../../buildstream-install",
    ]);
    const install = await outputDirectory(response, "../../../buildstream-install");
    assert.equal(fileIn(install, "usr/share/hello/hello.c"), "int main(void) { return 0; }\n");
    assert.deepEqual(install.get("usr/bin/hello"), { file: "#!/bin/sh\necho hello\n", executable: true });
    // An absolute link in an install tree is a path in the sysroot: kept as it is.
    assert.deepEqual(install.get("usr/bin/hello-absolute"), { symlink: "/usr/bin/hello" });
    assert.equal(fileIn(install, "who"), `1000:1000 ${BUILD_DIR}\n`);
    // "/" is the input root: its own entries and the sandbox's mount points, nothing of the host's.
    assert.deepEqual(fileIn(install, "root-listing")?.split("\n").filter(Boolean), [
      "bin",
      "buildstream",
      "buildstream-install",
      "dev",
      "etc",
      "proc",
      "tmp",
    ]);
    assert.deepEqual(fileIn(install, "etc-listing")?.split("\n").filter(Boolean), ["group", "passwd"]);
    assert.equal(fileIn(install, "tmp-works"), "scratch\n");
    const buildDir = await outputDirectory(response, ".");
    assert.equal(fileIn(buildDir, "build.log"), "built\n");
    assert.equal(fileIn(buildDir, "hello.c"), "int main(void) { return 0; }\n");
  });

  test("a writable whole root is one output, ../../..; without unixUID the action is root in its namespace, and powerless", async () => {
    const response = await executeAsBuildStream(
      farm.clients,
      CHROOT,
      build(
        [
          `mkdir -p ${INSTALL_DIR} && id -u > ${INSTALL_DIR}/uid && id -g >> ${INSTALL_DIR}/uid`,
          // Root in name only: no capability, and the input files stay read-only.
          `grep CapEff /proc/self/status > ${INSTALL_DIR}/caps`,
          "if echo changed >> /etc/passwd || chmod 666 /etc/passwd || mount -t tmpfs x /tmp; then exit 9; fi",
        ].join("\n"),
        {
          readWrite: undefined,
          config: LINUX_X86_64,
        },
      ),
    );
    ok(response);
    assert.equal(response.result?.exitCode, 0, await stderrOf(response));
    assert.deepEqual(
      response.result?.outputDirectories.map((d) => d.path),
      ["../../.."],
    );
    const root = await outputDirectory(response, "../../..");
    assert.equal(fileIn(root, "buildstream-install/uid"), "0\n0\n");
    assert.equal(fileIn(root, "buildstream-install/caps"), "CapEff:\t0000000000000000\n");
    assert.equal(fileIn(root, "etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000:builder:/:/bin/sh\n");
    assert.deepEqual(root.get("bin/sh"), { symlink: "busybox" });
    assert.equal(fileIn(root, "buildstream/project/element/hello.c"), "int main(void) { return 0; }\n");
  });

  test("network=on gets a network of the action's own; without it there is only loopback", async () => {
    const script = `mkdir -p ${INSTALL_DIR} && cat /proc/net/dev > ${INSTALL_DIR}/net`;
    const interfaces = async (network: boolean) => {
      const response = await executeAsBuildStream(
        farm.clients,
        CHROOT,
        build(script, { config: { ...LINUX_X86_64, network } }),
      );
      ok(response);
      assert.equal(response.result?.exitCode, 0, await stderrOf(response));
      const install = await outputDirectory(response, "../../../buildstream-install");
      const lines = fileIn(install, "net")?.split("\n").slice(2) ?? [];
      return lines.map((l) => l.trim().split(":")[0]).filter(Boolean);
    };
    assert.deepEqual(await interfaces(false), ["lo"]);
    assert.ok(
      (await interfaces(true)).some((name) => name !== "lo"),
      "a network interface beside loopback",
    );
  });
});

describe("the same BuildStream action under an instance not in execution.inputRootAsRoot", () => {
  test("runs on the worker's read-only root, where /buildstream-install cannot be made", async () => {
    const response = await executeAsBuildStream(
      farm.clients,
      "",
      build(`mkdir -p ${INSTALL_DIR}/usr && echo no > ${INSTALL_DIR}/usr/x`),
    );
    ok(response);
    assert.equal(response.result?.exitCode, 1);
    assert.match(await stderrOf(response), /buildstream-install.*Read-only file system/);
  });
});

describe("refused platforms", () => {
  const refusal = async (instance: string, extra: { name: string; value: string }[], config = LINUX_X86_64) => {
    const response = await executeAsBuildStream(
      farm.clients,
      instance,
      build("true", { config, extraProperties: extra }),
    );
    return response.status;
  };

  test("a container image with an inputRootAsRoot instance: INVALID_ARGUMENT naming container-image and the key", async () => {
    const status = await refusal(CHROOT, [{ name: "container-image", value: "docker://registry.invalid/busybox:1" }]);
    assert.equal(status?.code, Code.INVALID_ARGUMENT, status?.message);
    assert.match(status?.message ?? "", /platform property container-image: .*execution\.inputRootAsRoot/);
    assert.deepEqual(
      unpackDetails(status ?? { code: 0, message: "", details: [] }).badRequest?.fieldViolations.map((v) => v.field),
      ["platform property container-image"],
    );
  });

  test("unixUID and unixGID that are no ids are INVALID_ARGUMENT naming the property", async () => {
    for (const [name, value] of [
      ["unixUID", "-1"],
      ["unixUID", "root"],
      ["unixGID", "2147483648"],
      ["unixUID", "1e3"],
      ["unixGID", ""],
      ["unixUID", "99999999999"],
    ] as const) {
      const status = await refusal(CHROOT, [{ name, value }]);
      assert.equal(status?.code, Code.INVALID_ARGUMENT, `${name}=${value}: ${status?.message}`);
      assert.match(status?.message ?? "", new RegExp(`platform property ${name}: .* is not a user or group id`));
    }
    const both = await refusal("", [
      { name: "dockerRunAsRoot", value: "true" },
      { name: "unixUID", value: "1000" },
    ]);
    assert.equal(both?.code, Code.INVALID_ARGUMENT, both?.message);
    assert.match(both?.message ?? "", /dockerRunAsRoot: asks for root, and unixUID\/unixGID for 1000\/0/);
  });

  test("network=on on a farm that allows no network: FAILED_PRECONDITION naming network=on", async () => {
    const closed = await startTestFarm({ execution: { inputRootAsRoot: [CHROOT], allowNetwork: false } });
    try {
      const response = await executeAsBuildStream(
        closed.clients,
        CHROOT,
        build("true", {
          config: { ...LINUX_X86_64, network: true },
        }),
      );
      assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
      assert.match(response.status?.message ?? "", /network=on asks for a network/);
    } finally {
      await closed.close();
    }
  });
});

describe("a chroot action's paths never lead to the host", () => {
  /** The sysroot's own shadow file, which hostile paths may reach: it is the action's, not the host's. */
  const OWN_SHADOW = "the sysroot's own shadow\n";
  const OWN_PASSWD = "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000:builder:/:/bin/sh\n";

  function files(response: ExecuteResponse): Record<string, string> {
    return Object.fromEntries((response.result?.outputFiles ?? []).map((f) => [f.path, f.digest?.hash ?? ""]));
  }

  test("absolute links, .. beyond / and /proc/self/root in the input root resolve inside it, or to nothing", async () => {
    const links = {
      "buildstream/project/element/etc-link": symlink("/etc"),
      "buildstream/project/element/up": symlink("../../../../../../../../.."),
      "buildstream/project/element/self": symlink("/proc/self/root"),
      "buildstream/project/element/shadow-link": symlink("/etc/shadow"),
    };
    const outputPaths = [
      "etc-link/shadow",
      "up/etc/shadow",
      "self/etc/shadow",
      "up/proc/self/root/etc/passwd",
      "shadow-link",
      "etc-link/hostname",
    ];
    const withOwn = await executeAsBuildStream(
      farm.clients,
      CHROOT,
      build("true", { sysroot: busyboxSysroot({ "etc/shadow": file(OWN_SHADOW), ...links }), outputPaths }),
    );
    ok(withOwn);
    assert.deepEqual(files(withOwn), {
      "etc-link/shadow": sha256(OWN_SHADOW).hash,
      "up/etc/shadow": sha256(OWN_SHADOW).hash,
    });
    // The link itself is returned as the action left it, never followed.
    assert.deepEqual(
      withOwn.result?.outputSymlinks.map((s) => [s.path, s.target]),
      [["shadow-link", "/etc/shadow"]],
    );
    // A sysroot without a shadow file gives nothing for it, however it is named.
    const without = await executeAsBuildStream(
      farm.clients,
      CHROOT,
      build("true", { sysroot: busyboxSysroot(links), outputPaths }),
    );
    ok(without);
    assert.deepEqual(files(without), {});
    assert.deepEqual(await hostSecretsHeld(), []);
  });

  test("the action's own links to /etc, beyond / and through /proc lead to its sysroot's files, or nothing", async () => {
    const response = await executeAsBuildStream(
      farm.clients,
      CHROOT,
      build(
        [
          // The worker made the outputs' parents before the command ran, as REAPI says: links replace them.
          "rm -rf made-etc d/up proc-etc proc-init",
          "ln -s /etc made-etc",
          "ln -s ../../../../../../../../../../etc d/up",
          "ln -s /proc/self/root/etc proc-etc",
          "ln -s /proc/1/root proc-init",
        ].join("\n"),
        { outputPaths: ["made-etc/passwd", "d/up/group", "proc-etc/shadow", "proc-init/etc/passwd", "made-etc"] },
      ),
    );
    ok(response);
    assert.deepEqual(files(response), {
      "made-etc/passwd": sha256(OWN_PASSWD).hash,
      "d/up/group": sha256("root:x:0:\nbuilder:x:1000:\n").hash,
    });
    assert.deepEqual(
      response.result?.outputSymlinks.map((s) => [s.path, s.target]),
      [["made-etc", "/etc"]],
    );
    assert.deepEqual(await hostSecretsHeld(), []);
  });

  test("links in place of /proc, /dev and /tmp change nothing: the sandbox's own are mounted, nothing is made on the host", async () => {
    const hostTarget = `/tmp/berth-chroot-dev-${process.pid}-${Date.now()}`;
    const response = await executeAsBuildStream(
      farm.clients,
      CHROOT,
      build(
        [
          "test -c /dev/null",
          "test -r /proc/self/status",
          "test -d /dev/shm",
          "echo x > /tmp/made-in-tmp",
          "test ! -e /etc/made-in-tmp",
          `mkdir -p ${INSTALL_DIR} && ls /tmp > ${INSTALL_DIR}/tmp-listing`,
        ].join("\n"),
        {
          sysroot: busyboxSysroot({
            tmp: symlink("/etc"),
            dev: symlink(`../../../../../../../../..${hostTarget}`),
            proc: file("not a directory"),
          }),
        },
      ),
    );
    ok(response);
    assert.equal(response.result?.exitCode, 0, await stderrOf(response));
    assert.equal(existsSync(hostTarget), false, "nothing was made on the host");
    const install = await outputDirectory(response, "../../../buildstream-install");
    assert.equal(fileIn(install, "tmp-listing"), "made-in-tmp\n");
  });

  test("a working directory through an absolute link runs inside the root; one leading nowhere is INVALID_ARGUMENT", async () => {
    const sysroot = busyboxSysroot({
      "buildstream/sub/.keep": file(""),
      "wd-link": symlink("/buildstream"),
      nowhere: symlink("/proc/self/cwd"),
    });
    const through = await executeAsBuildStream(
      farm.clients,
      CHROOT,
      build(`mkdir -p ${INSTALL_DIR} && pwd -P > ${INSTALL_DIR}/pwd`, {
        sysroot,
        cwd: "/wd-link/sub",
        readWrite: [INSTALL_DIR],
      }),
    );
    ok(through);
    assert.equal(through.result?.exitCode, 0, await stderrOf(through));
    const install = await outputDirectory(through, "../../buildstream-install");
    assert.equal(fileIn(install, "pwd"), "/buildstream/sub\n");

    const nowhere = await executeAsBuildStream(
      farm.clients,
      CHROOT,
      build("true", { sysroot, cwd: "/nowhere", readWrite: [INSTALL_DIR] }),
    );
    assert.equal(nowhere.status?.code, Code.INVALID_ARGUMENT, nowhere.status?.message);
    assert.match(
      nowhere.status?.message ?? "",
      /command\.working_directory: "nowhere" is not a directory of the input root/,
    );
  });

  test("an output path climbing above / is INVALID_ARGUMENT, as on any root", async () => {
    const response = await executeAsBuildStream(
      farm.clients,
      CHROOT,
      build("true", { outputPaths: ["../../../../etc/passwd"] }),
    );
    assert.equal(response.status?.code, Code.INVALID_ARGUMENT, response.status?.message);
    assert.match(response.status?.message ?? "", /is not a relative path inside the input root/);
  });
});

test("execution.inputRootAsRoot naming an instance the farm does not serve is a configuration error naming it", () => {
  assert.throws(
    () => parseConfig({ instanceNames: ["main"], execution: { inputRootAsRoot: ["main", "bst"] } }),
    (err: unknown) =>
      err instanceof ConfigError && /execution\.inputRootAsRoot: "bst" not in instanceNames/.test(err.message),
  );
  assert.deepEqual(parseConfig({ execution: { inputRootAsRoot: ["bst"] } }).execution.inputRootAsRoot, ["bst"]);
});
