import { createReadStream, readFileSync } from "node:fs";
import { lstat, readdir, readFile, readlink } from "node:fs/promises";
import { join } from "node:path";
import { type Digest, digestOf } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";

/** Files up to this size are hashed from one read; larger ones are streamed in chunks of this size. */
const WHOLE_READ_BYTES = 1024 * 1024;
/**
 * Files up to this size are read synchronously: readFile from node:fs/promises
 * is four thread-pool round trips (open, stat, read, close), each waiting to be
 * scheduled on a busy worker, for what one synchronous read does in microseconds.
 */
const SYNC_READ_BYTES = 64 * 1024;

function readWhole(path: string, size: number): Buffer | Promise<Buffer> {
  return size <= SYNC_READ_BYTES ? readFileSync(path) : readFile(path);
}

export async function hashFile(fn: DigestFunction, path: string, size: number): Promise<Digest> {
  const hasher = await fn.createHasher();
  // A read stream allocates a whole chunk for each read whatever the file's size: for the many small files of
  // a build (stdout, outputs) that was megabytes of short-lived memory per action, and frequent full GCs.
  if (size <= WHOLE_READ_BYTES) {
    hasher.update(await readWhole(path, size));
  } else {
    for await (const chunk of createReadStream(path, { highWaterMark: WHOLE_READ_BYTES }))
      hasher.update(chunk as Buffer);
  }
  return { fn, hash: hasher.digestHex(), sizeBytes: size };
}

/** A local file to upload, or bytes (an encoded Directory, a small file already read) in memory. */
export type LocalBlob = { digest: Digest; path: string } | { digest: Digest; data: Buffer };

/**
 * A file of `size` bytes as a blob to upload. One no larger than
 * `keepBytes` is read once, for its digest and its upload alike, and its
 * bytes kept; a larger one is hashed and named by its path.
 */
export async function fileBlob(fn: DigestFunction, path: string, size: number, keepBytes: number): Promise<LocalBlob> {
  if (size > keepBytes) return { digest: await hashFile(fn, path, size), path };
  const data = await readWhole(path, size);
  return { digest: await digestOf(fn, data), data };
}

/** The REAPI Merkle tree of a local directory. */
export interface LocalTree {
  rootDigest: Digest;
  root: Directory;
  /** Every directory below the root, once each (as a REAPI Tree lists them). */
  children: Directory[];
  /** Every file, and the encoding of every Directory including the root. */
  blobs: LocalBlob[];
}

/**
 * Walks `dir` into Directory messages, entries sorted by name as REAPI
 * requires; symlinks stay symlinks, other special files are left out.
 */
export async function readLocalTree(fn: DigestFunction, dir: string): Promise<LocalTree> {
  const blobs: LocalBlob[] = [];
  const children = new Map<string, Directory>();
  const visit = async (path: string): Promise<{ directory: Directory; digest: Digest }> => {
    const directory = Directory.fromPartial({});
    const entries = (await readdir(path, { withFileTypes: true })).sort((a, b) =>
      Buffer.compare(Buffer.from(a.name), Buffer.from(b.name)),
    );
    for (const entry of entries) {
      const full = join(path, entry.name);
      if (entry.isSymbolicLink()) {
        directory.symlinks.push({ name: entry.name, target: await readlink(full), nodeProperties: undefined });
      } else if (entry.isFile()) {
        const info = await lstat(full);
        const digest = await hashFile(fn, full, info.size);
        blobs.push({ digest, path: full });
        directory.files.push({
          name: entry.name,
          digest: { hash: digest.hash, sizeBytes: digest.sizeBytes },
          isExecutable: (info.mode & 0o111) !== 0,
          nodeProperties: undefined,
        });
      } else if (entry.isDirectory()) {
        const child = await visit(full);
        children.set(child.digest.hash, child.directory);
        directory.directories.push({
          name: entry.name,
          digest: { hash: child.digest.hash, sizeBytes: child.digest.sizeBytes },
        });
      }
    }
    const data = Buffer.from(Directory.encode(directory).finish());
    const digest = await digestOf(fn, data);
    blobs.push({ digest, data });
    return { directory, digest };
  };
  const root = await visit(dir);
  return { rootDigest: root.digest, root: root.directory, children: [...children.values()], blobs };
}
