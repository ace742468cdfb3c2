import type { Property } from "../action/property.js";
import type { ResourceEstimates } from "../action/resource-estimates.js";
import type { Any } from "../gen/google/protobuf/any.js";
import type { UpperDirectory } from "../image/open-directories.js";
import type { PersistentWorkerSpec } from "../persistent/persistent-action.js";

/**
 * Runs one command of one action in isolation and says how it ended. One
 * implementation per isolation kind (today the bubblewrap sandbox); the
 * worker picks one per action (see Runners) and knows nothing of how it
 * isolates: mounts, overlays and namespaces stay inside the runner.
 *
 * `run` resolves once the command has ended and nothing it started is left.
 * It rejects only when the runner itself fails (its tool missing, its setup
 * failed, a request it cannot honour), never because of the command.
 */
export interface Runner {
  /** Platform properties a worker with this runner offers (that it runs container images, say). */
  readonly capabilities: readonly Property[];
  run(request: RunRequest): Promise<RunResult>;
}

/**
 * What the action sees as "/": the worker's own root (read-only, the input
 * root at HOST_INPUT_ROOT_PATH), read-only layers with a writable layer of
 * the action's own on top (an image, pulled or expanded, the input root at
 * `inputRootPath`), or the input root itself, as in a chroot.
 */
export type RunRoot = HostRunRoot | LayeredRunRoot | InputRootRunRoot;

export interface HostRunRoot {
  kind: "host";
}

export interface LayeredRunRoot {
  kind: "layers";
  /** Directories that are never written, bottom to top. */
  layerDirs: readonly string[];
  /** Directories made in the action's own layer first (modes an image stores tamed on the host). */
  upperDirectories: readonly UpperDirectory[];
  /** Where the input root appears (absolute). */
  inputRootPath: string;
}

export interface InputRootRunRoot {
  kind: "input-root";
}

/** Where an action on the host's root sees its input root. */
export const HOST_INPUT_ROOT_PATH = "/run/berth/execroot";

/** The ids the action has inside its isolation (what `id` says); never the host's. */
export interface RunUser {
  uid: number;
  gid: number;
}

export interface RunRequest {
  /** Absolute host path of the action's input root, laid out; the action may write in it. */
  inputRoot: string;
  /**
   * The action's own directory (which holds the input root and the logs),
   * discarded with it: the runner may make other entries in it for this run
   * (a writable layer), and none outside it.
   */
  scratchDir: string;
  root: RunRoot;
  /** Relative to the input root; "" is the input root itself. */
  workingDirectory: string;
  /** argv[0] is looked up in `env`'s PATH when it has no slash (REAPI 2.3). */
  argv: string[];
  /** Exactly the environment the action gets, in order. */
  env: { name: string; value: string }[];
  /** Wall-clock limit; 0 means none. */
  timeoutMs: number;
  /** Host files that receive the command's stdout and stderr, outside the input root. */
  stdoutPath: string;
  stderrPath: string;
  /** A network of the action's own (default: none but its own loopback). */
  network: boolean;
  user: RunUser;
  /** Aborting it kills the action. */
  signal: AbortSignal;
  /** Set when the action asked for a warm runner (recycle-runner); runners that keep none ignore it. */
  recycle?: RecycleRequest;
  /** Set for a Bazel persistent-worker action (see PersistentWorkerRunner); others run it as its command. */
  persistentWorker?: PersistentWorkerSpec;
  /** What the action says it needs (EstimatedCPU, …): a VM is sized by it; other runners ignore it. */
  resources?: ResourceEstimates;
  /** init-dockerd=true: a Docker daemon runs in the action's VM before its command (VM runner only). */
  dockerd?: DockerdRequest;
}

/** What an action asks of its VM's Docker daemon (init-dockerd=true). */
export interface DockerdRequest {
  /** The action's container-image, as it named it (for messages). */
  image: string;
  /** enable-dockerd-tcp: the daemon also listens on TCP port 2375 inside the guest. */
  tcp: boolean;
  /** The action's own registry credentials, for the registry of its image; given to the guest's docker client. */
  auth?: { registry: string; username: string; password: string };
  /** The registry of the action's image: reachable from the guest like the farm's own. */
  imageRegistry?: string;
}

/** What a warm runner needs to know of the action (see RecyclingRunner). */
export interface RecycleRequest {
  /** Assignment.runner_key: the scheduler's key (instance, caller, image, whole platform). */
  key: string;
  /** preserve-workspace: keep the workspace's files for the next action, removing only these outputs. */
  preserveWorkspace: boolean;
  /** clean-workspace-inputs: with preserveWorkspace, earlier inputs matching these go too. */
  cleanInputs: readonly string[];
  /** The action's outputs, relative to the input root (what preserve-workspace removes before the next). */
  outputs: readonly string[];
}

export interface RunResult {
  /** 128 + the signal for a command killed by one (137 after a timeout or cancellation); 127: argv[0] not run. */
  exitCode: number;
  timedOut: boolean;
  cancelled: boolean;
  /** A failed command that ran into one of the runner's limits: which, and a sentence naming its setting. */
  limitReached?: { limit: string; message: string };
  startedAt: Date;
  completedAt: Date;
  /**
   * Where the input root is now, when the runner moved it (a warm runner's
   * workspace): outputs are read there, and then `finish` is called.
   */
  inputRoot?: string;
  /** Called once the outputs read there are sent: the runner may then reuse what it lent (see RecyclingRunner). */
  finish?: () => Promise<void>;
  /** What the runner tells the client of how it ran (ExecutedActionMetadata.auxiliary_metadata): a VM's. */
  auxiliaryMetadata?: Any[];
}

/**
 * How the action's absolute paths read: where it sees its input root, or
 * `chroot` when that is its "/" (see worker/contained-path.ts).
 */
export function inputRootView(root: RunRoot): { seenAs: string; chroot: boolean } {
  switch (root.kind) {
    case "host":
      return { seenAs: HOST_INPUT_ROOT_PATH, chroot: false };
    case "layers":
      return { seenAs: root.inputRootPath, chroot: false };
    case "input-root":
      return { seenAs: "/", chroot: true };
  }
}
