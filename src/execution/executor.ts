import type { ActionCache } from "../ac/action-cache.js";
import { type ActionEnvironment, CHROOT_ENVIRONMENT, HOST_ROOT_ENVIRONMENT } from "../action/action-environment.js";
import {
  type ActionPlatform,
  CONTAINER_IMAGE,
  EXPANDED_IMAGE_CAPABILITY,
  IMAGE_CAPABILITY,
  type ImageMode,
  platformOf,
  readActionPlatform,
} from "../action/action-platform.js";
import { formatProperty, type Property } from "../action/property.js";
import { runnerKey } from "../action/runner-recycling.js";
import { MICRO_VM_CAPABILITY, WORKLOAD_ISOLATION_TYPE } from "../action/workload-isolation.js";
import type { BlobStore } from "../cas/blob-store.js";
import { checkMessageSize, DEFAULT_MAX_ACTION_BYTES, DEFAULT_MAX_COMMAND_BYTES } from "../cas/message-size.js";
import type { InputTreeLimits } from "../cas/tree-limits.js";
import { type Digest, formatDigest, parseDigest, resolveDigestFunction } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type { ImageExpander } from "../expand/image-expander.js";
import {
  Action,
  Command,
  type ExecuteRequest,
  type ExecuteResponse,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { ImageReference } from "../image/reference.js";
import { type Credentials, normalizeRegistryKey } from "../registry/credentials.js";
import type { Operation } from "../scheduler/operation.js";
import { type ExecutionJob, failure, type Scheduler, type WorkerOutcome } from "../scheduler/scheduler.js";
import { toRpcStatus } from "../status/rpc-status.js";
import { Code, invalidArgument, missingBlobs, StatusError } from "../status/status.js";
import { CheckedDirectories, DEFAULT_CHECKED_DIRECTORY_BYTES } from "./checked-directories.js";
import { checkCommand } from "./command-check.js";
import { expandedAction } from "./expanded-action.js";
import type { ImagePolicy } from "./image-policy.js";
import { inputTreeBlobs } from "./input-blobs.js";
import { checkInputTree } from "./input-tree.js";
import { refuseNetwork } from "./network-policy.js";

export interface ExecutorOptions {
  /** Timeout of actions that set none. */
  defaultTimeoutMs: number;
  /** Actions asking for more are refused with INVALID_ARGUMENT. */
  maxTimeoutMs: number;
  /** How images are honoured unless the action says otherwise (berth-image-mode). */
  imageMode: ImageMode;
  /** Where the input root goes inside an image. */
  inputRootPath: string;
  /** Expand mode's server side; without it, actions asking for expand mode are refused. */
  expander: ImageExpander | undefined;
  /** Input trees past these are refused before the action is queued. */
  inputLimits: InputTreeLimits;
  /** false: actions asking for a network are refused (execution.allowNetwork). */
  allowNetwork: boolean;
  /** Instance names whose actions run with their input root as "/" (execution.inputRootAsRoot); none unless set. */
  inputRootAsRoot?: readonly string[];
  /** Estimated heap bytes of Directory checks remembered across Executes (0: none); DEFAULT_CHECKED_DIRECTORY_BYTES unless set. */
  checkedDirectoryCacheBytes?: number;
  /** Larger Action blobs are refused unread; DEFAULT_MAX_ACTION_BYTES unless set. */
  maxActionBytes?: number;
  /** Larger Command blobs are refused unread; DEFAULT_MAX_COMMAND_BYTES unless set. */
  maxCommandBytes?: number;
}

/** What the caller sent beside the request (its headers), never stored. */
export interface ExecuteContext {
  /** Registry credentials from x-berth-registry-credentials, by registry host. */
  registryCredentials: ReadonlyMap<string, Credentials>;
  /** Who sent it: the name of the caller's grant (see auth/access-interceptor.ts); "anonymous" when absent. */
  caller?: string;
}

const NO_CONTEXT: ExecuteContext = { registryCredentials: new Map() };

/**
 * The Execute front end: answers from the action cache when it can, checks
 * that an action can run at all, hands it to the scheduler, and caches
 * successful results. Problems with the action itself complete the
 * operation with a status in ExecuteResponse, as REAPI asks.
 */
export class Executor {
  /** Directory messages earlier Executes checked, so that trees sharing most of theirs cost a lookup each. */
  readonly checkedDirectories: CheckedDirectories;

  constructor(
    private readonly cas: BlobStore,
    private readonly ac: ActionCache,
    private readonly scheduler: Scheduler,
    private readonly images: ImagePolicy,
    private readonly options: ExecutorOptions,
  ) {
    this.checkedDirectories = new CheckedDirectories(
      options.checkedDirectoryCacheBytes ?? DEFAULT_CHECKED_DIRECTORY_BYTES,
    );
  }

  /**
   * Validates the request and returns its operation at once, in the
   * CACHE_CHECK stage; the cache lookup and the checks of the action follow
   * in the background and move the operation on.
   */
  execute(request: ExecuteRequest, context: ExecuteContext = NO_CONTEXT): Operation {
    const fn = resolveDigestFunction(request.digestFunction, request.actionDigest?.hash);
    const actionDigest = parseDigest(fn, request.actionDigest, "action_digest");
    const operation = this.scheduler.open(request.instanceName, actionDigest);
    this.start(operation, fn, request, context).catch((err: unknown) => {
      const error = err instanceof StatusError ? err : new StatusError(Code.INTERNAL, (err as Error).message);
      operation.complete(failure(error.code, error.message, toRpcStatus(error).details));
    });
    return operation;
  }

  private async start(
    operation: Operation,
    fn: DigestFunction,
    request: ExecuteRequest,
    context: ExecuteContext,
  ): Promise<void> {
    const { instanceName } = request;
    const actionDigest = operation.actionDigest;
    if (!request.skipCacheLookup) {
      const cached = await this.ac.get(instanceName, actionDigest);
      if (cached) {
        operation.complete({
          result: cached,
          cachedResult: true,
          status: { code: Code.OK, message: "", details: [] },
          serverLogs: {},
          message: "",
        });
        return;
      }
    }
    const priority = request.executionPolicy?.priority ?? 0;
    const job = await this.prepare(fn, instanceName, actionDigest, priority, context);
    this.scheduler.submit(job, operation);
  }

  /** Turns a worker's outcome into the response, caching successful results. */
  async finish(job: ExecutionJob, outcome: WorkerOutcome): Promise<ExecuteResponse> {
    const response: ExecuteResponse = {
      result: outcome.result,
      cachedResult: false,
      status: outcome.status,
      serverLogs: {},
      message: outcome.status.message,
    };
    if (outcome.status.code === Code.OK && outcome.result?.exitCode === 0 && !job.doNotCache) {
      await this.ac.put(job.instanceName, job.actionDigest, outcome.result);
    }
    return response;
  }

  private async prepare(
    fn: DigestFunction,
    instanceName: string,
    actionDigest: Digest,
    priority: number,
    context: ExecuteContext,
  ): Promise<ExecutionJob> {
    // Before reading: a digest states its blob's size, and a huge blob would be read whole into memory.
    const maxActionBytes = this.options.maxActionBytes ?? DEFAULT_MAX_ACTION_BYTES;
    checkMessageSize(actionDigest, maxActionBytes, "action_digest", "execution.maxActionBytes");
    const actionBytes = await this.cas.get(actionDigest);
    if (!actionBytes) throw missingBlobs([`blobs/${formatDigest(actionDigest)}`]);
    const action = decode(Action, actionBytes, "action");
    const commandDigest = parseDigest(fn, action.commandDigest, "action.command_digest");
    const inputRootDigest = parseDigest(fn, action.inputRootDigest, "action.input_root_digest");
    const maxCommandBytes = this.options.maxCommandBytes ?? DEFAULT_MAX_COMMAND_BYTES;
    checkMessageSize(commandDigest, maxCommandBytes, "action.command_digest", "execution.maxCommandBytes");
    const [commandBytes, missingRoot] = await Promise.all([
      this.cas.get(commandDigest),
      this.cas.findMissing([inputRootDigest]),
    ]);
    const missing = [...(commandBytes ? [] : [commandDigest]), ...missingRoot];
    if (missing.length > 0) throw missingBlobs(missing.map((d) => `blobs/${formatDigest(d)}`));
    const command = decode(Command, commandBytes as Buffer, "command");
    checkCommand(command);
    // Before anything is queued or laid out: a hostile tree costs the server a bounded read, and no worker.
    await checkInputTree(fn, this.cas, inputRootDigest, this.options.inputLimits, this.checkedDirectories);
    const timeoutMs = this.timeoutOf(action);
    const platform = readActionPlatform(platformOf(action, command));
    if (!this.options.allowNetwork) refuseNetwork(platform);
    // Credentials from the caller's header for the image's registry win over any in the action's properties.
    const headerCredentials =
      platform.image && context.registryCredentials.get(normalizeRegistryKey(platform.image.registry));
    if (headerCredentials) {
      platform.credentials = { username: headerCredentials.username, password: headerCredentials.password };
    }
    const planned = await this.plannedEnvironment(instanceName, platform);
    // Checked before the expansion, which may download gigabytes for nothing.
    const unmet = this.scheduler.unsatisfiable(planned.required);
    if (unmet) throw unsatisfiable(unmet, planned.image);
    const queuedAt = new Date();
    const runs =
      planned.kind === "expand"
        ? await this.expand(fn, instanceName, planned.image, platform, { action, command, inputRootDigest })
        : { action, command, environment: planned.environment };
    return {
      instanceName,
      actionDigest,
      ...runs,
      platform: planned.required,
      priority,
      timeoutMs,
      doNotCache: action.doNotCache,
      queuedAt,
      registryCredentials: headerCredentials || undefined,
      // What a warm runner, or a persistent worker's process, may be shared by (and by nothing else).
      runnerKey:
        platform.recycling || platform.persistentWorkerKey
          ? runnerKey({
              instanceName,
              client: context.caller ?? "anonymous",
              properties: platformOf(action, command),
              image: planned.image ? String(planned.image) : "",
            })
          : undefined,
      // In expand mode, too, these are the client's input root: the worker keeps the image's part.
      inputBlobs: await inputTreeBlobs(fn, this.cas, inputRootDigest),
    };
  }

  /**
   * The one place that decides what an action runs in: its input root as
   * "/" for the instances execution.inputRootAsRoot lists (never with an
   * image), else its admitted image (pulled by the worker, or expanded here
   * first), else the host's root.
   */
  private async plannedEnvironment(instanceName: string, platform: ActionPlatform): Promise<PlannedEnvironment> {
    const { required } = platform;
    const chroot = this.options.inputRootAsRoot?.includes(instanceName) ?? false;
    if (!platform.image) {
      const environment = chroot ? CHROOT_ENVIRONMENT : HOST_ROOT_ENVIRONMENT;
      return { kind: "ready", environment, image: undefined, required };
    }
    if (chroot) throw imageWithInputRootAsRoot(instanceName, platform.image);
    const image = await this.images.admit(platform.image, platform.credentials);
    if ((platform.imageMode ?? this.options.imageMode) === "expand") {
      // Expand mode needs only workers that mount the image's tree, not ones that pull it.
      const mounting = [...required.filter((p) => p.name !== IMAGE_CAPABILITY.name), EXPANDED_IMAGE_CAPABILITY];
      return { kind: "expand", image, required: mounting };
    }
    return { kind: "ready", environment: { kind: "container-image", reference: String(image) }, image, required };
  }

  /** The action rewritten for expand mode, and its environment: the expanded image. */
  private async expand(
    fn: DigestFunction,
    instanceName: string,
    image: ImageReference,
    platform: ActionPlatform,
    client: { action: Action; command: Command; inputRootDigest: Digest },
  ): Promise<{ action: Action; command: Command; environment: ActionEnvironment }> {
    const { expander } = this.options;
    if (!expander) {
      throw new StatusError(Code.FAILED_PRECONDITION, `this farm cannot expand images (asked for ${image})`);
    }
    const tree = await expander.expand(instanceName, fn, image, platform.credentials);
    const { inputRootPath } = this.options;
    const { action, command, expandedImage } = await expandedAction(fn, this.cas, client, tree, inputRootPath);
    return { action, command, environment: { kind: "expanded-image", image: expandedImage } };
  }

  private timeoutOf(action: Action): number {
    const requested = action.timeout ? action.timeout.seconds * 1000 + Math.floor(action.timeout.nanos / 1e6) : 0;
    if (requested < 0) throw invalidArgument("action.timeout", "is negative");
    if (requested > this.options.maxTimeoutMs) {
      throw invalidArgument(
        "action.timeout",
        `${requested / 1000} s is more than this farm's maximum of ${this.options.maxTimeoutMs / 1000} s`,
      );
    }
    return requested === 0 ? this.options.defaultTimeoutMs : requested;
  }
}

/**
 * An environment before the expansion: expand mode's tree is made only once
 * the action is known to have a worker. `image` is the admitted image, for
 * messages; `required`, what a worker must offer to run the action there.
 */
type PlannedEnvironment =
  | { kind: "ready"; environment: ActionEnvironment; image: ImageReference | undefined; required: Property[] }
  | { kind: "expand"; image: ImageReference; required: Property[] };

function decode<T>(type: { decode(bytes: Uint8Array): T }, bytes: Buffer, what: string): T {
  try {
    return type.decode(bytes);
  } catch (err) {
    throw invalidArgument(what, `is not a valid ${what} message: ${(err as Error).message}`);
  }
}

/**
 * An image cannot be the root of an action whose root is its input root:
 * the image's files belong in the input root (BuildStream stages its
 * sysroot there), or the action in an instance that runs images.
 */
function imageWithInputRootAsRoot(instanceName: string, image: ImageReference): StatusError {
  return invalidArgument(
    `platform property ${CONTAINER_IMAGE}`,
    `"${image}": instance "${instanceName}" runs actions with their input root as / (execution.inputRootAsRoot), ` +
      "so no image can be their root; put the image's files in the input root, or use another instance name",
  );
}

function unsatisfiable(unmet: Property, image: ImageReference | undefined): StatusError {
  if (unmet.name === MICRO_VM_CAPABILITY.name) {
    return new StatusError(
      Code.FAILED_PRECONDITION,
      `no worker of this farm runs microVMs (a worker needs QEMU and a guest kernel), and the action asks for one ` +
        `with platform property ${WORKLOAD_ISOLATION_TYPE}; remove it to run in the namespace sandbox`,
      {
        preconditionFailures: [
          { type: "UNSATISFIABLE_PLATFORM", subject: WORKLOAD_ISOLATION_TYPE, description: "no worker runs microVMs" },
        ],
      },
    );
  }
  const capability = unmet.name === IMAGE_CAPABILITY.name || unmet.name === EXPANDED_IMAGE_CAPABILITY.name;
  const kind = unmet.name === IMAGE_CAPABILITY.name ? "container images" : "expanded images";
  const message = capability
    ? `no worker of this farm runs ${kind}, and the action asks for ${image}`
    : `no worker of this farm offers the platform property ${formatProperty(unmet)}`;
  return new StatusError(Code.FAILED_PRECONDITION, message, {
    preconditionFailures: [
      {
        type: "UNSATISFIABLE_PLATFORM",
        subject: capability ? `container-image=${image}` : formatProperty(unmet),
        description: capability ? `no worker runs ${kind}` : "no worker offers this property",
      },
    ],
  });
}
