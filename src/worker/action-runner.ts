import { mkdirSync } from "node:fs";
import { readFile, rm } from "node:fs/promises";
import { isAbsolute, join, normalize, posix, relative } from "node:path";
import { environmentFromWire } from "../action/action-environment.js";
import { type ActionPlatform, platformOf, readActionPlatform } from "../action/action-platform.js";
import { checkRelativePath } from "../action/output-path.js";
import { DEFAULT_INPUT_TREE_LIMITS, type InputTreeLimits } from "../cas/tree-limits.js";
import { type Digest, parseDigest } from "../digest/digest.js";
import { type DigestFunction, digestFunctionByWire } from "../digest/functions.js";
import type { Assignment, Completion, ExpandedImage } from "../gen/berth/worker/v1/worker.js";
import {
  type ActionResult,
  type Command,
  Compressor_Value,
  type ExecutedActionMetadata,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Timestamp } from "../gen/google/protobuf/timestamp.js";
import type { Status } from "../gen/google/rpc/status.js";
import { mergeEnvironment } from "../image/environment.js";
import { fileBlob, type LocalBlob } from "../merkle/local-tree.js";
import { type ActionRoot, HOST_ROOT, INPUT_ROOT_AS_ROOT } from "../sandbox/action-root.js";
import { INPUT_ROOT_MOUNT } from "../sandbox/bubblewrap.js";
import { DEFAULT_USER } from "../sandbox/bwrap-args.js";
import type { Sandbox, SandboxResult, SandboxUser } from "../sandbox/sandbox.js";
import { toRpcStatus } from "../status/rpc-status.js";
import { Code, invalidArgument, StatusError } from "../status/status.js";
import { acceptAssignmentBlobs } from "./assignment-blobs.js";
import { ContainedRoot } from "./contained-path.js";
import type { DirectoryCache } from "./directory-cache.js";
import { type ExpandedRoots, graftedInputRoot } from "./expanded-roots.js";
import { failureStatus } from "./failure-status.js";
import type { FileCache } from "./file-cache.js";
import { type ActionImage, prepareActionImage, prepareExpandedImage } from "./image-root.js";
import { materializeInputRoot, type TreeOwner } from "./input-root.js";
import { collectOutputs, lstatOrUndefined, type RefusedOutput, refusedOutputsError } from "./outputs.js";
import type { RemoteCas } from "./remote-cas.js";
import type { Trash } from "./trash.js";
import type { WorkerImages } from "./worker-images.js";

/** Outputs up to this size, and up to this much in all, are sent with the completion. */
const INLINE_BLOB_LIMIT = 64 * 1024;
const INLINE_TOTAL_LIMIT = 1024 * 1024;

export interface ActionRunnerOptions {
  workerName: string;
  /** Each action gets a directory below this one, removed when it is done. */
  workDir: string;
  cas: RemoteCas;
  cache: FileCache;
  /** The worker's images, when it runs actions in container images. */
  images: WorkerImages | undefined;
  /** The base roots of expanded images, when it runs actions in images the farm expanded into the CAS. */
  expandedRoots: ExpandedRoots | undefined;
  /** Where the input root appears inside an image. */
  inputRootPath: string;
  /** Where the action's directory goes when it is done. */
  trash: Trash;
  /** Directory messages already fetched, shared by the worker's actions. */
  directories: DirectoryCache;
  sandbox: Sandbox;
  /** The action's unprivileged user, which must be able to write in its input root. */
  owner: TreeOwner | undefined;
  /** Input trees past these are refused before anything is laid out (the defaults when absent). */
  inputLimits?: InputTreeLimits;
}

/**
 * Runs one assignment from inputs to uploaded outputs and says how it went.
 * A command that ran is OK whatever its exit code; a timeout is
 * DEADLINE_EXCEEDED with the partial stdout and stderr in the result.
 */
export async function runAction(
  assignment: Assignment,
  options: ActionRunnerOptions,
  signal: AbortSignal,
): Promise<Completion> {
  const { leaseId } = assignment;
  const base = join(options.workDir, leaseId);
  const inputRoot = join(base, "root");
  // Directories are removed while no action runs (see Trash); this one counts from now until it is discarded.
  const release = options.trash.hold();
  /** What the directory holds beyond hard links to the file cache, as far as the worker saw: outputs and logs. */
  let writtenBytes = 0;
  const metadata: ExecutedActionMetadata = {
    worker: options.workerName,
    queuedTimestamp: assignment.queuedTimestamp,
    workerStartTimestamp: now(),
    workerCompletedTimestamp: undefined,
    inputFetchStartTimestamp: undefined,
    inputFetchCompletedTimestamp: undefined,
    executionStartTimestamp: undefined,
    executionCompletedTimestamp: undefined,
    virtualExecutionDuration: undefined,
    outputUploadStartTimestamp: undefined,
    outputUploadCompletedTimestamp: undefined,
    auxiliaryMetadata: [],
  };
  let image: ActionImage | undefined;
  try {
    const fn = digestFunctionByWire(assignment.digestFunction);
    if (!fn) throw invalidArgument("digest_function", `${assignment.digestFunction} is not supported by this worker`);
    const cas = options.cas.withInstance(assignment.instanceName);
    const { action, command } = assignment;
    if (!action || !command) throw invalidArgument("assignment", "lacks the action or the command");
    const environment = environmentFromWire(assignment);
    const expanded = environment.kind === "expanded-image" ? environment.image : undefined;
    const containerImage = environment.kind === "container-image" ? environment.reference : undefined;
    // The input root is the action's "/": its absolute paths are paths in it (see contained-path.ts).
    const chroot = environment.kind === "input-root-as-root";
    const { expandedRoots } = options;
    if (expanded && !expandedRoots) {
      throw new StatusError(
        Code.FAILED_PRECONDITION,
        `worker ${options.workerName} runs no expanded images (${expanded.reference || "expanded_image"})`,
      );
    }
    const platform = readActionPlatform(platformOf(action, command));
    // Credentials the client sent in a header (through the hub) take the place of any in the action.
    if (assignment.registryCredentials) platform.credentials = assignment.registryCredentials;
    if (command.workingDirectory !== "") checkRelativePath(command.workingDirectory, "command.working_directory");
    // From here on the working directory is relative to the input root the worker lays out: in expand mode
    // that is the client's part of the tree, below the image's input_root_path.
    const workingDirectory = expanded
      ? workingDirectoryInGraft(command.workingDirectory, expanded)
      : command.workingDirectory;
    // Outputs are relative to the working directory and may climb out of it, but not out of the input root.
    for (const path of [...command.outputFiles, ...command.outputDirectories, ...command.outputPaths]) {
      const inRoot = normalize(join(workingDirectory, path));
      if (isAbsolute(path) || inRoot === ".." || inRoot.startsWith("../")) {
        throw invalidArgument("command output path", `"${path}" is not a relative path inside the input root`);
      }
    }

    metadata.inputFetchStartTimestamp = now();
    mkdirSync(base, { recursive: true });
    const rootDigest = parseDigest(fn, action.inputRootDigest, "action.input_root_digest");
    // The image is pulled or materialized (if it must be) while the input root is laid out.
    const pulling =
      expanded && expandedRoots
        ? prepareExpandedImage(fn, expanded, expandedRoots, base, cas, options.cache, options.directories)
        : containerImage
          ? prepareActionImage(containerImage, platform, options.images, options.inputRootPath, base)
          : undefined;
    const layingOut = (async () => {
      const maxDirectoryBytes = (options.inputLimits ?? DEFAULT_INPUT_TREE_LIMITS).maxDirectoryBytes;
      const files = await acceptAssignmentBlobs(fn, assignment, options.directories, maxDirectoryBytes);
      const clientRoot = expanded
        ? await expandedInputRoot(fn, rootDigest, expanded, cas, options.directories)
        : rootDigest;
      await materializeInputRoot(
        fn,
        clientRoot,
        inputRoot,
        cas,
        options.cache,
        options.directories,
        { owner: options.owner, files },
        options.inputLimits,
      );
    })();
    const [laidOut, pulled] = await Promise.allSettled([layingOut, pulling]);
    if (pulled.status === "fulfilled" && pulled.value) {
      image = pulled.value;
      metadata.auxiliaryMetadata.push(image.used);
    }
    if (laidOut.status === "rejected") throw laidOut.reason;
    if (pulled.status === "rejected") throw pulled.reason;
    // Where the action sees its input root: absolute symlinks below it lead into the root (contained-path.ts);
    // in a chroot that is "/".
    const rootOptions = { chroot, seenAs: image ? image.root.inputRootPath : INPUT_ROOT_MOUNT };
    // One view of the root before the command runs; collectOutputs takes another after it.
    const before = new ContainedRoot(inputRoot, rootOptions);
    const realWorkingDirectory = checkWorkingDirectory(before, workingDirectory, chroot);
    makeOutputParents(before, workingDirectory, command, options.owner);
    metadata.inputFetchCompletedTimestamp = now();

    const stdoutPath = join(base, "stdout");
    const stderrPath = join(base, "stderr");
    const timeoutMs = assignment.timeout ? assignment.timeout.seconds * 1000 + assignment.timeout.nanos / 1e6 : 0;
    const root: ActionRoot = image?.root ?? (chroot ? INPUT_ROOT_AS_ROOT : HOST_ROOT);
    const run = await options.sandbox.run({
      inputRoot,
      workingDirectory: realWorkingDirectory,
      argv: command.arguments,
      env: image ? mergeEnvironment(image.env, command.environmentVariables) : command.environmentVariables,
      timeoutMs,
      stdoutPath,
      stderrPath,
      signal,
      network: platform.network,
      root,
      user: sandboxUser(platform, root),
    });
    metadata.executionStartTimestamp = toTimestamp(run.startedAt);
    metadata.executionCompletedTimestamp = toTimestamp(run.completedAt);
    if (run.cancelled) throw new StatusError(Code.CANCELLED, "the action was cancelled");

    metadata.outputUploadStartTimestamp = now();
    // Read only now that nothing of the action runs (see contained-path.ts).
    const keep = { blobBytes: INLINE_BLOB_LIMIT, totalBytes: INLINE_TOTAL_LIMIT };
    const outputs = await collectOutputs(fn, command, inputRoot, workingDirectory, keep, rootOptions);
    const stdoutBlob = await logBlob(fn, stdoutPath);
    const stderrBlob = await logBlob(fn, stderrPath);
    const uploads = [...outputs.uploads];
    if (stdoutBlob) uploads.push(stdoutBlob);
    if (stderrBlob) uploads.push(stderrBlob);
    for (const blob of uploads) writtenBytes += blob.digest.sizeBytes;
    const [stdout, stderr] = [stdoutBlob?.digest, stderrBlob?.digest];
    const { inline, rest } = await splitInline(uploads);
    await cas.upload(rest);
    metadata.outputUploadCompletedTimestamp = now();
    metadata.workerCompletedTimestamp = now();

    const { uploads: _, refused, ...fields } = outputs;
    const result: ActionResult = {
      ...fields,
      exitCode: run.exitCode,
      stdoutRaw: Buffer.alloc(0),
      stdoutDigest: stdout && { hash: stdout.hash, sizeBytes: stdout.sizeBytes },
      stderrRaw: Buffer.alloc(0),
      stderrDigest: stderr && { hash: stderr.hash, sizeBytes: stderr.sizeBytes },
      executionMetadata: metadata,
    };
    // A result that is not OK still goes along (logs, partial output, the other outputs) for the client to
    // see; its status keeps it out of the action cache.
    return {
      leaseId,
      status: runStatus(run, refused, timeoutMs),
      result,
      inlineBlobs: inline,
      digestFunction: fn.wireValue,
    };
  } catch (err) {
    return failedCompletion(leaseId, failureStatus(err, base));
  } finally {
    // Not awaited: the client waits for the completion, which need not wait for the image's release or for
    // the directory to go (each action has a directory of its own).
    void cleanUp(base, writtenBytes, image, options.trash).finally(release);
  }
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

/** The client's input root in an expanded action's tree, checked against the base the worker will use. */
async function expandedInputRoot(
  fn: DigestFunction,
  merged: Digest,
  expanded: ExpandedImage,
  cas: RemoteCas,
  directories: DirectoryCache,
): Promise<Digest> {
  const baseRoot = parseDigest(fn, expanded.baseRootDigest, "expanded_image.base_root_digest");
  return graftedInputRoot(fn, merged, baseRoot, expanded.inputRootPath, cas, directories);
}

async function cleanUp(base: string, bytes: number, image: ActionImage | undefined, trash: Trash): Promise<void> {
  await image?.release().catch(() => {});
  await trash.discard(base, bytes).catch(() => rm(base, { recursive: true, force: true }).catch(() => {}));
}

/** A completion for an assignment that could not run. */
export function failedCompletion(leaseId: string, error: StatusError): Completion {
  return { leaseId, status: toRpcStatus(error), result: undefined, inlineBlobs: [], digestFunction: 0 };
}

/** Small outputs travel with the completion instead of in an upload call of their own. */
async function splitInline(
  uploads: readonly LocalBlob[],
): Promise<{ inline: Completion["inlineBlobs"]; rest: LocalBlob[] }> {
  const inline: Completion["inlineBlobs"] = [];
  const rest: LocalBlob[] = [];
  let total = 0;
  for (const blob of uploads) {
    const size = blob.digest.sizeBytes;
    if (size > INLINE_BLOB_LIMIT || total + size > INLINE_TOTAL_LIMIT) {
      rest.push(blob);
      continue;
    }
    total += size;
    const data = "data" in blob ? blob.data : await readFile(blob.path);
    inline.push({
      digest: { hash: blob.digest.hash, sizeBytes: size },
      data,
      compressor: Compressor_Value.IDENTITY,
    });
  }
  return { inline, rest };
}

/**
 * The ids the action has in its user namespace: unixUID/unixGID when it
 * names them; else root where the root is its own (in a chroot, as
 * BuildStream expects when it names none; in an image with
 * dockerRunAsRoot=true), nobody on the host's root and in images.
 */
function sandboxUser(platform: ActionPlatform, root: ActionRoot): SandboxUser {
  const asRoot = root.kind === "input-root" || (root.kind === "overlay" && platform.runAsRoot);
  const fallback = asRoot ? { uid: 0, gid: 0 } : DEFAULT_USER;
  return { uid: platform.unixUid ?? fallback.uid, gid: platform.unixGid ?? fallback.gid };
}

/**
 * The working directory (relative to the client's input root, also in
 * expand mode) must stay inside the input root: every output is
 * relative to it, and the sandbox's checks of it run as root on the host.
 * A symlink on its way that leads out (which only the input root can hold,
 * before the command runs) is INVALID_ARGUMENT naming the field, as is, in
 * a chroot, one that leads to no directory.
 * Returned as the real directories it leads to: the sandbox looks it up on
 * the host, where a link into the root as the action sees it
 * (/run/berth/execroot/…) would lead elsewhere.
 */
function checkWorkingDirectory(root: ContainedRoot, workingDirectory: string, chroot: boolean): string {
  if (workingDirectory === "") return workingDirectory;
  const found = root.resolve(workingDirectory, true);
  if (found.kind === "outside") {
    throw invalidArgument("command.working_directory", `"${workingDirectory}" ${found.reason}`);
  }
  // In a chroot the sandbox leaves the look-up to the kernel, inside the root (see BubblewrapSandbox.run).
  if (chroot && !(found.kind === "present" && found.stats.isDirectory())) {
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
function makeOutputParents(
  root: ContainedRoot,
  workingDirectory: string,
  command: Command,
  owner: TreeOwner | undefined,
): void {
  const inRoot = (path: string) => (workingDirectory === "" ? path : `${workingDirectory}/${path}`);
  const dirs = new Set<string>();
  for (const path of [...command.outputFiles, ...command.outputPaths]) dirs.add(posix.dirname(inRoot(path)));
  // Bazel 4 expects output directories themselves to exist.
  for (const path of command.outputDirectories) dirs.add(inRoot(path));
  for (const dir of dirs) root.makeDirectories(dir, owner);
}

/** stdout or stderr as a blob (read once when small enough to go inline), or undefined when empty. */
async function logBlob(fn: DigestFunction, path: string): Promise<LocalBlob | undefined> {
  const info = lstatOrUndefined(path);
  if (!info || info.size === 0) return undefined;
  return (await fileBlob(fn, path, INLINE_BLOB_LIMIT)).blob;
}

function now(): Timestamp {
  return toTimestamp(new Date());
}

function toTimestamp(date: Date): Timestamp {
  const ms = date.getTime();
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 };
}

/**
 * Why a command that ran did not succeed as far as the farm is concerned: its timeout, a limit of the farm's
 * (like a timeout, not the action's own doing), or outputs it named that lead out of its input root.
 */
function runStatus(run: SandboxResult, refused: readonly RefusedOutput[], timeoutMs: number): Status {
  if (run.timedOut) {
    const seconds = timeoutMs / 1000;
    return {
      code: Code.DEADLINE_EXCEEDED,
      message: `the action ran past its timeout of ${seconds} s and was killed`,
      details: [],
    };
  }
  if (run.limitReached) return { code: Code.RESOURCE_EXHAUSTED, message: run.limitReached.message, details: [] };
  if (refused.length > 0) return toRpcStatus(refusedOutputsError(refused));
  return { code: Code.OK, message: "", details: [] };
}
