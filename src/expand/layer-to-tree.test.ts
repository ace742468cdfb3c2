import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdir, mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { gzipSync } from "node:zlib";
import {
  type Compression,
  corruptLayerBlobs,
  type LayerEntry,
  MALICIOUS_LAYERS,
  MEDIA_TYPES,
  makeLayer,
  writeLayer,
} from "../../test/support/layers.js";
import { SHA256 } from "../digest/functions.js";
import type { UnpackLimits } from "../image/layer-unpack.js";
import { StatusError } from "../status/status.js";
import { type LayerToTreeOptions, layerToTree } from "./layer-to-tree.js";
import { type CountingBlobStore, openTestCas } from "./test-cas.js";
import { listTree, missingBlobsOfTree, type TreeEntry } from "./tree-listing.js";

let root: string;
let cas: CountingBlobStore;
let counter = 0;

before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-layer-tree-"));
  ({ cas } = await openTestCas(root));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

async function convert(
  entries: LayerEntry[],
  compression: Compression = "none",
  options: LayerToTreeOptions & { limits?: Partial<UnpackLimits> } = {},
) {
  const base = join(root, `case-${++counter}`);
  await mkdir(base);
  const layer = await writeLayer(base, entries, compression);
  return layerToTree(layer.path, layer.descriptor.mediaType, SHA256, cas, options);
}

async function listing(rootDigest: Awaited<ReturnType<typeof convert>>["root"]): Promise<Map<string, TreeEntry>> {
  assert.deepEqual(await missingBlobsOfTree(SHA256, cas, rootDigest), [], "every blob of the tree is stored");
  return new Map((await listTree(SHA256, cas, rootDigest)).map((e) => [e.path, e]));
}

function sha256(content: string | Buffer): string {
  return createHash("sha256").update(content).digest("hex");
}

const tree: LayerEntry[] = [
  { name: "./", type: "directory", mode: 0o755 },
  { name: "bin/", type: "directory", mode: 0o711, uid: 12, gid: 34 },
  { name: "bin/tool", content: "#!/bin/sh\necho hi\n", mode: 0o4755, uid: 12, gid: 34 },
  { name: "etc/config", content: "a=1\n", mode: 0o640 },
  { name: "etc/link", type: "symlink", linkname: "/nowhere/at/all" },
  { name: "etc/hard", type: "link", linkname: "etc/config" },
  { name: "dev/", type: "directory" },
  { name: "dev/null", type: "character-device", mode: 0o666 },
  { name: "dev/fifo", type: "fifo" },
  { name: "bin/", type: "directory", mode: 0o750, uid: 12, gid: 34 },
];

for (const compression of ["none", "gzip", "zstd"] as const) {
  test(`converts files, directories, modes and links of a ${compression} layer`, async () => {
    const { root: digest, stats } = await convert(tree, compression);
    assert.deepEqual(stats, {
      entries: 10,
      files: 2,
      bytes: 22,
      directories: 4,
      symlinks: 1,
      whiteouts: 0,
      skipped: 2,
    });
    const entries = await listing(digest);
    assert.deepEqual([...entries.keys()].sort(), [
      "bin",
      "bin/tool",
      "dev",
      "etc",
      "etc/config",
      "etc/hard",
      "etc/link",
    ]);
    const tool = entries.get("bin/tool");
    assert.equal(tool?.mode, 0o755, "no set-user-ID bit in the stored tree");
    assert.equal(tool?.executable, true);
    assert.equal(tool?.digest?.hash, sha256("#!/bin/sh\necho hi\n"));
    assert.equal(entries.get("bin")?.mode, 0o750, "a second entry for a directory updates its mode");
    assert.equal(entries.get("etc")?.mode, 0o755, "a missing parent is implied");
    const config = entries.get("etc/config");
    assert.deepEqual([config?.mode, config?.executable, config?.digest?.hash], [0o640, false, sha256("a=1\n")]);
    const hard = entries.get("etc/hard");
    assert.deepEqual([hard?.mode, hard?.digest], [0o640, config?.digest], "a hard link is the same file again");
    assert.deepEqual(entries.get("etc/link"), { path: "etc/link", kind: "symlink", target: "/nowhere/at/all" });
  });
}

test("gives equal layers one digest whatever their owners and times", async () => {
  const a = await convert([{ name: "f", content: "x", uid: 1, mtime: new Date(1) }]);
  const b = await convert([{ name: "f", content: "x", uid: 2, mtime: new Date(2) }], "gzip");
  assert.deepEqual(a.root, b.root);
});

test("sniffs the compression when the media type says otherwise", async () => {
  const base = join(root, "sniff");
  await mkdir(base);
  const path = join(base, "blob");
  await writeFile(path, gzipSync(await makeLayer([{ name: "f", content: "x" }])));
  const { root: digest } = await layerToTree(path, MEDIA_TYPES.none, SHA256, cas);
  assert.equal((await listing(digest)).get("f")?.digest?.hash, sha256("x"));
  await assert.rejects(
    layerToTree(path, "application/vnd.oci.image.config.v1+json", SHA256, cas),
    /unsupported layer media type/,
  );
});

test("a later entry replaces what an earlier one left at its path", async () => {
  const { root: digest } = await convert([
    { name: "a/b", content: "in a dir" },
    { name: "a", content: "now a file" },
    { name: "c", type: "symlink", linkname: "a" },
    { name: "c/", type: "directory" },
    { name: "c/d", content: "inside a real c" },
    { name: "e/f", content: "kept" },
    { name: "e/", type: "directory", mode: 0o700 },
  ]);
  const entries = await listing(digest);
  assert.deepEqual([...entries.keys()].sort(), ["a", "c", "c/d", "e", "e/f"]);
  assert.equal(entries.get("a")?.digest?.hash, sha256("now a file"));
  assert.equal(entries.get("c")?.kind, "directory");
  assert.equal(entries.get("e")?.mode, 0o700, "a directory entry over a directory keeps its children");
});

test("keeps whiteouts and opaque markers as empty files, skips other AUFS metadata", async () => {
  const { root: digest, stats } = await convert([
    { name: "gone/", type: "directory" },
    { name: "gone/.wh.file", content: "" },
    { name: ".wh.dir", content: "" },
    { name: "kept", content: "mine" },
    { name: ".wh.kept", content: "" },
    { name: "opaque/.wh..wh..opq", content: "" },
    { name: "opaque/new", content: "n" },
    { name: ".wh..wh.plnk", type: "directory" },
  ]);
  assert.equal(stats.whiteouts, 4);
  assert.equal(stats.skipped, 1);
  const entries = await listing(digest);
  assert.deepEqual([...entries.keys()].sort(), [
    ".wh.dir",
    ".wh.kept",
    "gone",
    "gone/.wh.file",
    "kept",
    "opaque",
    "opaque/.wh..wh..opq",
    "opaque/new",
  ]);
  for (const path of [".wh.dir", "gone/.wh.file", "opaque/.wh..wh..opq"]) {
    assert.deepEqual([entries.get(path)?.kind, entries.get(path)?.digest?.sizeBytes], ["file", 0], path);
  }
});

test("sorts names by their UTF-8 bytes, as REAPI asks", async () => {
  const names = ["b", "B", "a", "é", "\u{1F600}", "\uFFFD", "z.txt", "z"];
  const { root: digest } = await convert(names.map((name) => ({ name: `d/${name}`, content: name })));
  const listed = (await listTree(SHA256, cas, digest)).filter((e) => e.path.startsWith("d/")).map((e) => e.path);
  const expected = names.map((n) => `d/${n}`).sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
  assert.deepEqual(listed, expected);
  // missingBlobsOfTree runs checkDirectory over every Directory.
  assert.deepEqual(await missingBlobsOfTree(SHA256, cas, digest), []);
});

const malicious: [string, LayerEntry[], RegExp][] = [
  // Mount mode's cases, and those only a tree can get wrong.
  ...MALICIOUS_LAYERS.map(([what, entries, message]): [string, LayerEntry[], RegExp] => [
    what,
    entries("/tmp/sentinel"),
    message,
  ]),
  [
    "an entry below a file",
    [
      { name: "f", content: "a file" },
      { name: "f/x", content: "below it" },
    ],
    /"f\/x": its parent "f" is not a directory/,
  ],
  [
    "a hard link to a directory",
    [
      { name: "d/", type: "directory" },
      { name: "h", type: "link", linkname: "d" },
    ],
    /"h": hard link target "d" is not an earlier file of this layer/,
  ],
  [
    "a hard link to a whiteout",
    [
      { name: ".wh.x", content: "" },
      { name: "h", type: "link", linkname: ".wh.x" },
    ],
    /"h": hard link target "\.wh\.x" is not an earlier file/,
  ],
  ["a whiteout of nothing", [{ name: "d/.wh.", content: "" }], /"d\/\.wh\.": is a whiteout of no file/],
  ["a symlink to nothing", [{ name: "s", type: "symlink", linkname: "" }], /"s": is a symlink to nothing/],
  ["a file named like the root", [{ name: "./", content: "x", type: "file" }], /names the layer root/],
];

for (const [what, entries, message] of malicious) {
  test(`refuses ${what}, as mount mode does`, async () => {
    const writesBefore = cas.writes;
    const err = await convert(entries).then(
      () => assert.fail("converted"),
      (e: unknown) => e,
    );
    assert.ok(err instanceof StatusError);
    assert.match(err.message, message);
    assert.equal(err.code, 3);
    assert.equal(cas.writes, writesBefore, "nothing of a refused layer is stored");
  });
}

test("refuses corrupted and truncated blobs", async () => {
  const cases = await corruptLayerBlobs();
  for (const { data, mediaType, message } of cases) {
    const path = join(root, `corrupt-${++counter}`);
    await writeFile(path, data);
    const err = await layerToTree(path, mediaType, SHA256, cas).then(
      () => assert.fail("converted"),
      (e: unknown) => e,
    );
    assert.ok(err instanceof StatusError, String(err));
    assert.equal(err.code, 3);
    assert.match(err.message, message);
  }
});

test("refuses tar bombs past the configured limits", async () => {
  const many = Array.from({ length: 20 }, (_, i) => ({ name: `f${i}`, content: "" }));
  await assert.rejects(convert(many, "gzip", { limits: { maxEntries: 10 } }), {
    code: 9,
    message: /more than 10 entries \(images.maxLayerEntries\)/,
  });
  const big = [
    { name: "a", content: "x".repeat(600) },
    { name: "b", content: "y".repeat(600) },
  ];
  await assert.rejects(convert(big, "zstd", { limits: { maxBytes: 1000 } }), {
    code: 9,
    message: /more than 1000 bytes of files \(images.maxLayerBytes\)/,
  });
  const path = join(root, "bomb");
  await writeFile(path, gzipSync(Buffer.alloc(64 * 1024 * 1024)));
  await assert.rejects(
    layerToTree(path, MEDIA_TYPES.gzip, SHA256, cas, { limits: { maxBytes: 1024 * 1024, maxEntries: 10 } }),
    {
      code: 9,
      message:
        /decompresses to more than [0-9]+ bytes of tar \(images\.maxLayerBytes, with room for the headers of images\.maxLayerEntries entries\)/,
    },
  );
});

test("spools large files through tempDir, and a second conversion writes nothing", async () => {
  const spool = join(root, "spool");
  await mkdir(spool);
  const large = Buffer.alloc(3 * 1024 * 1024 + 17, "large");
  const entries: LayerEntry[] = [
    { name: "big", content: large, mode: 0o755 },
    { name: "big-again", content: large },
    ...Array.from({ length: 300 }, (_, i) => ({ name: `small/${i % 7}/${i}`, content: `file ${i}` })),
  ];
  const base = join(root, "twice");
  await mkdir(base);
  const layer = await writeLayer(base, entries, "gzip");
  const options = { tempDir: spool, maxMemoryFileBytes: 1024 * 1024 };
  const before = cas.writers;
  const first = await layerToTree(layer.path, layer.descriptor.mediaType, SHA256, cas, options);
  assert.equal(cas.writers - before, 1, "one streamed upload for the two identical large files");
  assert.deepEqual(await readdir(spool), [], "temporary files are removed");
  const listed = await listing(first.root);
  assert.equal(listed.get("big")?.digest?.hash, sha256(large));
  assert.equal(listed.get("big")?.executable, true);
  assert.equal(listed.get("big-again")?.executable, false);

  const writesBefore = cas.writes;
  const second = await layerToTree(layer.path, layer.descriptor.mediaType, SHA256, cas, options);
  assert.deepEqual(second.root, first.root);
  assert.equal(cas.writes - writesBefore, 0, "no put and no createWriter for a layer already stored");
  await assert.rejects(convert([{ name: "big", content: large }], "none", { maxMemoryFileBytes: 1024 }), /tempDir/);
});

test("reports the blob bytes read as it goes", async () => {
  const content = randomBytes(2 * 1024 * 1024);
  const base = join(root, "progress");
  await mkdir(base);
  const layer = await writeLayer(base, [{ name: "f", content }], "gzip");
  const seen: number[] = [];
  await layerToTree(layer.path, layer.descriptor.mediaType, SHA256, cas, { onProgress: (n) => seen.push(n) });
  assert.ok(seen.length > 1, `${seen.length} reports`);
  assert.deepEqual(
    seen,
    [...seen].sort((a, b) => a - b),
  );
  assert.equal(seen.at(-1), layer.descriptor.size);
});
