import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { chmod, mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { BERTH_BIN, type ServerProcess, spawnBerth, startTestFarm } from "../../test/support/farm.js";
import { busyboxImage, MARKER_PATH, startRegistry, type TestRegistry } from "../../test/support/registry.js";

interface Outcome {
  code: number;
  stdout: string;
  stderr: string;
}

let dir: string;
let registry: TestRegistry;
let registryStopped = false;
let berth: ServerProcess;
let image: string;
let digest: string;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "berth-image-pull-"));
  await chmod(dir, 0o755);
  registry = await startRegistry();
  const built = await busyboxImage("warmed by berth image pull");
  digest = built.digest;
  image = await registry.push(built, "team/busybox", "1");
  berth = await spawnBerth(["--data-dir", join(dir, "data"), "--workers", "2"]);
});
after(async () => {
  await berth?.stop();
  if (!registryStopped) await registry?.stop();
  await rm(dir, { recursive: true, force: true });
});

function berthCli(args: string[], cwd = dir): Promise<Outcome> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BERTH_BIN, ...args], { cwd }, (err, stdout, stderr) =>
      resolve({ code: err ? Number((err as { code?: number }).code) : 0, stdout, stderr }),
    );
  });
}

/**
 * `berth image pull` once both local workers have joined: the worker process
 * starts after the server listens, so an early pull may find fewer workers.
 */
async function pullOnBothWorkers(reference: string): Promise<Outcome> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const outcome = await berthCli(["image", "pull", "--server", berth.address, reference]);
    const workers = outcome.stdout.split("\n").filter((line) => line !== "").length;
    if (workers === 2 || Date.now() > deadline) return outcome;
    await sleep(200);
  }
}

// Runs first: the next test stops the registry.
test("a tag the registry does not have: each worker says so, naming the image, and the exit code is 1", async () => {
  const missing = `${registry.host}/team/busybox:nope`;
  const pull = await pullOnBothWorkers(missing);
  assert.equal(pull.code, 1, pull.stderr);
  const lines = pull.stdout.trim().split("\n");
  assert.equal(lines.length, 2, pull.stdout);
  for (const line of lines) {
    assert.match(line, /^local-[01] {2}failed: image 127\.0\.0\.1:\d+\/team\/busybox:nope: tag "nope" does not exist/);
  }
  // Not on a terminal: a line per worker as it finishes, and no bar.
  assert.match(pull.stderr, /local-0 failed: .*does not exist/);
  assert.match(pull.stderr, /local-1 failed: .*does not exist/);
  assert.doesNotMatch(pull.stderr, /\[#*-*\]|\r/);
});

test("berth image pull warms every worker: both print the pinned image, and an action runs after the registry is gone", async () => {
  const pull = await pullOnBothWorkers(`docker://${image}`);
  assert.equal(pull.code, 0, pull.stderr);
  assert.equal(pull.stdout, `local-0  ${image}@${digest}\nlocal-1  ${image}@${digest}\n`);
  assert.doesNotMatch(pull.stderr, /failed/);

  await registry.stop();
  registryStopped = true;
  const here = join(dir, "after-pull");
  await mkdir(here);
  const run = await berthCli(
    [
      "run",
      "--server",
      berth.address,
      "--platform",
      `container-image=docker://${image}`,
      "--",
      "cat",
      `/${MARKER_PATH}`,
    ],
    here,
  );
  assert.equal(run.code, 0, run.stderr);
  assert.equal(run.stdout, "warmed by berth image pull\n");
});

test("an image outside images.allowed is refused with the farm's message", async () => {
  const farm = await startTestFarm({ images: { allowed: ["ghcr.io/org/*"] } }, undefined, {
    workers: 1,
    runImages: false,
  });
  try {
    const pull = await berthCli(["image", "pull", "--server", farm.address, "127.0.0.1:5999/team/busybox:1"]);
    assert.equal(pull.code, 1);
    assert.equal(pull.stdout, "");
    assert.match(
      pull.stderr,
      /^berth image pull: image 127\.0\.0\.1:5999\/team\/busybox:1 is not allowed on this farm \(images\.allowed: ghcr\.io\/org\/\*\)\n$/,
    );
  } finally {
    await farm.close();
  }
});

test("a farm whose workers run no images answers FAILED_PRECONDITION's message", async () => {
  const farm = await startTestFarm({}, undefined, { workers: 1, runImages: false });
  try {
    while (farm.farm.scheduler.connectedWorkers().length === 0) await sleep(20);
    const pull = await berthCli(["image", "pull", "--server", farm.address, "127.0.0.1:5999/team/busybox:1"]);
    assert.equal(pull.code, 1);
    assert.equal(pull.stdout, "");
    assert.match(pull.stderr, /^berth image pull: .*so none can pull 127\.0\.0\.1:5999\/team\/busybox:1/);
    assert.match(pull.stderr, /none of the 1 workers connected to this farm runs container images/);
  } finally {
    await farm.close();
  }
});
