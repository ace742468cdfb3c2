import type { BlobStore } from "../cas/blob-store.js";
import { checkDirectory } from "../cas/directory-tree.js";
import { type Digest, digestOf, formatDigest, parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import {
  Directory,
  type NodeProperties,
  type Digest as WireDigest,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { hostMode } from "../image/host-mode.js";
import { imageModeProperty } from "../image/open-directories.js";
import { invalidArgument, notFound } from "../status/status.js";

/** An encoded Directory message with its digest, ready to be stored. */
export interface EncodedBlob {
  digest: Digest;
  data: Uint8Array;
}

export const WHITEOUT_PREFIX = ".wh.";
export const OPAQUE_MARKER = ".wh..wh..opq";

export function wire(digest: Digest): WireDigest {
  return { hash: digest.hash, sizeBytes: digest.sizeBytes };
}

/**
 * Only the permission bits, tamed as mount mode tames them on disk (no setuid/setgid, no group or other
 * write: see hostMode): owners and times would stop identical trees from sharing digests.
 */
export function modeProperties(mode: number): NodeProperties {
  return { properties: [], mtime: undefined, unixMode: hostMode(mode) };
}

/**
 * A directory's: modeProperties, and the image's own mode when taming changed it (berth.image-mode), which
 * workers give the directory in each action's own overlay upper layer (see image/open-directories.ts).
 */
export function directoryProperties(mode: number): NodeProperties {
  return { ...modeProperties(mode), properties: imageModeProperty(mode) };
}

/**
 * Order of the names' UTF-8 encodings, which REAPI requires, without
 * encoding them: UTF-16 code units order as code points do except that
 * surrogates (U+D800–DFFF) must sort after U+E000–FFFF.
 */
export function compareNames(a: string, b: string): number {
  const length = Math.min(a.length, b.length);
  for (let i = 0; i < length; i++) {
    let x = a.charCodeAt(i);
    let y = b.charCodeAt(i);
    if (x === y) continue;
    if (x >= 0xd800 && y >= 0xd800) {
      x = x < 0xe000 ? x + 0x2000 : x - 0x800;
      y = y < 0xe000 ? y + 0x2000 : y - 0x800;
    }
    return x - y;
  }
  return a.length - b.length;
}

/** Sorts each list of `directory` in place, then encodes and hashes it. */
export async function encodeDirectory(fn: DigestFunction, directory: Directory): Promise<EncodedBlob> {
  directory.files.sort((a, b) => compareNames(a.name, b.name));
  directory.directories.sort((a, b) => compareNames(a.name, b.name));
  directory.symlinks.sort((a, b) => compareNames(a.name, b.name));
  const data = Directory.encode(directory).finish();
  return { digest: await digestOf(fn, data), data };
}

/** A Directory read from the CAS and checked; NOT_FOUND naming `what` when it is not stored. */
export async function readDirectory(cas: BlobStore, digest: Digest, what: string): Promise<Directory> {
  const bytes = await cas.get(digest);
  if (!bytes) throw notFound(`${what} ${formatDigest(digest)} is not in the CAS`);
  return decodeDirectory(bytes, digest, what);
}

/** A Directory message, checked as REAPI asks (sorted, unique, plain names); INVALID_ARGUMENT otherwise. */
export function decodeDirectory(bytes: Uint8Array, digest: Digest, what: string): Directory {
  let directory: Directory;
  try {
    directory = Directory.decode(bytes);
  } catch (err) {
    throw invalidArgument(`${what} ${formatDigest(digest)}`, `is not a Directory message: ${(err as Error).message}`);
  }
  checkDirectory(directory, digest);
  return directory;
}

/** The digest a child node names, validated against the tree's digest function. */
export function childDigest(fn: DigestFunction, raw: WireDigest | undefined, parent: Digest, name: string): Digest {
  return parseDigest(fn, raw, `directory ${formatDigest(parent)} entry ${JSON.stringify(name)}`);
}
