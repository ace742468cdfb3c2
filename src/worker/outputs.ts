import { lstatSync, readlinkSync, type Stats } from "node:fs";
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
import { Code, StatusError } from "../status/status.js";
import { ContainedRoot, type ContainedRootOptions } from "./contained-path.js";
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
  /** Outputs left out because their path leads out of the input root. */
  refused: RefusedOutput[];
}

/** An output whose path leads out of the input root: nothing of it is read. */
export interface RefusedOutput {
  /** The Command field that names it, e.g. "command.output_paths[0]". */
  field: string;
  path: string;
  /** Through what it leaves the root. */
  reason: string;
}

/** Where an action's outputs are read from. */
export interface OutputsRoot {
  /** The input root on the host. */
  inputRoot: string;
  /** Relative to the input root; the outputs are relative to it. */
  workingDirectory: string;
  /** How the action's absolute paths are read: where it sees its input root, or `chroot` when that is its "/". */
  view?: ContainedRootOptions;
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
 * Finds the outputs the command names, relative to its working directory
 * (itself relative to `inputRoot`): `output_paths` for REAPI 2.1+ clients,
 * `output_files` and `output_directories` for older ones. Outputs the command
 * did not create are left out, as the protocol says.
 *
 * The worker reads them as root, so each path is resolved with
 * ContainedRoot (contained-path.ts): a symlink on the way that leaves the
 * input root makes the output refused, files are opened without following a
 * link and hashed only when regular.
 *
 * An output that is a symlink is returned as one, unless its target is an
 * absolute path into the input root as the action sees it (`seenAs`, e.g.
 * /run/berth/execroot/dir/foo): then it is returned as what it leads to, a
 * file or a directory, as Bazel's own remote worker does (the client could
 * not resolve such a path). In a directory's tree, links are kept as links,
 * except those same absolute links into the input root, which become what
 * they lead to. A link that leads out of the root, through however many
 * links, is never followed: it stays a link, for the client to take as its
 * symlink_absolute_path_strategy says.
 */
export async function collectOutputs(
  fn: DigestFunction,
  command: Command,
  where: OutputsRoot,
  keep: KeepInMemory,
): Promise<CollectedOutputs> {
  const { inputRoot, workingDirectory, view: rootOptions = {} } = where;
  let kept = 0;
  const out: CollectedOutputs = {
    outputFiles: [],
    outputDirectories: [],
    outputSymlinks: [],
    outputFileSymlinks: [],
    outputDirectorySymlinks: [],
    uploads: [],
    refused: [],
  };
  const modern = command.outputPaths.length > 0;
  const requested = modern
    ? command.outputPaths.map((path, i) => ({ path, kind: "any" as const, field: `command.output_paths[${i}]` }))
    : [
        ...command.outputFiles.map((path, i) => ({
          path,
          kind: "file" as const,
          field: `command.output_files[${i}]`,
        })),
        ...command.outputDirectories.map((path, i) => ({
          path,
          kind: "directory" as const,
          field: `command.output_directories[${i}]`,
        })),
      ];
  // Made now: what the command did to the tree since the parents were made is seen afresh.
  const root = new ContainedRoot(inputRoot, rootOptions);
  const followIntoRoot = (target: string) => targetInRoot(root, target);
  for (const { path, kind, field } of requested) {
    const found = root.resolve(workingDirectory === "" ? path : `${workingDirectory}/${path}`);
    if (found.kind === "absent") continue;
    if (found.kind === "outside") {
      out.refused.push({ field, path, reason: found.reason });
      continue;
    }
    let { hostPath, stats: info } = found;
    if (info.isSymbolicLink()) {
      const target = readlinkSync(hostPath);
      const followed = targetInRoot(root, target);
      if (followed) {
        ({ hostPath, stats: info } = followed);
      } else {
        const symlink = { path, target, nodeProperties: undefined };
        out.outputSymlinks.push(symlink);
        if (kind === "directory") out.outputDirectorySymlinks.push(symlink);
        else out.outputFileSymlinks.push(symlink);
        continue;
      }
    }
    if (info.isFile() && kind !== "directory") {
      const keepIt = info.size <= keep.blobBytes && kept + info.size <= keep.totalBytes;
      const { blob, info: opened } = await fileBlob(fn, hostPath, keepIt ? info.size : 0);
      if ("data" in blob) kept += blob.digest.sizeBytes;
      const { digest } = blob;
      out.uploads.push(blob);
      out.outputFiles.push({
        path,
        digest: wire(digest),
        isExecutable: (opened.mode & 0o111) !== 0,
        contents: Buffer.alloc(0),
        nodeProperties: undefined,
      });
    } else if (info.isDirectory() && kind !== "file") {
      const local = await readLocalTree(fn, hostPath, followIntoRoot);
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

/**
 * What a symlink whose target is `target` stands for, when that is an
 * absolute path into the input root leading (through any links, all inside)
 * to a regular file or a directory; undefined when the link is to stay a
 * link: a relative target, or one that leads out of the root, or to nothing.
 */
function targetInRoot(root: ContainedRoot, target: string): { hostPath: string; stats: Stats } | undefined {
  // In a chroot an absolute link is what its sysroot means it to be (/bin/sh -> /bin/busybox): kept.
  if (root.chroot || !target.startsWith("/")) return undefined;
  const found = root.resolveTarget(target);
  if (found.kind !== "present" || !(found.stats.isFile() || found.stats.isDirectory())) return undefined;
  return found;
}

/**
 * INVALID_ARGUMENT naming every refused output, with one field violation
 * each. Not FAILED_PRECONDITION: nothing is missing or unready that a retry
 * or an upload could fix; the output path itself names no place in the
 * action's input root. Bazel retries neither code; it downloads what the
 * result holds (stdout, stderr, the other outputs) and fails the action with
 * this message.
 */
export function refusedOutputsError(refused: readonly RefusedOutput[]): StatusError {
  const described = refused.map((r) => ({ field: r.field, description: `"${r.path}" ${r.reason}` }));
  const message = described.map((d) => `${d.field}: ${d.description}`).join("; ");
  return new StatusError(
    Code.INVALID_ARGUMENT,
    `${message}; outputs are read only inside the input root, so ${refused.length === 1 ? "this output was" : "these outputs were"} left out`,
    { fieldViolations: described },
  );
}

/** What lstat says of `path`, or undefined when there is nothing there (or a file where a parent should be). */
export function lstatOrUndefined(path: string): Stats | undefined {
  try {
    return lstatSync(path);
  } catch {
    return undefined;
  }
}
