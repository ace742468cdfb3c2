import type { BlobStore } from "../cas/blob-store.js";
import { type Digest, digestKey, parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { childDigest, decodeDirectory, readDirectory } from "./directories.js";

export interface TreeEntry {
  /** Relative to the root, "/"-joined, no leading slash. */
  path: string;
  kind: "file" | "directory" | "symlink";
  /** Permission bits, from node_properties.unix_mode when present. */
  mode?: number;
  executable?: boolean;
  /** The file's content, or the directory's Directory message. */
  digest?: Digest;
  target?: string;
}

const FIND_MISSING_BATCH = 1000;

/** Every entry below `root`, parents before their children; NOT_FOUND if a Directory is missing. */
export async function listTree(fn: DigestFunction, cas: BlobStore, root: Digest): Promise<TreeEntry[]> {
  const entries: TreeEntry[] = [];
  const decoded = new Map<string, Directory>();
  const visit = async (digest: Digest, prefix: string): Promise<void> => {
    const key = digestKey(digest);
    let directory = decoded.get(key);
    if (directory === undefined) {
      directory = await readDirectory(cas, digest, "directory");
      decoded.set(key, directory);
    }
    for (const file of directory.files) {
      entries.push({
        path: prefix + file.name,
        kind: "file",
        ...modeOf(file.nodeProperties?.unixMode),
        executable: file.isExecutable,
        digest: childDigest(fn, file.digest, digest, file.name),
      });
    }
    for (const symlink of directory.symlinks) {
      entries.push({ path: prefix + symlink.name, kind: "symlink", target: symlink.target });
    }
    for (const dir of directory.directories) {
      const child = childDigest(fn, dir.digest, digest, dir.name);
      const entry: TreeEntry = { path: prefix + dir.name, kind: "directory", digest: child };
      entries.push(entry);
      const message = decoded.get(digestKey(child)) ?? (await readDirectory(cas, child, "directory"));
      decoded.set(digestKey(child), message);
      Object.assign(entry, modeOf(message.nodeProperties?.unixMode));
      await visit(child, `${entry.path}/`);
    }
  };
  await visit(root, "");
  return entries;
}

function modeOf(unixMode: number | undefined): { mode?: number } {
  return unixMode === undefined ? {} : { mode: unixMode };
}

/**
 * Every blob of the tree (Directory messages and files) that `cas` lacks,
 * each once; [] when the tree is complete. A missing Directory is reported
 * and not descended, since what it holds is unknown.
 */
export async function missingBlobsOfTree(fn: DigestFunction, cas: BlobStore, root: Digest): Promise<Digest[]> {
  const missing: Digest[] = [];
  const seen = new Set<string>([digestKey(root)]);
  const queue: Digest[] = [root];
  const files: Digest[] = [];
  for (let head = 0; head < queue.length; head++) {
    const digest = queue[head] as Digest;
    const bytes = await cas.get(digest);
    if (bytes === undefined) {
      missing.push(digest);
      continue;
    }
    const directory = decodeDirectory(bytes, digest, "directory");
    for (const file of directory.files) {
      const content = parseDigest(fn, file.digest, `directory entry ${JSON.stringify(file.name)}`);
      const key = digestKey(content);
      if (!seen.has(key)) {
        seen.add(key);
        files.push(content);
      }
    }
    for (const dir of directory.directories) {
      const child = childDigest(fn, dir.digest, digest, dir.name);
      const key = digestKey(child);
      if (!seen.has(key)) {
        seen.add(key);
        queue.push(child);
      }
    }
  }
  for (let i = 0; i < files.length; i += FIND_MISSING_BATCH) {
    missing.push(...(await cas.findMissing(files.slice(i, i + FIND_MISSING_BATCH))));
  }
  return missing;
}
