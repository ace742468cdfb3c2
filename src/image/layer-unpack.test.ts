import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";
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
import { StatusError } from "../status/status.js";
import { type UnpackLimits, unpackLayer } from "./layer-unpack.js";
import { WhiteoutMaker } from "./whiteout.js";

const run = promisify(execFile);
let root: string;
let whiteouts: WhiteoutMaker;
let counter = 0;

before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-unpack-"));
  whiteouts = new WhiteoutMaker(join(root, "whiteout"));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

/** Unpacks `entries` into a fresh directory beside an empty `sentinel` directory. */
async function unpack(
  entries: LayerEntry[] | ((sentinel: string) => LayerEntry[]),
  compression: Compression = "none",
  limits?: Partial<UnpackLimits>,
) {
  const base = join(root, `case-${++counter}`);
  const sentinel = join(base, "sentinel");
  await mkdir(sentinel, { recursive: true });
  const layer = await writeLayer(base, typeof entries === "function" ? entries(sentinel) : entries, compression);
  const dest = join(base, "store", "layer");
  await mkdir(join(base, "store"));
  const result = unpackLayer(layer.path, layer.descriptor.mediaType, dest, { whiteouts, limits });
  return { base, dest, sentinel, result };
}

const mtime = new Date(1_500_000_000_000);

const tree: LayerEntry[] = [
  { name: "./", type: "directory", mode: 0o755 },
  { name: "bin/", type: "directory", mode: 0o711, uid: 12, gid: 34, mtime },
  { name: "bin/tool", content: "#!/bin/sh\necho hi\n", mode: 0o4755, uid: 12, gid: 34, mtime },
  { name: "etc/config", content: "a=1\n", mode: 0o640 },
  { name: "etc/link", type: "symlink", linkname: "/nowhere/at/all", uid: 5, gid: 6, mtime },
  { name: "etc/hard", type: "link", linkname: "etc/config" },
  { name: "dev/", type: "directory" },
  { name: "dev/null", type: "character-device", mode: 0o666 },
  { name: "dev/fifo", type: "fifo" },
  { name: "bin/", type: "directory", mode: 0o750, uid: 12, gid: 34, mtime },
];

for (const compression of ["none", "gzip", "zstd"] as const) {
  test(`unpacks files, directories, modes, owners, times and links from a ${compression} layer`, async () => {
    const { dest, result } = await unpack(tree, compression);
    const stats = await result;
    assert.deepEqual(stats, { entries: 10, files: 2, bytes: 22, whiteouts: 0, opaqueDirs: 0, skipped: 2 });
    const tool = await stat(join(dest, "bin/tool"));
    assert.equal(tool.mode & 0o7777, 0o755, "no set-user-ID bit on the host");
    assert.deepEqual([tool.uid, tool.gid, tool.mtimeMs], [12, 34, mtime.getTime()]);
    assert.equal(await readFile(join(dest, "bin/tool"), "utf8"), "#!/bin/sh\necho hi\n");
    const bin = await stat(join(dest, "bin"));
    assert.equal(bin.mode & 0o7777, 0o750, "a second entry for a directory updates its mode");
    assert.equal(bin.mtimeMs, mtime.getTime(), "directory times are set after their contents");
    assert.equal((await stat(join(dest, "etc/config"))).mode & 0o777, 0o640);
    assert.equal(await readlink(join(dest, "etc/link")), "/nowhere/at/all");
    const link = await lstat(join(dest, "etc/link"));
    assert.deepEqual([link.uid, link.gid, link.mtimeMs], [5, 6, mtime.getTime()]);
    assert.equal((await stat(join(dest, "etc/hard"))).ino, (await stat(join(dest, "etc/config"))).ino);
    assert.deepEqual(await readdir(join(dest, "dev")), [], "devices and FIFOs are skipped");
  });
}

test("sniffs the compression when the media type says otherwise", async () => {
  const base = join(root, "sniff");
  await mkdir(base);
  const path = join(base, "blob");
  await writeFile(path, gzipSync(await makeLayer([{ name: "f", content: "x" }])));
  await unpackLayer(path, MEDIA_TYPES.none, join(base, "out"), { whiteouts });
  assert.equal(await readFile(join(base, "out/f"), "utf8"), "x");
  await assert.rejects(
    unpackLayer(path, "application/vnd.oci.image.config.v1+json", join(base, "out2"), { whiteouts }),
    /unsupported layer media type/,
  );
});

test("a later entry replaces what an earlier one left at its path", async () => {
  const { dest, result } = await unpack([
    { name: "a/b", content: "in a dir" },
    { name: "a", content: "now a file" },
    { name: "c", type: "symlink", linkname: "a" },
    { name: "c/", type: "directory" },
    { name: "c/d", content: "inside a real c" },
  ]);
  await result;
  assert.equal(await readFile(join(dest, "a"), "utf8"), "now a file");
  assert.ok((await lstat(join(dest, "c"))).isDirectory());
  assert.equal(await readFile(join(dest, "c/d"), "utf8"), "inside a real c");
});

test("writes whiteouts as 0/0 character devices and opaque directories as an xattr", async () => {
  const { dest, result } = await unpack([
    { name: "gone/", type: "directory" },
    { name: "gone/.wh.file", content: "" },
    { name: ".wh.dir", content: "" },
    { name: "kept", content: "mine" },
    { name: ".wh.kept", content: "" },
    { name: "opaque/.wh..wh..opq", content: "" },
    { name: "opaque/new", content: "n" },
    { name: ".wh..wh.plnk", type: "directory" },
  ]);
  const stats = await result;
  assert.equal(stats.whiteouts, 2);
  assert.equal(stats.opaqueDirs, 1);
  for (const path of ["gone/file", "dir"]) {
    const info = await lstat(join(dest, path));
    assert.ok(info.isCharacterDevice() && info.rdev === 0, path);
  }
  assert.equal(await readFile(join(dest, "kept"), "utf8"), "mine", "a whiteout spares its own layer");
  const { stdout } = await run("getfattr", ["--absolute-names", "-n", "trusted.overlay.opaque", join(dest, "opaque")]);
  assert.match(stdout, /trusted.overlay.opaque="y"/);
  assert.deepEqual((await readdir(dest)).sort(), ["dir", "gone", "kept", "opaque"]);
});

for (const [what, entries, message] of MALICIOUS_LAYERS) {
  test(`refuses ${what} and leaves nothing behind`, async () => {
    const { dest, sentinel, result } = await unpack(entries);
    const err = await result.then(
      () => assert.fail("unpacked"),
      (e: unknown) => e,
    );
    assert.ok(err instanceof StatusError);
    assert.match(err.message, message);
    assert.equal(err.code, 3);
    await assert.rejects(lstat(dest), { code: "ENOENT" });
    assert.deepEqual(await readdir(join(dest, "..")), []);
    assert.deepEqual(await readdir(sentinel), []);
  });
}

test("refuses corrupted and truncated blobs", async () => {
  const cases = await corruptLayerBlobs();
  for (const { data, mediaType, message } of cases) {
    const base = join(root, `corrupt-${++counter}`);
    await mkdir(base);
    await writeFile(join(base, "blob"), data);
    await assert.rejects(unpackLayer(join(base, "blob"), mediaType, join(base, "out"), { whiteouts }), message);
    assert.deepEqual(await readdir(base), ["blob"]);
  }
});

test("refuses tar bombs past the configured limits", async () => {
  const many = Array.from({ length: 20 }, (_, i) => ({ name: `f${i}`, content: "" }));
  const tooMany = await unpack(many, "gzip", { maxEntries: 10 });
  await assert.rejects(tooMany.result, { code: 9, message: /more than 10 entries \(images.maxLayerEntries\)/ });
  const big = await unpack(
    [
      { name: "a", content: "x".repeat(600) },
      { name: "b", content: "y".repeat(600) },
    ],
    "zstd",
    {
      maxBytes: 1000,
    },
  );
  await assert.rejects(big.result, { code: 9, message: /more than 1000 bytes of files \(images.maxLayerBytes\)/ });
  // Headers that lie do not help: the decompressed stream is capped too.
  const base = join(root, "bomb");
  await mkdir(base);
  await writeFile(join(base, "blob"), gzipSync(Buffer.alloc(64 * 1024 * 1024)));
  await assert.rejects(
    unpackLayer(join(base, "blob"), MEDIA_TYPES.gzip, join(base, "out"), {
      whiteouts,
      limits: { maxBytes: 1024 * 1024, maxEntries: 10 },
    }),
    /decompresses to more than/,
  );
  assert.deepEqual(await readdir(base), ["blob"]);
});
