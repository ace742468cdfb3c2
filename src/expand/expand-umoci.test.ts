import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { lstat, mkdtemp, readdir, readFile, readlink, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";
import { type BuiltImage, busyboxImage, LAYERED_IMAGE, layeredImage } from "../../test/support/registry.js";
import type { Digest } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { hostMode } from "../image/host-mode.js";
import { layerToTree } from "./layer-to-tree.js";
import { mergeLayerTrees } from "./merge-layers.js";
import { type CountingBlobStore, openTestCas } from "./test-cas.js";
import { listTree, missingBlobsOfTree } from "./tree-listing.js";

const run = promisify(execFile);
let root: string;
let cas: CountingBlobStore;

before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-expand-umoci-"));
  ({ cas } = await openTestCas(root));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}

function blobPath(layout: string, descriptor: Descriptor): string {
  return join(layout, "blobs", ...descriptor.digest.split(":"));
}

/** The layers of `image`, bottom to top, read from its OCI layout as a registry client would. */
async function manifestLayers(image: BuiltImage): Promise<Descriptor[]> {
  const index = JSON.parse(await readFile(join(image.layout, "index.json"), "utf8")) as { manifests: Descriptor[] };
  const manifest = index.manifests.find((m) => m.annotations?.["org.opencontainers.image.ref.name"] === image.tag);
  assert.ok(manifest, `tag ${image.tag} in ${image.layout}`);
  return (JSON.parse(await readFile(blobPath(image.layout, manifest), "utf8")) as { layers: Descriptor[] }).layers;
}

/** What comparison needs of one path: kind, permission bits, content digest or symlink target. */
function describe(kind: string, mode: number | undefined, content: string | undefined): string {
  const bits = mode === undefined ? "" : ` ${mode.toString(8).padStart(4, "0")}`;
  return `${kind}${bits}${content === undefined ? "" : ` ${content}`}`;
}

async function describeRootfs(dir: string, prefix = "", out = new Map<string, string>()): Promise<Map<string, string>> {
  for (const name of await readdir(dir)) {
    const path = join(dir, name);
    const rel = prefix + name;
    const info = await lstat(path);
    if (info.isSymbolicLink()) {
      out.set(rel, describe("symlink", undefined, await readlink(path)));
    } else if (info.isDirectory()) {
      // umoci keeps an image's modes as they are; Berth tames them (hostMode), and that is the only difference.
      out.set(rel, describe("directory", hostMode(info.mode), undefined));
      await describeRootfs(path, `${rel}/`, out);
    } else if (info.isFile()) {
      const hash = createHash("sha256")
        .update(await readFile(path))
        .digest("hex");
      out.set(rel, describe("file", hostMode(info.mode), `${hash}/${info.size}`));
    } else {
      out.set(rel, describe("special", undefined, undefined));
    }
  }
  return out;
}

async function describeTree(tree: Digest): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const entry of await listTree(SHA256, cas, tree)) {
    const content = entry.kind === "file" ? `${entry.digest?.hash}/${entry.digest?.sizeBytes}` : entry.target;
    out.set(entry.path, describe(entry.kind, entry.mode, content));
  }
  return out;
}

for (const [name, build] of [
  ["the layered image (whiteout, opaque directory, uncompressed layer)", layeredImage],
  ["the busybox image", () => busyboxImage("expand")],
] as const) {
  test(`merged layer trees of ${name} match umoci unpack, file by file`, async (t) => {
    const image = await build();
    const bundle = join(root, `bundle-${image.tag}-${name.length}`);
    await run("umoci", ["unpack", "--image", `${image.layout}:${image.tag}`, bundle]);
    const expected = await describeRootfs(join(bundle, "rootfs"));

    const trees: Digest[] = [];
    for (const [i, layer] of (await manifestLayers(image)).entries()) {
      const started = performance.now();
      const { root: tree, stats } = await layerToTree(blobPath(image.layout, layer), layer.mediaType, SHA256, cas);
      t.diagnostic(
        `layer ${i}: ${layer.size} bytes, ${JSON.stringify(stats)}, ${(performance.now() - started).toFixed(1)} ms`,
      );
      trees.push(tree);
    }
    const merged = await mergeLayerTrees(SHA256, cas, trees);
    assert.deepEqual(await missingBlobsOfTree(SHA256, cas, merged), []);
    const actual = await describeTree(merged);

    const missing = [...expected.keys()].filter((p) => !actual.has(p));
    const extra = [...actual.keys()].filter((p) => !expected.has(p));
    assert.deepEqual({ missing, extra }, { missing: [], extra: [] });
    for (const [path, want] of expected) assert.equal(actual.get(path), want, path);

    const rootMode = Directory.decode((await cas.get(merged)) ?? Buffer.alloc(0)).nodeProperties?.unixMode;
    assert.equal(rootMode, hostMode((await lstat(join(bundle, "rootfs"))).mode), "the root directory's mode");
    if (image.marker === LAYERED_IMAGE.marker) {
      for (const path of Object.keys(LAYERED_IMAGE.present)) assert.ok(actual.has(path), path);
      for (const path of LAYERED_IMAGE.absent) assert.ok(!actual.has(path), path);
    }
  });
}
