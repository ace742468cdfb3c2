import { chown, link, mkdir, symlink } from "node:fs/promises";
import { join } from "node:path";
import { checkDirectory } from "../cas/directory-tree.js";
import { type Digest, digestKey, digestOf, parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { missingBlobs } from "../status/status.js";
import type { DirectoryCache } from "./directory-cache.js";
import { describeMissing, type FileCache } from "./file-cache.js";
import type { RemoteCas } from "./remote-cas.js";

/** Who owns the directories of an action's tree, so its unprivileged user can write there. */
export interface TreeOwner {
  uid: number;
  gid: number;
}

/**
 * Lays out the input root `root` in `target`: directories are created (and
 * given to the action's user), files hard-linked from the file cache,
 * symlinks created as they are. Every missing blob is reported at once, as
 * FAILED_PRECONDITION with one MISSING violation each.
 */
export async function materializeInputRoot(
  fn: DigestFunction,
  root: Digest,
  target: string,
  cas: RemoteCas,
  cache: FileCache,
  directoryCache: DirectoryCache,
  owner: TreeOwner | undefined,
): Promise<void> {
  const directories = await fetchDirectories(fn, root, cas, directoryCache);
  const files: { path: string; digest: Digest; executable: boolean }[] = [];
  const symlinks: { path: string; target: string }[] = [];
  const dirs: string[] = [target];
  const walk = (digest: Digest, path: string) => {
    const directory = directories.get(digestKey(digest)) as Directory;
    for (const file of directory.files) {
      const fileDigest = parseDigest(fn, file.digest, `${path}/${file.name}`);
      files.push({ path: join(path, file.name), digest: fileDigest, executable: file.isExecutable });
    }
    for (const link of directory.symlinks) symlinks.push({ path: join(path, link.name), target: link.target });
    for (const child of directory.directories) {
      const childPath = join(path, child.name);
      dirs.push(childPath);
      walk(parseDigest(fn, child.digest, childPath), childPath);
    }
  };
  walk(root, target);
  const { missing, release } = await cache.ensure(cas, files);
  try {
    if (missing.length > 0) throw missingBlobs(describeMissing(missing));
    await layOut(dirs, files, symlinks, cache, owner);
  } finally {
    release();
  }
}

/** Makes the directories (each depth at once), links the cached files and makes the symlinks. */
async function layOut(
  dirs: string[],
  files: { path: string; digest: Digest; executable: boolean }[],
  symlinks: { path: string; target: string }[],
  cache: FileCache,
  owner: TreeOwner | undefined,
): Promise<void> {
  // Parents come before their children in `dirs`, so each depth can be made at once.
  const byDepth = new Map<number, string[]>();
  for (const dir of dirs) {
    const depth = dir.split("/").length;
    const same = byDepth.get(depth);
    if (same) same.push(dir);
    else byDepth.set(depth, [dir]);
  }
  for (const depth of [...byDepth.keys()].sort((a, b) => a - b)) {
    await Promise.all(
      (byDepth.get(depth) as string[]).map(async (dir) => {
        await mkdir(dir, { recursive: true, mode: 0o755 });
        if (owner) await chown(dir, owner.uid, owner.gid);
      }),
    );
  }
  await Promise.all(files.map((f) => link(cache.pathOf(f.digest, f.executable), f.path)));
  await Promise.all(symlinks.map((s) => symlink(s.target, s.path)));
}

/**
 * Every Directory of the tree by key. A root the worker has not seen comes
 * in one GetTree call instead of one round trip per level; directories seen
 * before come from `known`. Whatever GetTree could not supply (a client
 * whose encoding differs from the server's re-encoding hashes differently)
 * is read level by level in batches.
 */
async function fetchDirectories(
  fn: DigestFunction,
  root: Digest,
  cas: RemoteCas,
  known: DirectoryCache,
): Promise<Map<string, Directory>> {
  if (!known.get(digestKey(root))) {
    for (const directory of await cas.getTree(root)) {
      const digest = await digestOf(fn, Directory.encode(directory).finish());
      known.set(digestKey(digest), directory);
    }
  }
  const found = new Map<string, Directory>();
  let level: Digest[] = [root];
  while (level.length > 0) {
    const absent: Digest[] = [];
    for (const digest of level) {
      const directory = known.get(digestKey(digest));
      if (directory) found.set(digestKey(digest), directory);
      else absent.push(digest);
    }
    const blobs = await cas.readBlobs(absent);
    const missing = absent.filter((d) => !blobs.has(d));
    if (missing.length > 0) throw missingBlobs(describeMissing(missing));
    for (const [digest, bytes] of blobs) {
      const directory = Directory.decode(bytes);
      checkDirectory(directory, digest);
      known.set(digestKey(digest), directory);
      found.set(digestKey(digest), directory);
    }
    const next = new Map<string, Digest>();
    for (const digest of level) {
      const directory = found.get(digestKey(digest)) as Directory;
      for (const child of directory.directories) {
        const childDigest = parseDigest(fn, child.digest, `directory ${child.name}`);
        const key = digestKey(childDigest);
        if (!found.has(key)) next.set(key, childDigest);
      }
    }
    level = [...next.values()];
  }
  return found;
}
