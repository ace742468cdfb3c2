import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { execute, uploadBlobs } from "../../test/support/actions.js";
import { directoryBlob, sha256, type WireDigest } from "../../test/support/blobs.js";
import { type Clients, startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { uploadLargeBlob } from "../../test/support/large-blobs.js";
import { unaryCall, unpackDetails } from "../../test/support/rpc.js";
import type { BlobStore } from "../cas/blob-store.js";
import { DiskBlobStore } from "../cas/disk-blob-store.js";
import { DEFAULT_INPUT_TREE_LIMITS } from "../cas/tree-limits.js";
import { type Digest, digestKey, parseDigest } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { Action, Command, Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code, StatusError } from "../status/status.js";
import { CheckedDirectories, DEFAULT_CHECKED_DIRECTORY_BYTES } from "./checked-directories.js";
import { checkInputTree } from "./input-tree.js";

interface Blob {
  digest: WireDigest;
  data: Buffer;
}

const FILE = Buffer.from("shared\n");
const fileNode = (name: string) => ({ name, digest: sha256(FILE), isExecutable: false, nodeProperties: undefined });

/** Uploads `blobs`, a command running `true` and an action on `root`; returns the action digest. */
async function uploadTreeAction(clients: Clients, root: WireDigest, blobs: Blob[], salt: string): Promise<WireDigest> {
  const command = Buffer.from(Command.encode(Command.fromPartial({ arguments: ["true"] })).finish());
  const action = Buffer.from(
    Action.encode(
      Action.fromPartial({ commandDigest: sha256(command), inputRootDigest: root, salt: Buffer.from(salt) }),
    ).finish(),
  );
  await uploadBlobs(clients, [
    ...blobs,
    { digest: sha256(command), data: command },
    { digest: sha256(action), data: action },
  ]);
  return sha256(action);
}

/** `count` directories of `files` files each under one: the toolchain most actions of a build share. */
function sharedLibrary(count: number, files: number): { lib: Blob; blobs: Blob[] } {
  const blobs: Blob[] = [{ digest: sha256(FILE), data: FILE }];
  const children = [];
  for (let i = 0; i < count; i++) {
    const leaf = directoryBlob({
      files: Array.from({ length: files }, (_, j) => fileNode(`h${String(j).padStart(3, "0")}.h`)),
      // Each leaf differs, so that each is a Directory of its own.
      symlinks: [{ name: `self${i}`, target: ".", nodeProperties: undefined }],
    });
    blobs.push(leaf);
    children.push({ name: `d${String(i).padStart(3, "0")}`, digest: leaf.digest });
  }
  const lib = directoryBlob({ directories: children });
  blobs.push(lib);
  return { lib, blobs };
}

/** A chain a/b/c whose last directory is `last`; returns the blobs of the chain, root of the chain last. */
function chain(last: Partial<Directory>): Blob[] {
  const c = directoryBlob(last);
  const b = directoryBlob({ directories: [{ name: "c", digest: c.digest }] });
  const a = directoryBlob({ directories: [{ name: "b", digest: b.digest }] });
  return [c, b, a];
}

function notQueued(updates: { stage: number }[]): boolean {
  return !updates.some((u) => u.stage === 2 || u.stage === 3);
}

describe("Directory messages checked by an earlier Execute", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm({ execution: { inputLimits: { maxEntries: 300 } } }, undefined, {
      workers: 1,
      runImages: false,
    });
  });
  after(() => farm.close());

  test("a tree sharing a checked one's directories, with a bad name deep inside, is still refused naming it", async () => {
    const { lib, blobs } = sharedLibrary(10, 10);
    const good = chain({ files: [fileNode("f")] });
    const root = directoryBlob({
      directories: [
        { name: "a", digest: (good[2] as Blob).digest },
        { name: "lib", digest: lib.digest },
      ],
    });
    const first = await uploadTreeAction(farm.clients, root.digest, [...blobs, ...good, root], "first");
    const ran = await execute(farm.clients, first);
    assert.equal(ran.response.status?.code ?? 0, Code.OK, ran.response.status?.message);

    // The same tree, but a/b/c now holds a name with a slash: only c, b, a and the root are new.
    const bad = chain({ files: [fileNode("f"), fileNode("x/y")] });
    const badRoot = directoryBlob({
      directories: [
        { name: "a", digest: (bad[2] as Blob).digest },
        { name: "lib", digest: lib.digest },
      ],
    });
    const second = await uploadTreeAction(farm.clients, badRoot.digest, [...bad, badRoot], "second");
    const { response, updates } = await execute(farm.clients, second);
    assert.equal(response.status?.code, Code.INVALID_ARGUMENT, response.status?.message);
    assert.match(response.status?.message ?? "", /input directory "a\/b\/c"/);
    assert.match(response.status?.message ?? "", /"x\/y" contains "\/"/);
    assert.ok(notQueued(updates), "the action was queued");
  });

  test("a checked subtree's totals still count in full in every tree that names it", async () => {
    // 10 × (10 files + 1 link) + 10 directories = 120 entries below lib: a tree naming it once fits in 300.
    const { lib, blobs } = sharedLibrary(10, 10);
    const once = directoryBlob({ directories: [{ name: "lib", digest: lib.digest }] });
    const fits = await uploadTreeAction(farm.clients, once.digest, [...blobs, once], "once");
    const ran = await execute(farm.clients, fits);
    assert.equal(ran.response.status?.code ?? 0, Code.OK, ran.response.status?.message);

    const thrice = directoryBlob({
      directories: [
        { name: "lib1", digest: lib.digest },
        { name: "lib2", digest: lib.digest },
        { name: "lib3", digest: lib.digest },
      ],
    });
    const over = await uploadTreeAction(farm.clients, thrice.digest, [thrice], "thrice");
    const { response, updates } = await execute(farm.clients, over);
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
    assert.match(response.status?.message ?? "", /expands to 363 entries.*execution\.inputLimits\.maxEntries/);
    assert.ok(notQueued(updates), "the action was queued");
  });

  test("a checked subtree whose paths fit, put one level lower, makes a path too long, named in full", async () => {
    // 12 levels of 250-byte names and a file: 3,013 bytes, just under the farm's 3,072.
    const blobs: Blob[] = [{ digest: sha256(FILE), data: FILE }];
    let below = directoryBlob({ files: [fileNode("f")] });
    blobs.push(below);
    for (let i = 0; i < 12; i++) {
      below = directoryBlob({ directories: [{ name: "y".repeat(250), digest: below.digest }] });
      blobs.push(below);
    }
    const fits = await uploadTreeAction(farm.clients, below.digest, blobs, "long-fits");
    const ran = await execute(farm.clients, fits);
    assert.notEqual(ran.response.status?.code, Code.INVALID_ARGUMENT, ran.response.status?.message);

    const lower = directoryBlob({ directories: [{ name: "p".repeat(100), digest: below.digest }] });
    const over = await uploadTreeAction(farm.clients, lower.digest, [lower], "long-over");
    const { response } = await execute(farm.clients, over);
    assert.equal(response.status?.code, Code.INVALID_ARGUMENT, response.status?.message);
    assert.match(response.status?.message ?? "", /input path p{100}…y+\/f: is 3114 bytes long/);
  });
});

describe("the memory of checked directories under a client sending wide roots", () => {
  let farm: TestFarm;
  before(async () => {
    // Roots of 150,000 children are 12 MB Directory messages: allowed here, as an operator may (the default
    // keeps them below what a worker can fetch in one batch).
    farm = await startTestFarm(
      { execution: { checkedDirectoryCacheBytes: "16MiB", inputLimits: { maxDirectoryBytes: "16MiB" } } },
      undefined,
      { workers: 0 },
    );
  });
  after(() => farm.close());

  const empty = directoryBlob({});
  /** A root Directory of `count` child directories, all the empty Directory: 2 distinct blobs, every limit met. */
  const wideRoot = (count: number, prefix: string) =>
    directoryBlob({
      directories: Array.from({ length: count }, (_, i) => ({
        name: `${prefix}${String(i).padStart(6, "0")}`,
        digest: empty.digest,
      })),
    });
  /** Executes an action on `root` that no worker could run: the tree is checked in full, then refused. */
  const check = async (root: Blob, salt: string) => {
    const command = Buffer.from(Command.encode(Command.fromPartial({ arguments: ["true"] })).finish());
    const action = Buffer.from(
      Action.encode(
        Action.fromPartial({
          commandDigest: sha256(command),
          inputRootDigest: root.digest,
          salt: Buffer.from(salt),
          platform: { properties: [{ name: "pool", value: "nowhere" }] },
        }),
      ).finish(),
    );
    await uploadLargeBlob(farm.clients, root);
    await uploadBlobs(farm.clients, [
      empty,
      { digest: sha256(command), data: command },
      { digest: sha256(action), data: action },
    ]);
    return (await execute(farm.clients, sha256(action))).response;
  };

  test("never holds more than its cap of bytes, and still checks every tree", async () => {
    const memory = farm.farm.executor.checkedDirectories;
    const cap = 16 * 1024 * 1024;
    assert.equal(memory.capacityBytes, cap);
    // 150,000 children (12 MB of Directory, under maxDirectoryBytes): ~30 MB to remember, not remembered at all.
    for (const prefix of ["p", "q"]) {
      const response = await check(wideRoot(150_000, prefix), `wide-${prefix}`);
      assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
      assert.match(response.status?.message ?? "", /pool=nowhere/, "checked in full, then refused for its platform");
      assert.ok(memory.bytes <= cap, `${memory.bytes} bytes remembered`);
    }
    assert.ok(memory.bytes < 1024 * 1024, `a 150,000-child root was remembered: ${memory.bytes} bytes`);
    // 30 roots of 3,000 children (~600 KB each to remember, ~18 MB together): the oldest are forgotten.
    let remembered = 0;
    for (let i = 0; i < 30; i++) {
      const response = await check(wideRoot(3_000, `r${i}-`), `mid-${i}`);
      assert.match(response.status?.message ?? "", /pool=nowhere/, response.status?.message);
      assert.ok(memory.bytes <= cap, `${memory.bytes} bytes remembered after root ${i}`);
      remembered = Math.max(remembered, memory.bytes);
    }
    assert.ok(remembered > cap / 2, `only ${remembered} bytes were ever remembered`);
    assert.ok(memory.size < 31, `${memory.size} directories remembered: none was forgotten`);

    // Still checked: a wide root seen before passes again; one with a bad name among 150,000 is refused naming it.
    const again = await check(wideRoot(150_000, "p"), "wide-p-again");
    assert.match(again.status?.message ?? "", /pool=nowhere/, again.status?.message);
    const bad = wideRoot(150_000, "p");
    const decoded = Directory.decode(bad.data);
    (decoded.directories[149_999] as { name: string }).name = "..";
    const data = Buffer.from(Directory.encode(decoded).finish());
    const refused = await check({ digest: sha256(data), data }, "wide-bad");
    assert.equal(refused.status?.code, Code.INVALID_ARGUMENT, refused.status?.message);
    assert.match(refused.status?.message ?? "", /the input root.*"\.\."/);
  });
});

describe("a checked Directory evicted from the CAS", () => {
  let farm: TestFarm;
  before(async () => {
    // Every blob a file (no log below 16 MiB), no memory cache: eviction is what the disk store does.
    farm = await startTestFarm({ cas: { maxSizeBytes: 4 * 1024 * 1024, memoryCacheSizeBytes: 0 } }, undefined, {
      workers: 1,
      runImages: false,
    });
  });
  after(() => farm.close());

  test("is reported MISSING at Execute, before anything is queued", async () => {
    const sub = directoryBlob({ files: [fileNode("f")] });
    const root = directoryBlob({ directories: [{ name: "sub", digest: sub.digest }] });
    const first = await uploadTreeAction(
      farm.clients,
      root.digest,
      [{ digest: sha256(FILE), data: FILE }, sub, root],
      "before-eviction",
    );
    const ran = await execute(farm.clients, first);
    assert.equal(ran.response.status?.code ?? 0, Code.OK, ran.response.status?.message);

    // 6 MiB of other blobs through a 4 MiB CAS: the least recently used, sub among them, are evicted.
    for (let i = 0; i < 6; i++) {
      const data = randomBytes(1024 * 1024);
      await uploadBlobs(farm.clients, [{ digest: sha256(data), data }]);
    }
    const found = await unaryCall(farm.clients.cas.findMissingBlobs.bind(farm.clients.cas), {
      instanceName: "",
      blobDigests: [sub.digest],
      digestFunction: 0,
    });
    assert.equal(found.missingBlobDigests.length, 1, "sub was not evicted: the test proves nothing");

    // A new root naming the remembered sub, uploaded without it.
    const other = directoryBlob({ directories: [{ name: "sub", digest: sub.digest }], files: [fileNode("g")] });
    const second = await uploadTreeAction(
      farm.clients,
      other.digest,
      [{ digest: sha256(FILE), data: FILE }, other],
      "after-eviction",
    );
    const { response, updates } = await execute(farm.clients, second, { skipCacheLookup: true });
    assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
    const { preconditionFailure } = unpackDetails(response.status as never);
    assert.deepEqual(
      preconditionFailure?.violations.map((v) => [v.type, v.subject]),
      [["MISSING", `blobs/${sub.digest.hash}/${sub.digest.sizeBytes}`]],
    );
    assert.ok(notQueued(updates), "the action was queued: the worker, not Execute, found the blob missing");
  });
});

describe("checkInputTree with a memory of checked directories", () => {
  let dir: string;
  let store: DiskBlobStore;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "berth-checked-"));
    store = await DiskBlobStore.open(dir, { maxBytes: 1024 ** 3 });
  });
  after(async () => {
    store.close();
    await rm(dir, { recursive: true, force: true });
  });

  /** Counts the Directory messages a check reads: the store itself, counted. */
  function counting(): { cas: BlobStore; reads: () => number } {
    let reads = 0;
    const cas: BlobStore = {
      findMissing: (digests) => store.findMissing(digests),
      get: (digest) => {
        reads++;
        return store.get(digest);
      },
      openRead: (digest, offset, limit) => store.openRead(digest, offset, limit),
      put: (digest, data, options) => store.put(digest, data, options),
      createWriter: (digest) => store.createWriter(digest),
      adoptFile: (digest, path) => store.adoptFile(digest, path),
    };
    return { cas, reads: () => reads };
  }

  async function put(blobs: Blob[]): Promise<Digest> {
    for (const blob of blobs) await store.put(parseDigest(SHA256, blob.digest, "blob"), blob.data);
    return parseDigest(SHA256, (blobs.at(-1) as Blob).digest, "root");
  }

  test("reads again only the directories that changed, and gives the same totals as a check without it", async () => {
    const { lib, blobs } = sharedLibrary(50, 20);
    const treeOf = (leaf: string) => {
      const path = chain({ files: [fileNode(leaf)] });
      const root = directoryBlob({
        directories: [
          { name: "a", digest: (path[2] as Blob).digest },
          { name: "lib", digest: lib.digest },
        ],
      });
      return [...blobs, ...path, root];
    };
    const first = await put(treeOf("one"));
    const second = await put(treeOf("two"));
    const checked = new CheckedDirectories(DEFAULT_CHECKED_DIRECTORY_BYTES);

    const cold = counting();
    const totals = await checkInputTree(SHA256, cold.cas, first, DEFAULT_INPUT_TREE_LIMITS, checked);
    assert.equal(cold.reads(), 1 + 3 + 1 + 50);
    assert.equal(checked.size, 1 + 3 + 1 + 50);

    const again = counting();
    assert.deepEqual(await checkInputTree(SHA256, again.cas, first, DEFAULT_INPUT_TREE_LIMITS, checked), totals);
    assert.equal(again.reads(), 0);

    // One leaf differs: its directory, its two parents and the root are read; lib and its 50 are not.
    const changed = counting();
    const changedTotals = await checkInputTree(SHA256, changed.cas, second, DEFAULT_INPUT_TREE_LIMITS, checked);
    assert.equal(changed.reads(), 4);
    assert.deepEqual(changedTotals, await checkInputTree(SHA256, store, second, DEFAULT_INPUT_TREE_LIMITS));
  });

  test("a small memory forgets the least recently used and checks again what it forgot", async () => {
    // 200 leaves of about 340 bytes each cannot all fit in 32 KiB; lib (200 children, ~40 KB) is over 1/16 of it.
    const { lib, blobs } = sharedLibrary(200, 1);
    const root = await put([...blobs, directoryBlob({ directories: [{ name: "lib", digest: lib.digest }] })]);
    const checked = new CheckedDirectories(32 * 1024);
    const totals = await checkInputTree(SHA256, store, root, DEFAULT_INPUT_TREE_LIMITS, checked);
    assert.ok(checked.bytes <= 32 * 1024, `${checked.bytes} bytes`);
    assert.ok(checked.size > 10 && checked.size < 200, `${checked.size} remembered`);
    const again = counting();
    assert.deepEqual(await checkInputTree(SHA256, again.cas, root, DEFAULT_INPUT_TREE_LIMITS, checked), totals);
    // lib was never remembered, and the leaves forgotten are read again.
    assert.ok(again.reads() >= 2, `read ${again.reads()}`);
    assert.ok(checked.bytes <= 32 * 1024, `${checked.bytes} bytes`);
    // A store that lost the remembered root's blob: MISSING, from the memory's presence check.
    assert.ok(checked.get(digestKey(root)), "the root, checked last, is remembered");
    await store.remove(root);
    await assert.rejects(
      checkInputTree(SHA256, store, root, DEFAULT_INPUT_TREE_LIMITS, checked),
      (err: unknown) => err instanceof StatusError && err.code === Code.FAILED_PRECONDITION,
    );
  });
});
