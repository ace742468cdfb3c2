/**
 * The persistent-worker path with the worker's own components, as the worker's action path will wire it: a
 * Bazel 6 action uploaded to a real farm, its input tree and flagfile read back through the worker's RemoteCas,
 * its input root laid out by the worker's materializeInputRoot (file cache, Directory cache) in the sandboxed
 * process's own input root, emptied between actions.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { uploadBlobs } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { bazelWorkerAction } from "../../test/support/persistent-actions.js";
import { DEFAULT_INPUT_TREE_LIMITS } from "../cas/tree-limits.js";
import { type Digest, digestKey, digestOf } from "../digest/digest.js";
import { SHA256 } from "../digest/functions.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code, type StatusError } from "../status/status.js";
import type { ActionInputs } from "../worker/action-inputs.js";
import { DirectoryCache } from "../worker/directory-cache.js";
import { FileCache } from "../worker/file-cache.js";
import { materializeInputRoot } from "../worker/input-root.js";
import { RemoteCas } from "../worker/remote-cas.js";
import { BwrapLauncher } from "./bwrap-launcher.js";
import { type InputRootSource, persistentWorkerSpec } from "./persistent-action.js";
import { DEFAULT_WORKER_POOL_LIMITS, PersistentWorkerPool } from "./worker-pool.js";

let dir: string;
let farm: TestFarm;
let cas: RemoteCas;
let cache: FileCache;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "berth-persistent-farm-"));
  farm = await startTestFarm({}, join(dir, "farm"));
  cas = RemoteCas.connect(farm.address);
  cache = await FileCache.open(join(dir, "cache"), 1024 ** 3);
  await mkdir(join(dir, "workers"));
});
after(async () => {
  cas.close();
  await farm.close();
  await rm(dir, { recursive: true, force: true });
});

/** The input root as a worker holds it: the tree from one GetTree, files read from the CAS when asked. */
async function inputRootFromCas(root: Digest): Promise<InputRootSource> {
  const directories = new Map<string, Directory>();
  for (const directory of await cas.getTree(root)) {
    directories.set(digestKey(await digestOf(SHA256, Directory.encode(directory).finish())), directory);
  }
  return {
    fn: SHA256,
    root,
    directory: (digest) => directories.get(digestKey(digest)),
    readFile: async (digest) => {
      const data = (await cas.readBlobs([digest])).get(digest);
      if (!data) throw new Error(`${digest.hash} is not in the CAS`);
      return data;
    },
  };
}

/** The worker's input side, as an action's steps get it. */
function inputs(): ActionInputs {
  return { cas, files: cache, directories: new DirectoryCache(), owner: undefined, limits: DEFAULT_INPUT_TREE_LIMITS };
}

/** Uploads a Bazel 6 action and reads its spec back as a worker would; `prepare` lays out its input root. */
async function uploaded(requestArgs: string[], sources: Record<string, string>, name: string) {
  const built = await bazelWorkerAction({ requestArgs, sources, name, protocol: "json" });
  await uploadBlobs(farm.clients, [...built.blobs.values()]);
  const root: Digest = { fn: SHA256, ...(built.action.inputRootDigest as { hash: string; sizeBytes: number }) };
  const spec = await persistentWorkerSpec(built.action, built.command, await inputRootFromCas(root));
  assert.ok(spec);
  const prepare = async (inputRoot: string) => {
    // A reused process keeps its directory: what the previous action had there goes first.
    for (const entry of await readdir(inputRoot)) await rm(join(inputRoot, entry), { recursive: true, force: true });
    await materializeInputRoot(SHA256, root, inputRoot, inputs());
  };
  return { spec, prepare };
}

test("a Bazel 6 action from a real farm's CAS: spec read through RemoteCas, inputs laid out by the worker, one process for two actions", async () => {
  const pool = new PersistentWorkerPool(new BwrapLauncher(join(dir, "workers")), DEFAULT_WORKER_POOL_LIMITS);
  try {
    const first = await uploaded(["--try-read=pkg/one.txt"], { "pkg/one.txt": "one\n" }, "one");
    const second = await uploaded(
      ["--try-read=pkg/two.txt", "--try-read=pkg/one.txt"],
      { "pkg/two.txt": "two\n" },
      "two",
    );
    assert.equal(first.spec.key, second.spec.key, "one tool, one key");
    const a = JSON.parse((await pool.run(first.spec, { prepare: first.prepare })).stderr.toString());
    const b = JSON.parse((await pool.run(second.spec, { prepare: second.prepare })).stderr.toString());
    assert.deepEqual(a.probes, { "--try-read=pkg/one.txt": "ok" });
    // The second action sees its own input, and not the first action's.
    assert.deepEqual(b.probes, { "--try-read=pkg/two.txt": "ok", "--try-read=pkg/one.txt": "FileNotFoundError" });
    assert.deepEqual([a.count, b.count], [1, 2]);
    assert.ok("pkg/two.txt" in b.inputs && !("pkg/one.txt" in b.inputs));
  } finally {
    await pool.close();
  }
});

test("an input the CAS lacks fails the first request with FAILED_PRECONDITION, starting no process", async () => {
  const pool = new PersistentWorkerPool(new BwrapLauncher(join(dir, "workers")), DEFAULT_WORKER_POOL_LIMITS);
  try {
    const built = await bazelWorkerAction({
      requestArgs: ["x"],
      sources: { "pkg/gone.txt": "never uploaded\n" },
      name: "gone",
    });
    const missing = [...built.blobs.values()].filter((b) => b.data.toString() !== "never uploaded\n");
    await uploadBlobs(farm.clients, missing);
    const root: Digest = { fn: SHA256, ...(built.action.inputRootDigest as { hash: string; sizeBytes: number }) };
    const spec = await persistentWorkerSpec(built.action, built.command, await inputRootFromCas(root));
    assert.ok(spec);
    await assert.rejects(
      pool.run(spec, {
        prepare: (inputRoot) => materializeInputRoot(SHA256, root, inputRoot, inputs()),
      }),
      (err: StatusError) => {
        assert.equal(err.code, Code.FAILED_PRECONDITION);
        assert.equal(err.details.preconditionFailures?.[0]?.type, "MISSING");
        return true;
      },
    );
    assert.deepEqual(pool.processes(), []);
    assert.deepEqual(await readdir(join(dir, "workers")), [], "the process's input root is removed");
  } finally {
    await pool.close();
  }
});
