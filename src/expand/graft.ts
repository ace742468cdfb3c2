import type { BlobStore } from "../cas/blob-store.js";
import type { Digest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { invalidArgument } from "../status/status.js";
import { childDigest, encodeDirectory, modeProperties, readDirectory, wire } from "./directories.js";
import { MissingBlobUploader } from "./missing-blob-uploader.js";

const CREATED_DIRECTORY_MODE = 0o755;

/**
 * base = `imageRoot` with (empty) directories along `path`, created where
 * the image has none; merged = base with `inputRoot` as the directory at
 * `path`. Both are stored in `cas`. The image must leave the place free:
 * a non-directory on the way, or a non-empty directory at `path`, is
 * INVALID_ARGUMENT naming what is in the way.
 */
export async function graftInputRoot(
  fn: DigestFunction,
  cas: BlobStore,
  imageRoot: Digest,
  inputRoot: Digest,
  path: string,
): Promise<{ base: Digest; merged: Digest }> {
  const names = inputRootNames(path);
  // ancestors[i] holds names[i]; undefined where the image has no such directory.
  const ancestors: (Directory | undefined)[] = [];
  let current: Directory | undefined = await readDirectory(cas, imageRoot, "image root directory");
  let currentDigest = imageRoot;
  let where = "";
  let existingLeaf: Digest | undefined;
  for (const [i, name] of names.entries()) {
    ancestors.push(current);
    where += `/${name}`;
    if (current === undefined) continue;
    const inTheWay = occupant(current, name);
    if (inTheWay !== undefined) throw clash(`"${where}" exists in the image as ${inTheWay}`);
    const node = current.directories.find((d) => d.name === name);
    if (node === undefined) {
      current = undefined;
      continue;
    }
    const digest = childDigest(fn, node.digest, currentDigest, name);
    const directory = await readDirectory(cas, digest, "image directory");
    if (i === names.length - 1) {
      const first = [...directory.files, ...directory.directories, ...directory.symlinks][0];
      if (first !== undefined) throw clash(`"${where}/${first.name}" exists in the image`);
      existingLeaf = digest;
    }
    current = directory;
    currentDigest = digest;
  }

  const uploader = new MissingBlobUploader(cas);
  try {
    const empty = await encodeDirectory(fn, emptyDirectory());
    if (existingLeaf === undefined) await uploader.add(empty);
    const base = await replaceLeaf(fn, uploader, ancestors, names, existingLeaf ?? empty.digest);
    const merged = await replaceLeaf(fn, uploader, ancestors, names, inputRoot);
    await uploader.finish();
    return { base, merged };
  } catch (err) {
    await uploader.abort();
    throw err;
  }
}

/** The names of an absolute path, which must be plain (no ".", "..", NUL) and not the root itself. */
function inputRootNames(path: string): string[] {
  const names = path.split("/").filter((name) => name !== "");
  const plain = names.every((name) => name !== "." && name !== ".." && !name.includes("\0"));
  if (!path.startsWith("/") || names.length === 0 || !plain) {
    throw invalidArgument(
      "images.inputRootPath",
      `${JSON.stringify(path)} is not an absolute path of plain names below "/"`,
    );
  }
  return names;
}

function occupant(directory: Directory, name: string): string | undefined {
  if (directory.files.some((f) => f.name === name)) return "a file";
  const symlink = directory.symlinks.find((s) => s.name === name);
  return symlink === undefined ? undefined : `a symlink to ${JSON.stringify(symlink.target)}`;
}

function clash(what: string) {
  return invalidArgument("container image", `${what}, where the input root goes; choose another images.inputRootPath`);
}

function emptyDirectory(): Directory {
  return { files: [], directories: [], symlinks: [], nodeProperties: modeProperties(CREATED_DIRECTORY_MODE) };
}

/** The root digest once the directory at `names` is `leaf`, re-encoding (and queueing) each ancestor. */
async function replaceLeaf(
  fn: DigestFunction,
  uploader: MissingBlobUploader,
  ancestors: readonly (Directory | undefined)[],
  names: readonly string[],
  leaf: Digest,
): Promise<Digest> {
  let child = leaf;
  for (let i = names.length - 1; i >= 0; i--) {
    const name = names[i] as string;
    const parent = ancestors[i] ?? emptyDirectory();
    const directories = parent.directories.filter((d) => d.name !== name);
    directories.push({ name, digest: wire(child) });
    const blob = await encodeDirectory(fn, { ...parent, directories });
    await uploader.add(blob);
    child = blob.digest;
  }
  return child;
}
