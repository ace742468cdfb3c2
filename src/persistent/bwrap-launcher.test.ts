import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { bazelWorkerAction } from "../../test/support/persistent-actions.js";
import { INPUT_ROOT_MOUNT } from "../sandbox/bubblewrap.js";
import { BwrapLauncher } from "./bwrap-launcher.js";
import { type PersistentWorkerSpec, persistentWorkerSpec } from "./persistent-action.js";
import { DEFAULT_WORKER_POOL_LIMITS, PersistentWorkerPool } from "./worker-pool.js";

interface Echo {
  count: number;
  cwd: string;
  arguments: string[];
  probes: Record<string, string>;
  children: number[];
}

let dir: string;
let baseDir: string;
let secretDir: string;
before(async () => {
  // Outside /tmp, which the sandbox covers with its own tmpfs anyway: what hides the other input roots and the
  // secrets must be the launcher's own doing.
  dir = await mkdtemp(join("/var/tmp", "berth-persistent-bwrap-"));
  baseDir = join(dir, "workers");
  secretDir = join(dir, "secrets");
  await mkdir(baseDir);
  await mkdir(secretDir);
  await writeFile(join(secretDir, "worker-token"), "not for actions\n");
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function work(requestArgs: string[], protocol: "json" | "proto" = "json", startupArgs: string[] = []) {
  const built = await bazelWorkerAction({ requestArgs, protocol, startupArgs });
  const spec = (await persistentWorkerSpec(built.action, built.command, built.inputs)) as PersistentWorkerSpec;
  return { spec, prepare: built.writeInputRoot };
}

function echo(stderr: Buffer): Echo {
  return JSON.parse(stderr.toString()) as Echo;
}

test("a worker process in bwrap answers both protocols from its input root at the sandbox's path, and is reused", async () => {
  const pool = new PersistentWorkerPool(new BwrapLauncher(baseDir), DEFAULT_WORKER_POOL_LIMITS);
  try {
    for (const protocol of ["json", "proto"] as const) {
      const counts: number[] = [];
      const pids = new Set<number>();
      for (const n of [1, 2]) {
        const { spec, prepare } = await work([`request ${n}`], protocol);
        const result = await pool.run(spec, { prepare });
        const answer = echo(result.stderr);
        assert.equal(answer.cwd, INPUT_ROOT_MOUNT);
        assert.deepEqual(answer.arguments, [`request ${n}`]);
        counts.push(answer.count);
        pids.add(result.pid);
      }
      assert.deepEqual(counts, [1, 2]);
      assert.equal(pids.size, 1);
    }
  } finally {
    await pool.close();
  }
});

test("a hostile worker in bwrap writes only its own input root and /tmp, and reads no other input root nor the hidden secrets", async () => {
  const launcher = new BwrapLauncher(baseDir, { hide: [secretDir] });
  const pool = new PersistentWorkerPool(launcher, DEFAULT_WORKER_POOL_LIMITS);
  try {
    // Another worker process of another key, whose input root holds its inputs.
    const other = await work(["--sleep=0"], "json", ["--tool=other"]);
    await pool.run(other.spec, { prepare: other.prepare });
    const [otherRoot] = (await readdir(baseDir)).map((name) => join(baseDir, name));
    assert.ok(otherRoot && existsSync(join(otherRoot, "bazel-out")));

    const probes = [
      `--try-read=${join(otherRoot, "bazel-out/k8-fastbuild/bin/pkg/out-0.params")}`,
      `--try-read=${join(secretDir, "worker-token")}`,
      `--try-write=${join(otherRoot, "planted")}`,
      `--try-write=${join(dir, "planted")}`,
      "--try-write=/etc/planted",
      "--try-write=/tmp/planted",
      `--try-write=${INPUT_ROOT_MOUNT}/planted`,
      "--try-read=/etc/hostname",
    ];
    const { spec, prepare } = await work(probes, "json", ["--tool=hostile"]);
    const answer = echo((await pool.run(spec, { prepare })).stderr);
    assert.deepEqual(answer.probes, {
      [probes[0] as string]: "FileNotFoundError",
      [probes[1] as string]: "FileNotFoundError",
      [probes[2] as string]: "FileNotFoundError",
      // Below the sandbox's /tmp (a tmpfs of its own, where bwrap made the hidden mount points): not the host's.
      [probes[3] as string]: dir.startsWith("/tmp/") ? "ok" : "OSError",
      [probes[4] as string]: "OSError",
      [probes[5] as string]: "ok",
      [probes[6] as string]: "ok",
      [probes[7] as string]: "ok",
    });
    assert.equal(existsSync(join(otherRoot, "planted")), false);
    assert.equal(existsSync(join(dir, "planted")), false);
    assert.equal(existsSync("/etc/planted"), false);
    assert.equal(existsSync("/tmp/planted"), false, "its /tmp is its own");
  } finally {
    await pool.close();
  }
  assert.deepEqual(await readdir(baseDir), [], "every input root is removed with its process");
});

test("close() ends a sandboxed worker and what it left in the background", async () => {
  const pool = new PersistentWorkerPool(new BwrapLauncher(baseDir), DEFAULT_WORKER_POOL_LIMITS);
  const { spec, prepare } = await work(["--background"], "proto");
  const result = await pool.run(spec, { prepare });
  assert.equal(echo(result.stderr).children.length, 1);
  const before = await sandboxedSleeps();
  assert.ok(before.length >= 1, "the background sleep runs");
  await pool.close();
  for (let i = 0; i < 200 && (await sandboxedSleeps()).some((pid) => before.includes(pid)); i++) {
    await new Promise((r) => setTimeout(r, 10));
  }
  assert.deepEqual(
    (await sandboxedSleeps()).filter((pid) => before.includes(pid)),
    [],
  );
  assert.equal(existsSync(`/proc/${result.pid}`), false);
});

/** Host pids of live `sleep 3600` processes (the sandbox's own pids differ). */
async function sandboxedSleeps(): Promise<number[]> {
  const pids: number[] = [];
  for (const name of await readdir("/proc")) {
    if (!/^[0-9]+$/.test(name)) continue;
    try {
      const cmdline = await readFile(`/proc/${name}/cmdline`, "utf8");
      const stat = await readFile(`/proc/${name}/stat`, "utf8");
      if (cmdline === "sleep\x003600\x00" && stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z") pids.push(Number(name));
    } catch {
      // Gone meanwhile.
    }
  }
  return pids;
}
