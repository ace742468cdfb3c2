import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomUUID } from "node:crypto";
import { chmod, mkdir, mkdtemp, readdir, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";
import { byteStreamUpload, execute, readBlob, uploadAction, uploadBlobs } from "../../test/support/actions.js";
import { randomBlob } from "../../test/support/blobs.js";
import { type Clients, connect, type ServerProcess, spawnBerth } from "../../test/support/farm.js";

const run = promisify(execFile);
let parent: string;
let data: string;
let berth: ServerProcess;
let clients: Clients;

before(async () => {
  // A parent any local user may traverse, and a data directory an earlier version left open.
  parent = await mkdtemp(join(tmpdir(), "berth-private-data-"));
  await chmod(parent, 0o755);
  data = join(parent, "data");
  await mkdir(join(data, "cas"), { recursive: true, mode: 0o755 });
  await chmod(data, 0o755);
  await chmod(join(data, "cas"), 0o755);
  berth = await spawnBerth(["--data-dir", data, "--workers", "1"]);
  clients = connect(berth.address);
});
after(async () => {
  clients?.close();
  await berth?.stop();
  await rm(parent, { recursive: true, force: true });
});

/** Runs `command` as uid/gid 65534 (nobody) without supplementary groups: exit code and output. */
async function asNobody(command: string[]): Promise<{ code: number; output: string }> {
  try {
    const { stdout, stderr } = await run("setpriv", [
      "--reuid=65534",
      "--regid=65534",
      "--clear-groups",
      "--",
      ...command,
    ]);
    return { code: 0, output: stdout + stderr };
  } catch (err) {
    const failed = err as { code: number; stdout: string; stderr: string };
    return { code: failed.code, output: failed.stdout + failed.stderr };
  }
}

test("the data directory is root's alone under an open parent: an action and a local user read nothing of it, and the action still reads its inputs", async () => {
  const secret = randomBlob(200_000);
  await byteStreamUpload(clients, secret);
  // A Command with a registry password, say: a small blob, in the log.
  await uploadBlobs(clients, [randomBlob(300)]);
  const blobPath = join(data, "cas", "files", "sha256", secret.digest.hash.slice(0, 2), `${secret.digest.hash}-200000`);
  const logDir = join(data, "cas", "log");
  const [segment] = await readdir(logDir);
  const logPath = join(logDir, segment as string);

  // The action sees the host's file system read-only, as an unprivileged user: it tries the farm's data.
  const probe = (path: string) => `if cat ${path} >/dev/null 2>&1; then echo read ${path}; else echo denied; fi`;
  const digest = await uploadAction(clients, {
    args: ["/bin/sh", "-c", ["cat input.txt", probe(logPath), probe(blobPath), `ls ${data} || echo denied`].join("; ")],
    files: { "input.txt": "the action's own input\n" },
    salt: randomUUID(),
  });
  const { response } = await execute(clients, digest);
  assert.equal(response.status?.code ?? 0, 0, response.status?.message);
  const stdout = await readBlob(clients, response.result?.stdoutDigest);
  assert.equal(stdout, "the action's own input\ndenied\ndenied\ndenied\n");

  // A local user: nothing below the data directory, however open its own mode.
  for (const path of [blobPath, logPath]) {
    const attempt = await asNobody(["cat", path]);
    assert.notEqual(attempt.code, 0, `uid 65534 read ${path}: ${attempt.output}`);
    assert.match(attempt.output, /Permission denied/);
  }
  assert.match((await asNobody(["ls", data])).output, /Permission denied/);

  // Closed at the top, and what the server writes is private even below it.
  assert.equal((await stat(data)).mode & 0o777, 0o700);
  assert.equal((await stat(join(data, "cas"))).mode & 0o077, 0, "an existing subdirectory left open is closed too");
  for (const path of [blobPath, logPath]) assert.equal((await stat(path)).mode & 0o077, 0, path);
  const { stdout: open } = await run("find", [data, "-maxdepth", "1", "-perm", "/o+rwx"]);
  assert.equal(open, "", "nothing at the top of the data directory lets others in");
  // The worker's file cache keeps files the sandbox user may read (hard links share their mode).
  const cached = await readdir(join(data, "worker", "cache"), { recursive: true, withFileTypes: true });
  const cachedFile = cached.find((e) => e.isFile());
  assert.ok(cachedFile, "the input went through the worker's file cache");
  assert.equal((await stat(join(cachedFile.parentPath ?? cachedFile.path, cachedFile.name))).mode & 0o444, 0o444);
});
