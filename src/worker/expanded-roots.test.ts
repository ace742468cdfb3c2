import assert from "node:assert/strict";
import { lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { uploadBlobs } from "../../test/support/actions.js";
import { sha256, type WireDigest } from "../../test/support/blobs.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { type DirNode, dir, encodeTree, file, graft, symlink } from "../../test/support/trees.js";
import { type Digest, parseDigest } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { Code, StatusError } from "../status/status.js";
import { DirectoryCache } from "./directory-cache.js";
import { ExpandedRoots, graftedInputRoot } from "./expanded-roots.js";
import { FileCache } from "./file-cache.js";
import { RemoteCas } from "./remote-cas.js";

let farm: TestFarm;
let cas: RemoteCas;
let workDir: string;
let files: FileCache;
let directories: DirectoryCache;

before(async () => {
  farm = await startTestFarm();
  cas = RemoteCas.connect(farm.address);
  workDir = await mkdtemp(join(tmpdir(), "berth-expanded-roots-"));
  files = await FileCache.open(join(workDir, "cache"), 1024 ** 3);
  directories = new DirectoryCache();
});
after(async () => {
  cas?.close();
  await farm?.close();
  if (workDir) await rm(workDir, { recursive: true, force: true });
});

const asRoot = process.getuid?.() === 0;

/** Uploads `tree` (all of it, or all but the files `skip` names) and returns its root digest. */
async function upload(tree: DirNode, skip: WireDigest[] = []): Promise<Digest> {
  const { root, blobs } = encodeTree(tree);
  const skipped = new Set(skip.map((d) => d.hash));
  await uploadBlobs(
    farm.clients,
    blobs.filter((b) => !skipped.has(b.digest.hash)),
  );
  return parseDigest(SHA256, root, "root");
}

/** A small tree whose content differs with `tag`, with about `size` bytes of files. */
function smallTree(tag: string, size = 1000): DirNode {
  return dir({ etc: dir({ marker: file(`${tag}\n`), pad: file(Buffer.alloc(size - tag.length - 1, tag)) }) });
}

async function openStore(name: string, maxBytes: number): Promise<ExpandedRoots> {
  return ExpandedRoots.open(join(workDir, name), { maxBytes });
}

describe("ExpandedRoots", () => {
  test("lays out files (read-only hard links of the file cache), symlinks as they are, and the directories' unix_mode", async () => {
    const store = await openStore("layout", 1024 ** 2);
    const root = await upload(
      dir(
        {
          bin: dir({ tool: file("#!/bin/sh\necho tool\n", true), sh: symlink("tool"), abs: symlink("/etc/marker") }),
          etc: dir({ marker: file("layout\n") }),
          tmp: dir({}, 0o1777),
          private: dir({ deep: dir({}) }, 0o700),
          run: dir({ berth: dir({ execroot: dir() }) }),
        },
        0o755,
      ),
    );
    const acquired = await store.acquire(SHA256, root, cas, files, directories);
    try {
      assert.equal(await readFile(join(acquired.dir, "etc", "marker"), "utf8"), "layout\n");
      const tool = await stat(join(acquired.dir, "bin", "tool"));
      assert.equal(tool.mode & 0o7777, 0o555);
      assert.equal((await stat(join(acquired.dir, "etc", "marker"))).mode & 0o7777, 0o444);
      // A hard link of the file cache's copy, not a copy of its own.
      assert.ok(tool.nlink >= 2);
      assert.equal(await readlink(join(acquired.dir, "bin", "sh")), "tool");
      assert.equal(await readlink(join(acquired.dir, "bin", "abs")), "/etc/marker");
      // Tamed for the host (hostMode): no group or other write, the sticky bit kept.
      assert.equal((await lstat(join(acquired.dir, "tmp"))).mode & 0o7777, 0o1755);
      assert.equal((await lstat(join(acquired.dir, "private"))).mode & 0o7777, 0o700);
      assert.equal((await lstat(join(acquired.dir, "private", "deep"))).mode & 0o7777, 0o755);
      assert.deepEqual(await readdir(join(acquired.dir, "run", "berth", "execroot")), []);
      if (asRoot) assert.equal((await lstat(join(acquired.dir, "etc"))).uid, 0);
      // Only the worker reaches the trees: a 1777 directory in one must not open it to the host's users.
      assert.equal((await stat(join(workDir, "layout"))).mode & 0o777, 0o700);
      assert.equal(store.usedBytes, "#!/bin/sh\necho tool\n".length + "layout\n".length);
    } finally {
      await acquired.release();
    }
  });

  test("a root is materialized once: concurrent acquires share it, later ones reuse it", async () => {
    const store = await openStore("once", 1024 ** 2);
    const root = await upload(smallTree("once"));
    const [first, second] = await Promise.all([
      store.acquire(SHA256, root, cas, files, directories),
      store.acquire(SHA256, root, cas, files, directories),
    ]);
    assert.equal(store.materializations, 1);
    assert.equal(first.dir, second.dir);
    const inode = (await stat(first.dir)).ino;
    await Promise.all([first.release(), second.release()]);
    const third = await store.acquire(SHA256, root, cas, files, directories);
    assert.equal(store.materializations, 1);
    assert.equal((await stat(third.dir)).ino, inode);
    await third.release();
    // Releasing twice is harmless.
    await third.release();
  });

  test("past maxBytes the least recently used unpinned root is evicted, a pinned one never", async () => {
    // Room for two roots of 1000 bytes, not three.
    const store = await openStore("evict", 2500);
    const [a, b, c] = await Promise.all(["evict-a", "evict-b", "evict-c"].map((tag) => upload(smallTree(tag))));
    const rootA = a as Digest;
    const rootB = b as Digest;
    const rootC = c as Digest;
    const heldA = await store.acquire(SHA256, rootA, cas, files, directories);
    const heldB = await store.acquire(SHA256, rootB, cas, files, directories);
    await heldB.release();
    // A is pinned and B is not: C's arrival evicts B, although A was used before it.
    const heldC = await store.acquire(SHA256, rootC, cas, files, directories);
    assert.ok(store.has(rootA));
    assert.ok(!store.has(rootB));
    assert.ok(store.has(rootC));
    assert.equal(store.usedBytes, 2000);
    await assert.rejects(stat(heldB.dir), { code: "ENOENT" });
    // Both pinned, B's return passes the cap for as long as they are held.
    const heldB2 = await store.acquire(SHA256, rootB, cas, files, directories);
    assert.equal(store.materializations, 4);
    assert.equal(store.usedBytes, 3000);
    assert.equal(await readFile(join(heldA.dir, "etc", "marker"), "utf8"), "evict-a\n");
    assert.equal(await readFile(join(heldC.dir, "etc", "marker"), "utf8"), "evict-c\n");
    await heldC.release();
    // C, the least recently used unpinned root, goes once released.
    assert.ok(!store.has(rootC));
    await assert.rejects(stat(heldC.dir), { code: "ENOENT" });
    assert.ok(store.has(rootA) && store.has(rootB));
    await Promise.all([heldA.release(), heldB2.release()]);
    assert.equal(store.usedBytes, 2000);
  });

  test("missing blobs are FAILED_PRECONDITION with a MISSING violation each, and leave nothing behind", async () => {
    const store = await openStore("missing", 1024 ** 2);
    const absent = file("never uploaded\n");
    const tree = dir({ etc: dir({ absent, present: file("present\n") }) });
    const root = await upload(tree, [sha256(absent.content)]);
    const failure = await store.acquire(SHA256, root, cas, files, directories).then(
      () => assert.fail("acquired a root with a missing blob"),
      (err: unknown) => err,
    );
    assert.ok(failure instanceof StatusError);
    assert.equal(failure.code, Code.FAILED_PRECONDITION);
    const missing = sha256(absent.content);
    assert.deepEqual(
      failure.details.preconditionFailures?.map((v) => [v.type, v.subject]),
      [["MISSING", `blobs/${missing.hash}/${missing.sizeBytes}`]],
    );
    assert.ok(!store.has(root));
    assert.deepEqual(await readdir(join(workDir, "missing", "tmp")), []);
    assert.deepEqual(await readdir(join(workDir, "missing", "roots")), []);
    // Once the blob is there, the same root materializes.
    await upload(tree);
    const acquired = await store.acquire(SHA256, root, cas, files, directories);
    assert.equal(await readFile(join(acquired.dir, "etc", "absent"), "utf8"), "never uploaded\n");
    await acquired.release();
  });

  test("a tree whose files alone pass the cap is RESOURCE_EXHAUSTED", async () => {
    const store = await openStore("too-big", 100);
    const root = await upload(smallTree("too-big"));
    await assert.rejects(store.acquire(SHA256, root, cas, files, directories), { code: Code.RESOURCE_EXHAUSTED });
    assert.ok(!store.has(root));
  });

  test("reopened, the store keeps complete roots and deletes half-written ones", async () => {
    const name = "reopen";
    const first = await openStore(name, 1024 ** 2);
    const root = await upload(smallTree("reopen"));
    const acquired = await first.acquire(SHA256, root, cas, files, directories);
    const inode = (await stat(acquired.dir)).ino;
    await acquired.release();
    // What a crash could leave: a tree being laid out in tmp/, and a directory in roots/ without its record.
    await mkdir(join(workDir, name, "tmp", "half", "tree", "etc"), { recursive: true });
    await mkdir(join(workDir, name, "roots", "sha256-unfinished-1", "tree"), { recursive: true });
    await writeFile(join(workDir, name, "roots", "sha256-unfinished-1", "tree", "x"), "x");

    const second = await openStore(name, 1024 ** 2);
    assert.ok(second.has(root));
    assert.equal(second.usedBytes, 1000);
    assert.deepEqual(await readdir(join(workDir, name, "tmp")), []);
    assert.deepEqual(await readdir(join(workDir, name, "roots")), [`sha256-${root.hash}-${root.sizeBytes}`]);
    const again = await second.acquire(SHA256, root, cas, files, directories);
    assert.equal(second.materializations, 0);
    assert.equal((await stat(again.dir)).ino, inode);
    await again.release();
  });
});

describe("graftedInputRoot", () => {
  const base = dir({
    etc: dir({ marker: file("graft\n") }),
    run: dir({ berth: dir({ execroot: dir(), other: dir({ kept: file("kept\n") }) }) }),
  });
  const client = dir({ "input.txt": file("input\n") });

  test("finds the client's input root at input_root_path", async () => {
    const baseRoot = await upload(base);
    const merged = await upload(graft(base, "run/berth/execroot", client));
    const clientRoot = parseDigest(SHA256, encodeTree(client).root, "client");
    const found = await graftedInputRoot(SHA256, merged, baseRoot, "/run/berth/execroot", cas, directories);
    assert.deepEqual(found, clientRoot);
  });

  test("a tree that is not the base with the input grafted, or a base with no empty directory there, is INVALID_ARGUMENT", async () => {
    const baseRoot = await upload(base);
    const changed = graft(graft(base, "run/berth/execroot", client), "etc", dir({ marker: file("changed\n") }));
    await assert.rejects(
      graftedInputRoot(SHA256, await upload(changed), baseRoot, "/run/berth/execroot", cas, directories),
      (err: unknown) =>
        err instanceof StatusError && err.code === Code.INVALID_ARGUMENT && /\/ differs/.test(err.message),
    );
    const merged = await upload(graft(base, "run/berth/execroot", client));
    await assert.rejects(
      graftedInputRoot(SHA256, merged, baseRoot, "/run/berth/absent", cas, directories),
      (err: unknown) =>
        err instanceof StatusError && err.code === Code.INVALID_ARGUMENT && /no directory/.test(err.message),
    );
    // The base's directory at the path must be the empty placeholder.
    await assert.rejects(
      graftedInputRoot(SHA256, baseRoot, baseRoot, "/run/berth/other", cas, directories),
      (err: unknown) => err instanceof StatusError && err.code === Code.INVALID_ARGUMENT && /empty/.test(err.message),
    );
  });
});
