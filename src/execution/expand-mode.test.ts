import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readdir, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { BERTH_BIN, startTestFarm, type TestFarm } from "../../test/support/farm.js";
import {
  busyboxImage,
  extendedImage,
  layeredImage,
  MARKER_PATH,
  startRegistry,
  type TestRegistry,
} from "../../test/support/registry.js";
import { unpackDetails } from "../../test/support/rpc.js";
import { Code } from "../status/status.js";

let registry: TestRegistry;
let busybox: string;
let extended: string;
let layered: string;
let mount: TestFarm;
let expand: TestFarm;

before(async () => {
  registry = await startRegistry();
  const base = await busyboxImage("expand base");
  busybox = await registry.push(base, "team/base", "1");
  extended = await registry.push(await extendedImage(base, { "etc/extra": "extra\n" }), "team/extended", "1");
  layered = await registry.push(await layeredImage(), "team/layered", "1");
  [mount, expand] = await Promise.all([
    startTestFarm({ images: { mode: "mount" } }, undefined, { workers: 1 }),
    startTestFarm({ images: { mode: "expand" } }, undefined, { workers: 1 }),
  ]);
});
after(async () => {
  await Promise.all([mount?.close(), expand?.close()]);
  await registry?.stop();
});

type Farm = TestFarm;

const image = (ref: string, mode?: string) => [
  { name: "container-image", value: `docker://${ref}` },
  ...(mode ? [{ name: "berth-image-mode", value: mode }] : []),
];

/** Every file below `dir`, relative. */
async function filesBelow(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true }).catch(() => []);
  return entries.filter((e) => e.isFile()).map((e) => join(e.parentPath, e.name));
}

function berthCli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BERTH_BIN, ...args], (err, stdout, stderr) =>
      resolve({ code: err ? Number((err as { code?: number }).code) : 0, stdout, stderr }),
    );
  });
}

describe("expand mode", () => {
  test("the client's view is mount mode's: one action digest, the same outputs, stdout and exit code", async () => {
    const spec = {
      args: [
        "sh",
        "-c",
        `pwd; cat /${MARKER_PATH} in.txt; echo $PATH; mkdir -p ../dir && echo d > ../dir/f; echo o > out.txt`,
      ],
      platform: image(layered),
      // No PATH of its own: the image's (PATH=/bin) shows through, as in mount mode.
      env: { MINE: "mine" },
      files: { "sub/in.txt": "input\n" },
      workingDirectory: "sub",
      outputFiles: ["out.txt"],
      outputDirectories: ["../dir"],
    };
    const results = [];
    for (const farm of [mount, expand]) {
      const digest = await uploadAction(farm.clients, spec);
      const { response } = await execute(farm.clients, digest);
      assert.equal(response.status?.code ?? 0, Code.OK, response.status?.message);
      const result = response.result;
      assert.equal(result?.exitCode, 0, await readBlob(farm.clients, result?.stderrDigest));
      results.push({ digest, result, stdout: await readBlob(farm.clients, result?.stdoutDigest) });
    }
    const [m, e] = results as [(typeof results)[0], (typeof results)[0]];
    assert.deepEqual(e.digest, m.digest);
    assert.equal(e.stdout, "/run/berth/execroot/sub\nlayered\ninput\n/bin\n");
    assert.equal(e.stdout, m.stdout);
    assert.deepEqual(e.result?.outputFiles, m.result?.outputFiles);
    assert.deepEqual(
      e.result?.outputDirectories.map((d) => [d.path, d.treeDigest]),
      m.result?.outputDirectories.map((d) => [d.path, d.treeDigest]),
    );
    // The expand farm's worker pulled nothing: its image store is empty, the tree came from the CAS.
    assert.deepEqual(await filesBelow(join(expand.config.dataDir, "worker", "images", "store", "layers")), []);
  });

  test("berth-image-mode on the action overrides the farm's images.mode, both ways", async () => {
    const onMount = await uploadAction(mount.clients, {
      args: ["cat", `/${MARKER_PATH}`],
      platform: image(busybox, "expand"),
    });
    const before = mount.farm.expander.stats.imagesMerged;
    const viaExpand = (await execute(mount.clients, onMount)).response;
    assert.equal(viaExpand.result?.exitCode, 0, viaExpand.status?.message);
    assert.equal(await readBlob(mount.clients, viaExpand.result?.stdoutDigest), "expand base\n");
    assert.equal(mount.farm.expander.stats.imagesMerged, before + 1);

    const onExpand = await uploadAction(expand.clients, {
      args: ["cat", `/${MARKER_PATH}`],
      platform: image(busybox, "mount"),
      salt: "mount",
    });
    const merged = expand.farm.expander.stats.imagesMerged;
    const viaMount = (await execute(expand.clients, onExpand)).response;
    assert.equal(viaMount.result?.exitCode, 0, viaMount.status?.message);
    assert.equal(await readBlob(expand.clients, viaMount.result?.stdoutDigest), "expand base\n");
    assert.equal(expand.farm.expander.stats.imagesMerged, merged);
    assert.ok((await filesBelow(join(expand.config.dataDir, "worker", "images", "store", "layers"))).length > 0);

    const bad = await uploadAction(expand.clients, { args: ["true"], platform: image(busybox, "copy") });
    const refused = (await execute(expand.clients, bad)).response;
    assert.equal(refused.status?.code, Code.INVALID_ARGUMENT);
    assert.match(refused.status?.message ?? "", /berth-image-mode: "copy" is not one of "mount", "expand"/);
  });

  test("an image that has something where the input root goes is INVALID_ARGUMENT naming the path", async () => {
    for (const [path, clash] of [
      ["/etc", /"\/etc\/[^"]+"/],
      ["/bin/sh/x", /"\/bin\/sh"/],
    ] as const) {
      const farm = await startTestFarm({ images: { mode: "expand", inputRootPath: path } }, undefined, { workers: 1 });
      try {
        const action = await uploadAction(farm.clients, { args: ["true"], platform: image(busybox) });
        const { response } = await execute(farm.clients, action);
        assert.equal(response.status?.code, Code.INVALID_ARGUMENT, response.status?.message);
        assert.match(response.status?.message ?? "", clash);
        assert.ok(unpackDetails(response.status as NonNullable<typeof response.status>).badRequest);
      } finally {
        await farm.close();
      }
    }
  });

  test("berth image expand prints the root; again, it costs a lookup and writes nothing to the CAS", async () => {
    const first = await berthCli(["image", "expand", "--server", expand.address, layered]);
    assert.equal(first.code, 0, first.stderr);
    assert.match(first.stdout, /^[a-f0-9]{64}\/[0-9]+\n$/);
    // Names and sizes: small blobs are appended to the CAS's log files, which then grow.
    const casFiles = await filesAndSizes(join(expand.config.dataDir, "cas"));
    const { layersConverted, imagesMerged } = expand.farm.expander.stats;
    const second = await berthCli(["image", "expand", "--server", expand.address, layered]);
    assert.equal(second.code, 0, second.stderr);
    assert.equal(second.stdout, first.stdout);
    assert.deepEqual(expand.farm.expander.stats, { layersConverted, imagesMerged });
    assert.deepEqual(await filesAndSizes(join(expand.config.dataDir, "cas")), casFiles);

    const absent = await berthCli(["image", "expand", "--server", expand.address, `${registry.host}/team/absent:1`]);
    assert.equal(absent.code, 1);
    assert.match(absent.stderr, /team\/absent:1/);
  });

  test("two images sharing a base layer convert it once", async () => {
    const farm = await startTestFarm({ images: { mode: "expand" } });
    try {
      const stats = farm.farm.expander.stats;
      assert.equal((await berthCli(["image", "expand", "--server", farm.address, busybox])).code, 0);
      assert.deepEqual(stats, { layersConverted: 1, imagesMerged: 1 });
      const out = await berthCli(["image", "expand", "--server", farm.address, extended]);
      assert.equal(out.code, 0, out.stderr);
      assert.deepEqual(stats, { layersConverted: 2, imagesMerged: 2 });
    } finally {
      await farm.close();
    }
  });

  test("an expansion whose blobs were evicted is a miss and is built again", async () => {
    let farm: Farm = await startTestFarm({ images: { mode: "expand" } });
    try {
      const first = await berthCli(["image", "expand", "--server", farm.address, busybox]);
      assert.equal(first.code, 0, first.stderr);
      // The restarted server must check the entry again; one of the image's file blobs is gone meanwhile.
      farm = await farm.restart();
      // The largest blob is busybox itself, in the layer's tree and the image's alike.
      const blobs = await Promise.all(
        (await filesBelow(join(farm.config.dataDir, "cas"))).map(async (f) => ({ f, size: (await stat(f)).size })),
      );
      const busyboxBlob = blobs.sort((a, b) => b.size - a.size)[0];
      assert.ok(busyboxBlob && busyboxBlob.size > 100_000);
      await rm(busyboxBlob.f);
      farm = await farm.restart();
      const again = await berthCli(["image", "expand", "--server", farm.address, busybox]);
      assert.equal(again.code, 0, again.stderr);
      assert.equal(again.stdout, first.stdout);
      assert.deepEqual(farm.farm.expander.stats, { layersConverted: 1, imagesMerged: 1 });
    } finally {
      await farm.close();
    }
  });
});

async function filesAndSizes(dir: string): Promise<string[]> {
  const files = await filesBelow(dir);
  return (await Promise.all(files.map(async (f) => `${f} ${(await stat(f)).size}`))).sort();
}
