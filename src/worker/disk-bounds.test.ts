import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { after, before, type TestContext, test } from "node:test";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { MEDIA_TYPES, makeLayer } from "../../test/support/layers.js";
import { busyboxImage, imageWithLayers, startRegistry, type TestRegistry } from "../../test/support/registry.js";
import { Code } from "../status/status.js";

/**
 * Actions that fill the disk, against a real farm (real sandboxes, a loopback registry for the image): each
 * must be stopped soon after it passes its share, named in its result, and an action within it must not notice.
 */
const MiB = 1024 ** 2;
const LIMITS = { diskBytes: 32 * MiB, diskEntries: 20_000 };
/**
 * Writers below pause 50 ms after each 1 MiB file: at most 20 MiB/s, so that what they can write between two
 * samples (1 s apart, plus the walk and a busy machine's delays) is known. Two intervals' worth of slack.
 */
const WRITE_RATE = 20 * MiB;
const SLACK = 2 * WRITE_RATE;
const isRoot = process.getuid?.() === 0;
let farm: TestFarm;
/** The same bounds with images expanded on the server (each action still gets an overlay layer of its own). */
let expandFarm: TestFarm | undefined;
let registry: TestRegistry | undefined;
let busybox = "";

before(async () => {
  farm = await startTestFarm({ worker: { limits: LIMITS }, images: { mode: "mount" } }, undefined, { workers: 2 });
  if (isRoot) {
    registry = await startRegistry();
    // A /workspace open to all, as build images have: the unprivileged action writes there, into its own layer.
    const tar = await makeLayer([{ name: "workspace/", type: "directory", mode: 0o777 }], "none");
    const diffId = `sha256:${createHash("sha256").update(tar).digest("hex")}`;
    const image = await imageWithLayers(await busyboxImage("disk bounds"), "disk-bounds", [
      { blob: tar, diffId, mediaType: MEDIA_TYPES.none },
    ]);
    busybox = await registry.push(image, "team/workspace", "1");
    expandFarm = await startTestFarm({ worker: { limits: LIMITS }, images: { mode: "expand" } }, undefined, {
      workers: 1,
    });
  }
});
after(async () => {
  await Promise.all([farm?.close(), expandFarm?.close()]);
  await registry?.stop();
});

async function run(args: string[], options: { salt: string; image?: string; outputFiles?: string[]; on?: TestFarm }) {
  const { clients } = options.on ?? farm;
  const digest = await uploadAction(clients, {
    args,
    salt: options.salt,
    timeoutSeconds: 60,
    outputFiles: options.outputFiles,
    platform: options.image ? [{ name: "container-image", value: `docker://${options.image}` }] : [],
  });
  const { response } = await execute(clients, digest, { skipCacheLookup: true });
  return {
    code: response.status?.code ?? Code.OK,
    message: response.status?.message ?? "",
    exitCode: response.result?.exitCode,
    outputs: response.result?.outputFiles ?? [],
    stdout: await readBlob(clients, response.result?.stdoutDigest),
    stderr: await readBlob(clients, response.result?.stderrDigest),
  };
}

/** Writes 1 MiB files into `dir` for ever, printing the count after each; only a bound stops it (or the timeout). A
 * write that fails ends it with exit code 3. */
const fillForever = (dir: string) =>
  `mkdir -p ${dir}; i=0; while :; do i=$((i+1)); dd if=/dev/zero of=${dir}/f$i bs=1048576 count=1 2>/dev/null || exit 3; echo $i; sleep 0.05; done`;

function assertStoppedAtDiskBytes(t: TestContext, filled: Awaited<ReturnType<typeof run>>) {
  assert.equal(filled.code, Code.RESOURCE_EXHAUSTED, `${filled.message}\n${filled.stderr}`);
  assert.match(filled.message, /disk limit of 33554432 bytes \(worker\.limits\.diskBytes\)/);
  assert.equal(filled.exitCode, 137);
  // The partial stdout is kept: it counts the MiB the action had written when it was stopped.
  const written = Number(filled.stdout.trim().split("\n").at(-1)) * MiB;
  // The count comes after each file: the one being written when a sample saw the excess is not in it yet, and
  // the directories' own blocks count too, so 32 whole files and part of the 33rd are past 32 MiB.
  assert.ok(written + MiB > LIMITS.diskBytes, `stopped at ${written} bytes, before its limit`);
  assert.ok(written <= LIMITS.diskBytes + SLACK, `it wrote ${written} bytes before it was stopped`);
  t.diagnostic(`stopped after writing ${written / MiB} MiB (limit ${LIMITS.diskBytes / MiB} MiB)`);
}

test("an action filling its input root with 1 MiB files is stopped past diskBytes, named in its result", async (t) => {
  assertStoppedAtDiskBytes(t, await run(["/bin/bash", "-c", fillForever("fill")], { salt: "host fill" }));
});

for (const mode of ["mount", "expand"] as const) {
  test(`an action filling its image's own layer (${mode} mode) is stopped past diskBytes, named in its result`, {
    skip: !isRoot,
  }, async (t) => {
    // Outside the input root: /workspace/fill lives in the overlay's upper layer.
    const filled = await run(["sh", "-c", fillForever("/workspace/fill")], {
      salt: `image fill ${mode}`,
      image: busybox,
      on: mode === "expand" ? expandFarm : farm,
    });
    assertStoppedAtDiskBytes(t, filled);
  });
}

test("an action creating 200,000 empty files is stopped past diskEntries, named in its result", async () => {
  const script = "mkdir many; for ((i = 0; i < 200000; i++)); do : > many/e$i; done; echo all 200000 made";
  const many = await run(["/bin/bash", "-c", script], { salt: "entries" });
  assert.equal(many.code, Code.RESOURCE_EXHAUSTED, `${many.message}\n${many.stderr}`);
  assert.match(many.message, /limit of 20000 files and directories on disk \(worker\.limits\.diskEntries\)/);
  assert.equal(many.stdout, "");
});

test("an action that ends right after writing past diskBytes is refused by the final check", async () => {
  // Past its first sample, then 40 MiB at once and a clean exit, before the next sample could see it.
  const script = "sleep 1.2; head -c 41943040 /dev/zero > burst; echo wrote";
  const burst = await run(["/bin/bash", "-c", script], { salt: "burst" });
  assert.equal(burst.code, Code.RESOURCE_EXHAUSTED, `${burst.message}\n${burst.stderr}`);
  assert.match(burst.message, /worker\.limits\.diskBytes/);
  assert.equal(burst.stdout, "wrote\n");
});

test("an action within its share runs for seconds, sampled, and succeeds with its outputs", async () => {
  // 24 MiB over about 2.5 s, in 1 MiB files, and one output: several samples see it, none stops it.
  const script =
    "for i in $(seq 24); do head -c 1048576 /dev/zero > part$i; sleep 0.1; done; cat part* | wc -c > total";
  const fine = await run(["/bin/bash", "-c", script], { salt: "within", outputFiles: ["total"] });
  assert.deepEqual([fine.code, fine.exitCode, fine.stderr], [Code.OK, 0, ""], fine.message);
  assert.deepEqual(
    fine.outputs.map((f) => f.path),
    ["total"],
  );
});

test("an action writing 300 MiB to a file it deleted but keeps open is stopped past diskBytes", async () => {
  // No name in the input root for the walk to find: only the descriptor holds the file. Paced so the write
  // outlasts the first sample; at full speed the final check would see nothing (the descriptor is closed by then).
  const script =
    "exec 3>big; rm big; for i in $(seq 300); do head -c 1048576 /dev/zero >&3 || exit 3; sleep 0.02; done; echo wrote all";
  const hidden = await run(["/bin/bash", "-c", script], { salt: "deleted but open" });
  assert.equal(hidden.code, Code.RESOURCE_EXHAUSTED, `${hidden.message}\n${hidden.stderr}`);
  assert.match(hidden.message, /disk limit of 33554432 bytes \(worker\.limits\.diskBytes\)/);
  assert.equal(hidden.exitCode, 137);
  assert.equal(hidden.stdout, "");
});

test("`exec 3>big; rm big; head -c 300M /dev/zero >&3`, with the descriptor then held, is stopped", async () => {
  const script = "exec 3>big; rm big; head -c 300M /dev/zero >&3; echo wrote; sleep 5; echo held";
  const hidden = await run(["/bin/bash", "-c", script], { salt: "deleted but open, at once" });
  assert.equal(hidden.code, Code.RESOURCE_EXHAUSTED, `${hidden.message}\n${hidden.stderr}`);
  assert.match(hidden.message, /worker\.limits\.diskBytes/);
  assert.doesNotMatch(hidden.stdout, /held/);
});

for (const mode of ["mount", "expand"] as const) {
  test(`an action holding a deleted file open in its image's own layer (${mode} mode) is stopped past diskBytes`, {
    skip: !isRoot,
  }, async () => {
    // Written through the overlay: the open file is the upper layer's, on the data directory's file system.
    const script =
      "exec 3>/workspace/big; rm /workspace/big; head -c 314572800 /dev/zero >&3; echo wrote; sleep 5; echo held";
    const hidden = await run(["sh", "-c", script], {
      salt: `image deleted but open ${mode}`,
      image: busybox,
      on: mode === "expand" ? expandFarm : farm,
    });
    assert.equal(hidden.code, Code.RESOURCE_EXHAUSTED, `${hidden.message}\n${hidden.stderr}`);
    assert.match(hidden.message, /worker\.limits\.diskBytes/);
    assert.doesNotMatch(hidden.stdout, /held/);
  });
}

test("an action keeping a small deleted file open for seconds succeeds", async () => {
  const script = "exec 3>small; rm small; head -c 1048576 /dev/zero >&3; sleep 2.5; echo done";
  const fine = await run(["/bin/bash", "-c", script], { salt: "small deleted but open" });
  assert.deepEqual([fine.code, fine.exitCode, fine.stdout, fine.stderr], [Code.OK, 0, "done\n", ""], fine.message);
});
