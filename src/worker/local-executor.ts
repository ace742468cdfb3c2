import { mkdirSync } from "node:fs";
import { join, posix } from "node:path";
import type { ActionPlatform } from "../action/action-platform.js";
import type { Assignment } from "../gen/berth/worker/v1/worker.js";
import { mergeEnvironment } from "../image/environment.js";
import { apiHost } from "../image/reference.js";
import type { FlagfileLimits } from "../persistent/persistent-action.js";
import {
  type DockerdRequest,
  inputRootView,
  type RecycleRequest,
  type RunRoot,
  type RunUser,
} from "../runner/runner.js";
import type { Runners } from "../runner/runners.js";
import { Code, StatusError } from "../status/status.js";
import { INPUT_ROOT_NAME } from "./action-directories.js";
import type { ActionEnvironments, PreparedEnvironment } from "./action-environments.js";
import type { ActionExecutor, ExecutedAction, ExecutionContext } from "./action-executor.js";
import { type ActionInputs, inputsForInstance } from "./action-inputs.js";
import { type ActionRequest, readAssignment } from "./action-request.js";
import { layOutInputs, prepareWorkingDirectory } from "./input-layout.js";
import { collectRunOutputs } from "./output-collection.js";
import { persistentRequest } from "./persistent-request.js";
import { nowTimestamp, toTimestamp } from "./timestamp.js";

/** The ids an action has when it names none and its root is not its own: nobody. */
const NOBODY: RunUser = { uid: 65534, gid: 65534 };

/**
 * The steps of one action on this worker: read the assignment; lay out its
 * inputs while its environment is made ready; run its command in the runner
 * its platform asks for; collect its outputs (left to the upload wrapper to
 * send). Everything else (timestamps of the whole, uploads, inline outputs,
 * the directory's removal) is a wrapper's.
 */
export class LocalActionExecutor implements ActionExecutor {
  constructor(
    private readonly inputs: ActionInputs,
    private readonly environments: ActionEnvironments,
    private readonly runners: Runners,
    /** Bounds on the @flagfiles read into a persistent worker's request. */
    private readonly flagfileLimits?: FlagfileLimits,
  ) {}

  async execute(assignment: Assignment, context: ExecutionContext): Promise<ExecutedAction> {
    const request = readAssignment(assignment);
    const runner = this.runners.for(request.platform.isolation);
    this.environments.check(request.environment);
    const { metadata, directory } = context;
    const inputRoot = join(directory, INPUT_ROOT_NAME);
    metadata.inputFetchStartTimestamp = nowTimestamp();
    mkdirSync(directory, { recursive: true });
    const inputs = inputsForInstance(this.inputs, assignment.instanceName);
    const prepared = await this.layOutAndPrepare(request, assignment, inputs, inputRoot);
    try {
      if (prepared.used) metadata.auxiliaryMetadata.push(prepared.used);
      const view = inputRootView(prepared.root);
      const workingDirectory = prepareWorkingDirectory(request, inputRoot, view, inputs);
      const scope = assignment.runnerKey || assignment.instanceName;
      const persistentWorker = await persistentRequest(request, inputs, scope, this.flagfileLimits);
      metadata.inputFetchCompletedTimestamp = nowTimestamp();

      const files = { inputRoot, stdoutPath: join(directory, "stdout"), stderrPath: join(directory, "stderr") };
      const { command } = request;
      const run = await runner.run({
        ...files,
        scratchDir: directory,
        root: prepared.root,
        workingDirectory,
        argv: command.arguments,
        env: mergeEnvironment(prepared.env, command.environmentVariables),
        timeoutMs: request.timeoutMs,
        network: request.platform.network,
        user: actionUser(request.platform, prepared.root),
        signal: context.signal,
        recycle: recycleRequest(request, assignment.runnerKey, workingDirectory),
        persistentWorker,
        resources: request.platform.estimates,
        dockerd: dockerdRequest(request.platform),
      });
      metadata.auxiliaryMetadata.push(...(run.auxiliaryMetadata ?? []));
      metadata.executionStartTimestamp = toTimestamp(run.startedAt);
      metadata.executionCompletedTimestamp = toTimestamp(run.completedAt);
      if (run.cancelled) throw new StatusError(Code.CANCELLED, "the action was cancelled");

      metadata.outputUploadStartTimestamp = nowTimestamp();
      try {
        // A warm runner lends its workspace until the outputs are read there.
        return await collectRunOutputs(
          request,
          { ...files, inputRoot: run.inputRoot ?? inputRoot },
          view,
          run,
          context,
        );
      } finally {
        await run.finish?.();
      }
    } finally {
      // Not awaited: the client waits for the completion, which need not wait for the image's release.
      void prepared.release().catch(() => {});
    }
  }

  /** The image is pulled or materialized (if it must be) while the input root is laid out. */
  private async layOutAndPrepare(
    request: ActionRequest,
    assignment: Assignment,
    inputs: ActionInputs,
    inputRoot: string,
  ): Promise<PreparedEnvironment> {
    const { fn, environment, platform } = request;
    const [laidOut, prepared] = await Promise.allSettled([
      layOutInputs(request, assignment, inputs, inputRoot),
      this.environments.prepare(fn, environment, platform, inputs),
    ]);
    if (laidOut.status === "rejected" || prepared.status === "rejected") {
      if (prepared.status === "fulfilled") void prepared.value.release().catch(() => {});
      throw laidOut.status === "rejected" ? laidOut.reason : (prepared as PromiseRejectedResult).reason;
    }
    return prepared.value;
  }
}

/** What a warm runner needs of an action that asked for one (recycle-runner), or undefined. */
function recycleRequest(
  request: ActionRequest,
  runnerKey: string,
  workingDirectory: string,
): RecycleRequest | undefined {
  const recycling = request.platform.recycling;
  if (!recycling || runnerKey === "") return undefined;
  const { command } = request;
  const inRoot = (path: string) => posix.normalize(workingDirectory === "" ? path : `${workingDirectory}/${path}`);
  return {
    key: runnerKey,
    preserveWorkspace: recycling.preserveWorkspace,
    cleanInputs: recycling.cleanInputs,
    outputs: [...command.outputFiles, ...command.outputDirectories, ...command.outputPaths].map(inRoot),
  };
}

/** What the action asks of its VM's Docker daemon (init-dockerd=true), or undefined. */
function dockerdRequest(platform: ActionPlatform): DockerdRequest | undefined {
  const { dockerd, image, credentials } = platform;
  if (!dockerd || !image) return undefined;
  const registry = apiHost(image.registry);
  return {
    image: image.toString(),
    tcp: dockerd.tcp,
    imageRegistry: registry,
    // The action's own credentials, for its own image's registry; the farm's (images.credentials) never reach a VM.
    auth: credentials && { registry: image.registry, ...credentials },
  };
}

/**
 * The ids the action has: unixUID/unixGID when it names them; else root
 * where the root is its own (in a chroot, as BuildStream expects when it
 * names none; in an image with dockerRunAsRoot=true; in a VM, whose whole
 * machine is the action's), nobody on the host's root and in images.
 */
function actionUser(platform: ActionPlatform, root: RunRoot): RunUser {
  const asRoot =
    root.kind === "input-root" || (root.kind === "layers" && platform.runAsRoot) || platform.isolation === "microvm";
  const fallback = asRoot ? { uid: 0, gid: 0 } : NOBODY;
  return { uid: platform.unixUid ?? fallback.uid, gid: platform.unixGid ?? fallback.gid };
}
