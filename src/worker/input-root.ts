import { chown, link, mkdir, symlink } from "node:fs/promises";
import { join } from "node:path";
import { checkDirectory } from "../cas/directory-tree.js";
import { type Digest, digestKey, parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { missingBlobs } from "../status/status.js";
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
  owner: TreeOwner | undefined,
): Promise<void> {
  const directories = await fetchDirectories(fn, root, cas);
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
  const missing = await cache.ensure(cas, files);
  if (missing.length > 0) throw missingBlobs(describeMissing(missing));
  for (const dir of dirs) {
    await mkdir(dir, { recursive: true, mode: 0o755 });
    if (owner) await chown(dir, owner.uid, owner.gid);
  }
  await Promise.all(files.map((f) => link(cache.pathOf(f.digest, f.executable), f.path)));
  await Promise.all(symlinks.map((s) => symlink(s.target, s.path)));
}

/** Every Directory of the tree by key, fetched level by level in batches. */
async function fetchDirectories(fn: DigestFunction, root: Digest, cas: RemoteCas): Promise<Map<string, Directory>> {
  const found = new Map<string, Directory>();
  let level: Digest[] = [root];
  while (level.length > 0) {
    const blobs = await cas.readBlobs(level);
    const absent = level.filter((d) => !blobs.has(d));
    if (absent.length > 0) throw missingBlobs(describeMissing(absent));
    const next = new Map<string, Digest>();
    for (const [digest, bytes] of blobs) {
      const directory = Directory.decode(bytes);
      checkDirectory(directory, digest);
      found.set(digestKey(digest), directory);
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
