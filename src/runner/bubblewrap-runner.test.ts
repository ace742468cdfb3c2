import assert from "node:assert/strict";
import { chmod, chown, copyFile, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { EXPANDED_IMAGE_CAPABILITY, IMAGE_CAPABILITY } from "../action/action-platform.js";
import { BubblewrapSandbox, INPUT_ROOT_MOUNT } from "../sandbox/bubblewrap.js";
import { Code } from "../status/status.js";
import { BubblewrapRunner } from "./bubblewrap-runner.js";
import { HOST_INPUT_ROOT_PATH, type RunRequest, type RunRoot } from "./runner.js";

const NOBODY = 65534;
const PATH = { name: "PATH", value: "/bin:/usr/bin" };
const runner = new BubblewrapRunner(new BubblewrapSandbox(), { layeredRoots: true });

interface Workspace {
  /** The action's own directory: input root, logs, and whatever the runner makes there. */
  dir: string;
  inputRoot: string;
}

async function workspace(t: TestContext): Promise<Workspace> {
  const dir = await mkdtemp(join(tmpdir(), "berth-runner-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await chmod(dir, 0o755);
  const inputRoot = join(dir, "root");
  await mkdir(inputRoot);
  await chown(inputRoot, NOBODY, NOBODY);
  return { dir, inputRoot };
}

async function run(ws: Workspace, root: RunRoot, script: string, on = runner, uid = NOBODY) {
  const request: RunRequest = {
    inputRoot: ws.inputRoot,
    scratchDir: ws.dir,
    root,
    workingDirectory: "",
    argv: ["sh", "-c", script],
    env: [PATH],
    timeoutMs: 30_000,
    stdoutPath: join(ws.dir, "stdout"),
    stderrPath: join(ws.dir, "stderr"),
    network: false,
    user: { uid, gid: uid },
    signal: new AbortController().signal,
  };
  const result = await on.run(request);
  return { ...result, stdout: await readFile(request.stdoutPath, "utf8") };
}

/**
 * A one-program image layer: busybox-static as /bin/sh and /bin/busybox, and a file the action will attack.
 * Open to everyone on the host (as a worker tames an image's directories), so only the overlay protects it.
 */
async function layer(ws: Workspace): Promise<string> {
  const lower = join(ws.dir, "..", `${join(ws.dir).split("/").pop()}-layer`);
  await mkdir(join(lower, "bin"), { recursive: true });
  await mkdir(join(lower, "etc"));
  await copyFile("/bin/busybox", join(lower, "bin", "busybox"));
  await copyFile("/bin/busybox", join(lower, "bin", "sh"));
  await writeFile(join(lower, "etc", "marker"), "unchanged\n");
  await Promise.all([chmod(join(lower, "etc"), 0o777), chmod(join(lower, "bin"), 0o777)]);
  await chmod(join(lower, "etc", "marker"), 0o666);
  await chmod(lower, 0o755);
  return lower;
}

test("the host's root: the input root at HOST_INPUT_ROOT_PATH, the host's files read-only", async (t) => {
  const ws = await workspace(t);
  assert.equal(HOST_INPUT_ROOT_PATH, INPUT_ROOT_MOUNT);
  const ran = await run(ws, { kind: "host" }, "pwd; echo x > /usr/berth-escape || echo refused; echo ok > out");
  assert.equal(ran.exitCode, 0);
  assert.equal(ran.stdout, `${HOST_INPUT_ROOT_PATH}\nrefused\n`);
  assert.equal(await readFile(join(ws.inputRoot, "out"), "utf8"), "ok\n");
});

test("layers: an action, root in its namespace, that rewrites, deletes and adds files of its image leaves the layer as it was", async (t) => {
  const ws = await workspace(t);
  const lower = await layer(ws);
  t.after(() => rm(lower, { recursive: true, force: true }));
  const root: RunRoot = { kind: "layers", layerDirs: [lower], upperDirectories: [], inputRootPath: "/work" };
  const script = "echo changed > /etc/marker; rm /bin/busybox; echo new > /etc/added; cat /etc/marker; pwd; ls /etc";
  const ran = await run(ws, root, script, runner, 0);
  assert.equal(ran.exitCode, 0, await readFile(join(ws.dir, "stderr"), "utf8"));
  assert.equal(ran.stdout, "changed\n/work\nadded\nmarker\n");
  // The writes went to the action's own layer, in its directory, and nowhere else.
  assert.equal(await readFile(join(lower, "etc", "marker"), "utf8"), "unchanged\n");
  assert.deepEqual((await readdir(join(lower, "etc"))).sort(), ["marker"]);
  assert.deepEqual((await readdir(join(lower, "bin"))).sort(), ["busybox", "sh"]);
  assert.equal(await readFile(join(ws.dir, "upper", "etc", "added"), "utf8"), "new\n");
});

test("the input root as /: nothing of the host shows, absolute paths are the input root's", async (t) => {
  const ws = await workspace(t);
  await mkdir(join(ws.inputRoot, "bin"));
  await copyFile("/bin/busybox", join(ws.inputRoot, "bin", "sh"));
  await chmod(join(ws.inputRoot, "bin", "sh"), 0o755);
  const ran = await run(ws, { kind: "input-root" }, "test -e /etc/passwd && echo host; echo mine > /made; pwd");
  assert.equal(ran.exitCode, 0);
  assert.equal(ran.stdout, "/\n");
  assert.equal(await readFile(join(ws.inputRoot, "made"), "utf8"), "mine\n");
});

test("a runner without layered roots offers no image capability and refuses layers with FAILED_PRECONDITION", async (t) => {
  const ws = await workspace(t);
  const plain = new BubblewrapRunner(new BubblewrapSandbox(), { layeredRoots: false });
  assert.deepEqual(plain.capabilities, []);
  assert.deepEqual(runner.capabilities, [IMAGE_CAPABILITY, EXPANDED_IMAGE_CAPABILITY]);
  const root: RunRoot = { kind: "layers", layerDirs: ["/"], upperDirectories: [], inputRootPath: "/work" };
  await assert.rejects(run(ws, root, "true", plain), (err: { code: number; message: string }) => {
    return err.code === Code.FAILED_PRECONDITION && /runs no images/.test(err.message);
  });
  assert.deepEqual(await readdir(ws.dir), ["root"], "nothing was made for the refused run");
});
