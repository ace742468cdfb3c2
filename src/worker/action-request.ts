import { isAbsolute, join, normalize, posix } from "node:path";
import { type ActionEnvironment, environmentFromWire } from "../action/action-environment.js";
import { type ActionPlatform, platformOf, readActionPlatform } from "../action/action-platform.js";
import { checkRelativePath } from "../action/output-path.js";
import { type Digest, parseDigest } from "../digest/digest.js";
import { type DigestFunction, digestFunctionByWire } from "../digest/functions.js";
import type { Assignment, ExpandedImage } from "../gen/berth/worker/v1/worker.js";
import type { Action, Command } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { invalidArgument } from "../status/status.js";

/** An assignment read and checked: what the steps of its execution work from. */
export interface ActionRequest {
  leaseId: string;
  fn: DigestFunction;
  action: Action;
  command: Command;
  environment: ActionEnvironment;
  /** With the credentials the client sent in a header (through the hub) in place of any in the action. */
  platform: ActionPlatform;
  /** The input root the action names (in expand mode the image's tree with the client's grafted in). */
  inputRootDigest: Digest;
  /**
   * Relative to the input root the worker lays out: in expand mode that is
   * the client's part of the tree, below the image's input_root_path.
   */
  workingDirectory: string;
  /** 0: none. */
  timeoutMs: number;
}

/**
 * Reads an assignment, INVALID_ARGUMENT naming the field for what no
 * environment could run: an unknown digest function, a missing action,
 * paths that lead out of the input root.
 */
export function readAssignment(assignment: Assignment): ActionRequest {
  const fn = digestFunctionByWire(assignment.digestFunction);
  if (!fn) throw invalidArgument("digest_function", `${assignment.digestFunction} is not supported by this worker`);
  const { action, command } = assignment;
  if (!action || !command) throw invalidArgument("assignment", "lacks the action or the command");
  const environment = environmentFromWire(assignment);
  const platform = readActionPlatform(platformOf(action, command));
  if (assignment.registryCredentials) platform.credentials = assignment.registryCredentials;
  if (command.workingDirectory !== "") checkRelativePath(command.workingDirectory, "command.working_directory");
  const workingDirectory =
    environment.kind === "expanded-image"
      ? workingDirectoryInGraft(command.workingDirectory, environment.image)
      : command.workingDirectory;
  // Outputs are relative to the working directory and may climb out of it, but not out of the input root.
  for (const path of [...command.outputFiles, ...command.outputDirectories, ...command.outputPaths]) {
    const inRoot = normalize(join(workingDirectory, path));
    if (isAbsolute(path) || inRoot === ".." || inRoot.startsWith("../")) {
      throw invalidArgument("command output path", `"${path}" is not a relative path inside the input root`);
    }
  }
  const { timeout } = assignment;
  return {
    leaseId: assignment.leaseId,
    fn,
    action,
    command,
    environment,
    platform,
    inputRootDigest: parseDigest(fn, action.inputRootDigest, "action.input_root_digest"),
    workingDirectory,
    timeoutMs: timeout ? timeout.seconds * 1000 + timeout.nanos / 1e6 : 0,
  };
}

/**
 * An expanded action's working directory (relative to its whole tree, e.g.
 * "run/berth/execroot/sub") relative to the client's input root instead,
 * which must hold it; INVALID_ARGUMENT otherwise.
 */
function workingDirectoryInGraft(workingDirectory: string, expanded: ExpandedImage): string {
  const graft = expanded.inputRootPath;
  const normalized = posix.isAbsolute(graft) && posix.normalize(graft) === graft && !graft.endsWith("/");
  if (!normalized || graft.includes("\0")) {
    throw invalidArgument("expanded_image.input_root_path", `"${graft}" is not a normalized absolute path below /`);
  }
  const inGraft = posix.relative(graft, posix.join("/", workingDirectory));
  if (inGraft === ".." || inGraft.startsWith("../")) {
    throw invalidArgument("command.working_directory", `"${workingDirectory}" is not below ${graft}, the input root`);
  }
  return inGraft;
}
