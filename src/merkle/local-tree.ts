import { closeSync, constants, fstatSync, lstatSync, openSync, read, readFileSync, type Stats } from "node:fs";
import { readdir, readlink } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { type Digest, digestOf } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";

/** Files up to this size are hashed from one read; larger ones are hashed in chunks of this size. */
const WHOLE_READ_BYTES = 1024 * 1024;
/**
 * Files up to this size are read synchronously: readFile from node:fs/promises
 * is four thread-pool round trips (open, stat, read, close), each waiting to be
 * scheduled on a busy worker, for what one synchronous read does in microseconds.
 */
const SYNC_READ_BYTES = 64 * 1024;
/**
 * Opens the file a path names itself, never a symlink's target (O_NOFOLLOW on
 * the last component), and never waits on a FIFO (O_NONBLOCK). The worker
 * reads an action's outputs as root: what it hashes must be the regular file
 * the action left, which fstat confirms on the open descriptor.
 */
const OPEN_FILE_ITSELF = constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK;

/** A regular file, opened as OPEN_FILE_ITSELF says; its fstat gives the size and mode to report. */
interface OpenFile {
  fd: number;
  info: Stats;
}

/** Synchronous, for the reason SYNC_READ_BYTES gives: an open and an fstat are microseconds. */
function openRegularFile(path: string): OpenFile {
  const fd = openSync(path, OPEN_FILE_ITSELF);
  try {
    const info = fstatSync(fd);
    if (!info.isFile()) throw new Error(`${path} is not a regular file`);
    return { fd, info };
  } catch (err) {
    closeSync(fd);
    throw err;
  }
}

const readAt = promisify(read);

/** Calls `each` with the file's bytes, chunk by chunk, from one reused buffer (each chunk is consumed at once). */
async function readChunks(file: OpenFile, each: (chunk: Buffer) => void): Promise<void> {
  const buffer = Buffer.allocUnsafe(Math.max(1, Math.min(file.info.size, WHOLE_READ_BYTES)));
  for (;;) {
    const { bytesRead } = await readAt(file.fd, buffer, 0, buffer.length, null);
    if (bytesRead === 0) return;
    each(buffer.subarray(0, bytesRead));
  }
}

/** The whole file, in one synchronous read when it is small. */
async function readWhole(file: OpenFile): Promise<Buffer> {
  if (file.info.size <= SYNC_READ_BYTES) return readFileSync(file.fd);
  const chunks: Buffer[] = [];
  await readChunks(file, (chunk) => chunks.push(Buffer.from(chunk)));
  return Buffer.concat(chunks);
}

/** The digest of an open file, read in one call when it is small. */
async function digestOfFile(fn: DigestFunction, file: OpenFile): Promise<Digest> {
  const hasher = await fn.createHasher();
  let bytes = 0;
  const hash = (chunk: Buffer) => {
    hasher.update(chunk);
    bytes += chunk.length;
  };
  // For the many small files of a build (stdout, outputs) a chunked read allocated a whole chunk each,
  // megabytes of short-lived memory per action.
  if (file.info.size <= SYNC_READ_BYTES) hash(readFileSync(file.fd));
  else await readChunks(file, hash);
  return { fn, hash: hasher.digestHex(), sizeBytes: bytes };
}

/** The digest of the regular file at `path` (see OPEN_FILE_ITSELF), with its fstat for the mode to report. */
export async function hashFile(fn: DigestFunction, path: string): Promise<{ digest: Digest; info: Stats }> {
  const file = openRegularFile(path);
  try {
    return { digest: await digestOfFile(fn, file), info: file.info };
  } finally {
    closeSync(file.fd);
  }
}

/** A local file to upload, or bytes (an encoded Directory, a small file already read) in memory. */
export type LocalBlob = { digest: Digest; path: string } | { digest: Digest; data: Buffer };

/**
 * The regular file at `path` (see OPEN_FILE_ITSELF) as a blob to upload, with
 * its fstat. One no larger than `keepBytes` is read once, for its digest and
 * its upload alike, and its bytes kept; a larger one is hashed and named by its
 * path (the upload reads it again, and the CAS checks those bytes against the digest).
 */
export async function fileBlob(
  fn: DigestFunction,
  path: string,
  keepBytes: number,
): Promise<{ blob: LocalBlob; info: Stats }> {
  const file = openRegularFile(path);
  try {
    if (file.info.size > keepBytes) {
      return { blob: { digest: await digestOfFile(fn, file), path }, info: file.info };
    }
    const data = await readWhole(file);
    return { blob: { digest: await digestOf(fn, data), data }, info: file.info };
  } finally {
    closeSync(file.fd);
  }
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
 * What a symlink met in a tree stands for, when it is to be read as what it
 * points to: `hostPath` must be made of real directories (its last component
 * a regular file or a real directory, as `stats`, lstat's, says), as
 * ContainedRoot hands them out. Undefined keeps the link as a symlink node.
 */
export type FollowSymlink = (target: string) => { hostPath: string; stats: Stats } | undefined;

/**
 * Walks `dir` into Directory messages, entries sorted by name as REAPI
 * requires; symlinks stay symlinks (recorded with their target, never
 * followed, so an output directory cannot bring in what a link points to),
 * other special files are left out. `dir` itself must be a real directory
 * reached through no symlink when what it holds is not trusted.
 *
 * `follow`, when given, may instead name what a link stands for (a file or a
 * directory, read in its place). A directory reached that way that is being
 * read already (a link to an ancestor) stays a link; each directory and file
 * is read once however many links lead to it, so links cannot make the walk
 * longer than the tree they point into.
 */
export async function readLocalTree(fn: DigestFunction, dir: string, follow?: FollowSymlink): Promise<LocalTree> {
  const blobs: LocalBlob[] = [];
  const children = new Map<string, Directory>();
  /** Directories and files already read, by device and inode (only links can lead to one twice). */
  const readDirectories = new Map<string, { directory: Directory; digest: Digest }>();
  const readFiles = new Map<string, { digest: Digest; executable: boolean }>();
  /** The directories being read, from `dir` down. */
  const reading = new Set<string>();
  const addFile = async (directory: Directory, name: string, path: string, known?: Stats) => {
    const key = known && inode(known);
    let read = key === undefined ? undefined : readFiles.get(key);
    if (!read) {
      const { digest, info } = await hashFile(fn, path);
      read = { digest, executable: (info.mode & 0o111) !== 0 };
      readFiles.set(inode(info), read);
      blobs.push({ digest, path });
    }
    directory.files.push({
      name,
      digest: { hash: read.digest.hash, sizeBytes: read.digest.sizeBytes },
      isExecutable: read.executable,
      nodeProperties: undefined,
    });
  };
  const addDirectory = async (directory: Directory, name: string, path: string) => {
    const child = await visit(path);
    children.set(child.digest.hash, child.directory);
    directory.directories.push({
      name,
      digest: { hash: child.digest.hash, sizeBytes: child.digest.sizeBytes },
    });
  };
  const visit = async (path: string, known?: Stats): Promise<{ directory: Directory; digest: Digest }> => {
    const key = inode(known ?? lstatSync(path));
    const done = readDirectories.get(key);
    if (done) return done;
    reading.add(key);
    const directory = Directory.fromPartial({});
    const entries = (await readdir(path, { withFileTypes: true })).sort((a, b) =>
      Buffer.compare(Buffer.from(a.name), Buffer.from(b.name)),
    );
    for (const entry of entries) {
      const full = join(path, entry.name);
      if (entry.isSymbolicLink()) {
        const target = await readlink(full);
        const followed = follow?.(target);
        if (followed?.stats.isFile()) {
          await addFile(directory, entry.name, followed.hostPath, followed.stats);
        } else if (followed?.stats.isDirectory() && !reading.has(inode(followed.stats))) {
          await addDirectory(directory, entry.name, followed.hostPath);
        } else {
          directory.symlinks.push({ name: entry.name, target, nodeProperties: undefined });
        }
      } else if (entry.isFile()) {
        await addFile(directory, entry.name, full);
      } else if (entry.isDirectory()) {
        await addDirectory(directory, entry.name, full);
      }
    }
    const data = Buffer.from(Directory.encode(directory).finish());
    const digest = await digestOf(fn, data);
    blobs.push({ digest, data });
    reading.delete(key);
    const read = { directory, digest };
    readDirectories.set(key, read);
    return read;
  };
  const root = await visit(dir);
  return { rootDigest: root.digest, root: root.directory, children: [...children.values()], blobs };
}

function inode(info: Stats): string {
  return `${info.dev}:${info.ino}`;
}
