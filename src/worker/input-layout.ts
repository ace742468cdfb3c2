import { posix, relative } from "node:path";
import type { Digest } from "../digest/digest.js";
import { parseDigest } from "../digest/digest.js";
import type { Assignment } from "../gen/berth/worker/v1/worker.js";
import { invalidArgument } from "../status/status.js";
import type { ActionInputs } from "./action-inputs.js";
import type { ActionRequest } from "./action-request.js";
import { acceptAssignmentBlobs } from "./assignment-blobs.js";
import { ContainedRoot, type ContainedRootOptions } from "./contained-path.js";
import { graftedInputRoot } from "./expanded-roots.js";
import { materializeInputRoot } from "./input-root.js";

/**
 * Lays out the action's input root in `inputRoot`: what came with the
 * assignment first, the rest from the CAS. In expand mode only the client's
 * part of the tree, after checking it is the action's tree less the image's
 * base root (the worker's own copy of which the runner puts beneath it).
 */
export async function layOutInputs(
  request: ActionRequest,
  sent: Pick<Assignment, "inputDirectories" | "inputFiles">,
  inputs: ActionInputs,
  inputRoot: string,
): Promise<void> {
  const { fn, environment } = request;
  const files = await acceptAssignmentBlobs(fn, sent, inputs.directories, inputs.limits.maxDirectoryBytes);
  let clientRoot: Digest = request.inputRootDigest;
  if (environment.kind === "expanded-image") {
    const { baseRootDigest, inputRootPath } = environment.image;
    const baseRoot = parseDigest(fn, baseRootDigest, "expanded_image.base_root_digest");
    clientRoot = await graftedInputRoot(fn, clientRoot, baseRoot, inputRootPath, inputs.cas, inputs.directories);
  }
  await materializeInputRoot(fn, clientRoot, inputRoot, inputs, files);
}

/**
 * Checks the working directory and makes the outputs' parents, once the
 * input root is laid out and it is known where the action sees it.
 * Returns the working directory as the real directories it leads to: the
 * runner looks it up on the host, where a link into the root as the action
 * sees it (/run/berth/execroot/…) would lead elsewhere.
 */
export function prepareWorkingDirectory(
  request: ActionRequest,
  inputRoot: string,
  view: ContainedRootOptions,
  inputs: Pick<ActionInputs, "owner">,
): string {
  // One view of the root before the command runs; the output collection takes another after it.
  const root = new ContainedRoot(inputRoot, view);
  const workingDirectory = checkWorkingDirectory(root, request.workingDirectory);
  makeOutputParents(root, request, inputs.owner);
  return workingDirectory;
}

/**
 * The working directory (relative to the client's input root, also in
 * expand mode) must stay inside the input root: every output is relative to
 * it, and the runner's checks of it run as root on the host. A symlink on
 * its way that leads out (which only the input root can hold, before the
 * command runs) is INVALID_ARGUMENT naming the field, as is, in a chroot,
 * one that leads to no directory.
 */
function checkWorkingDirectory(root: ContainedRoot, workingDirectory: string): string {
  if (workingDirectory === "") return workingDirectory;
  const found = root.resolve(workingDirectory, true);
  if (found.kind === "outside") {
    throw invalidArgument("command.working_directory", `"${workingDirectory}" ${found.reason}`);
  }
  // In a chroot the sandbox leaves the look-up to the kernel, inside the root (see BubblewrapSandbox.run).
  if (root.chroot && !(found.kind === "present" && found.stats.isDirectory())) {
    throw invalidArgument("command.working_directory", `"${workingDirectory}" is not a directory of the input root`);
  }
  return found.kind === "present" ? relative(root.root, found.hostPath) : workingDirectory;
}

/**
 * REAPI: the worker creates the parent directory of every output before the
 * command runs. It does so as root, so never through a symlink out of the
 * input root (see ContainedRoot.makeDirectories). Synchronously, for the reason
 * input-root.ts gives for small trees: a few directories, made one inside the other.
 */
function makeOutputParents(root: ContainedRoot, request: ActionRequest, owner: ActionInputs["owner"]): void {
  const { command, workingDirectory } = request;
  const inRoot = (path: string) => (workingDirectory === "" ? path : `${workingDirectory}/${path}`);
  const dirs = new Set<string>();
  for (const path of [...command.outputFiles, ...command.outputPaths]) dirs.add(posix.dirname(inRoot(path)));
  // Bazel 4 expects output directories themselves to exist.
  for (const path of command.outputDirectories) dirs.add(inRoot(path));
  for (const dir of dirs) root.makeDirectories(dir, owner);
}
