import { lstatSync, readlinkSync, type Stats } from "node:fs";
import { join } from "node:path";
import { type Digest, digestOf } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import {
  type Command,
  type OutputDirectory,
  type OutputFile,
  type OutputSymlink,
  Tree,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { fileBlob, readLocalTree } from "../merkle/local-tree.js";
import type { UploadSource } from "./remote-cas.js";

/** The outputs of one action, and what must be uploaded for them. */
export interface CollectedOutputs {
  outputFiles: OutputFile[];
  outputDirectories: OutputDirectory[];
  outputSymlinks: OutputSymlink[];
  /** The same symlinks split as REAPI 2.0 clients expect them. */
  outputFileSymlinks: OutputSymlink[];
  outputDirectorySymlinks: OutputSymlink[];
  uploads: UploadSource[];
}

/** Which output files' bytes to keep from the read that hashes them, for sending inline. */
export interface KeepInMemory {
  /** Files up to this size... */
  blobBytes: number;
  /** ...while those kept total at most this. */
  totalBytes: number;
}

const wire = (d: Digest) => ({ hash: d.hash, sizeBytes: d.sizeBytes });

/**
 * Finds the outputs the command names, relative to its working directory:
 * `output_paths` for REAPI 2.1+ clients, `output_files` and
 * `output_directories` for older ones. Outputs the command did not create
 * are left out, as the protocol says.
 */
export async function collectOutputs(
  fn: DigestFunction,
  command: Command,
  workingDir: string,
  keep: KeepInMemory,
): Promise<CollectedOutputs> {
  let kept = 0;
  const out: CollectedOutputs = {
    outputFiles: [],
    outputDirectories: [],
    outputSymlinks: [],
    outputFileSymlinks: [],
    outputDirectorySymlinks: [],
    uploads: [],
  };
  const modern = command.outputPaths.length > 0;
  const requested = modern
    ? command.outputPaths.map((path) => ({ path, kind: "any" as const }))
    : [
        ...command.outputFiles.map((path) => ({ path, kind: "file" as const })),
        ...command.outputDirectories.map((path) => ({ path, kind: "directory" as const })),
      ];
  for (const { path, kind } of requested) {
    const full = join(workingDir, path);
    // Synchronous, like the small reads in merkle/local-tree.ts: a thread-pool round trip per output would
    // wait on a busy worker longer than the call takes.
    const info = lstatOrUndefined(full);
    if (!info) continue;
    if (info.isSymbolicLink()) {
      const symlink = { path, target: readlinkSync(full), nodeProperties: undefined };
      out.outputSymlinks.push(symlink);
      if (kind === "directory") out.outputDirectorySymlinks.push(symlink);
      else out.outputFileSymlinks.push(symlink);
    } else if (info.isFile() && kind !== "directory") {
      const keepIt = info.size <= keep.blobBytes && kept + info.size <= keep.totalBytes;
      const blob = await fileBlob(fn, full, info.size, keepIt ? info.size : 0);
      if ("data" in blob) kept += info.size;
      const { digest } = blob;
      out.uploads.push(blob);
      out.outputFiles.push({
        path,
        digest: wire(digest),
        isExecutable: (info.mode & 0o111) !== 0,
        contents: Buffer.alloc(0),
        nodeProperties: undefined,
      });
    } else if (info.isDirectory() && kind !== "file") {
      const local = await readLocalTree(fn, full);
      out.uploads.push(...local.blobs);
      const rootDigest = local.rootDigest;
      const treeBytes = Buffer.from(Tree.encode({ root: local.root, children: local.children }).finish());
      const treeDigest = await digestOf(fn, treeBytes);
      out.uploads.push({ digest: treeDigest, data: treeBytes });
      out.outputDirectories.push({
        path,
        treeDigest: wire(treeDigest),
        isTopologicallySorted: false,
        rootDirectoryDigest: wire(rootDigest),
      });
    }
  }
  return out;
}

/** What lstat says of `path`, or undefined when there is nothing there (or a file where a parent should be). */
export function lstatOrUndefined(path: string): Stats | undefined {
  try {
    return lstatSync(path);
  } catch {
    return undefined;
  }
}
