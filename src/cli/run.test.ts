import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { BERTH_BIN, type ServerProcess, spawnBerth } from "../../test/support/farm.js";
import { busyboxImage, MARKER_PATH, startRegistry } from "../../test/support/registry.js";

let dir: string;
let berth: ServerProcess;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "berth-run-"));
  await chmod(dir, 0o755);
  berth = await spawnBerth(["--data-dir", join(dir, "data"), "--workers", "1"]);
});
after(async () => {
  await berth.stop();
  await rm(dir, { recursive: true, force: true });
});

function berthRun(args: string[], cwd: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BERTH_BIN, "run", "--server", berth.address, ...args], { cwd }, (err, stdout, stderr) =>
      resolve({ code: err ? Number((err as { code?: number }).code) : 0, stdout, stderr }),
    );
  });
}

test("berth run uploads a directory, shows the stages, prints the output, fetches outputs and exits with the exit code", async () => {
  const input = join(dir, "input");
  const here = join(dir, "here");
  await mkdir(input);
  await mkdir(here);
  await writeFile(join(input, "words.txt"), "remote build\n");
  const run = await berthRun(
    [
      "--input",
      input,
      "--output",
      "out/upper.txt",
      "--output",
      "tree",
      "--",
      "sh",
      "-c",
      "mkdir -p tree/x; tr a-z A-Z < words.txt > out/upper.txt; echo leaf > tree/x/leaf; echo printed; echo complained >&2; exit 5",
    ],
    here,
  );
  assert.equal(run.code, 5);
  assert.equal(run.stdout, "printed\n");
  assert.match(run.stderr, /cache check\n.*queued\n.*executing\n.*completed\n/s);
  assert.match(run.stderr, /complained/);
  assert.equal(await readFile(join(here, "out/upper.txt"), "utf8"), "REMOTE BUILD\n");
  assert.equal(await readFile(join(here, "tree/x/leaf"), "utf8"), "leaf\n");
});

test("berth run reports a refused action and fails", async () => {
  const run = await berthRun(["--platform", "pool=none-such", "--", "true"], dir);
  assert.notEqual(run.code, 0);
  assert.match(run.stderr, /pool=none-such/);
});

test("berth run --platform container-image=… runs the command inside that image, pulled from a registry", async () => {
  const registry = await startRegistry();
  try {
    const image = await registry.push(await busyboxImage("seen from berth run"), "team/busybox", "1");
    const here = join(dir, "image-run");
    await mkdir(here);
    const run = await berthRun(
      ["--platform", `container-image=docker://${image}`, "--", "cat", `/${MARKER_PATH}`],
      here,
    );
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout, "seen from berth run\n");
  } finally {
    await registry.stop();
  }
});
