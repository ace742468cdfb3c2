import { randomUUID } from "node:crypto";
import { CONTAINER_IMAGE, IMAGE_CAPABILITY } from "../action/action-platform.js";
import { unmetProperty } from "../action/property.js";
import { ImagePullState } from "../gen/berth/image/v1/image.js";
import type { ImagePullProgress } from "../gen/berth/worker/v1/worker.js";
import { type ImageReference, ImageReferenceError, parseImageReference } from "../image/reference.js";
import type { WorkerConnection } from "../scheduler/scheduler.js";
import { Code, invalidArgument, StatusError } from "../status/status.js";
import type { ImagePolicy } from "./image-policy.js";

/** One worker's part of a pull, as the caller is told it (a copy, taken at each change). */
export interface WorkerPullState {
  readonly workerName: string;
  readonly state: ImagePullState;
}

/** A pull handed to the workers. */
export interface StartedPull {
  /** What the workers pull: canonical, and pinned when the farm resolves tags. */
  readonly reference: string;
  readonly workerNames: readonly string[];
  /** Resolves once every worker has finished, or once `stop` was called. */
  readonly finished: Promise<void>;
  /** Stops telling the caller; the workers' pulls go on (their images serve the next actions). */
  stop(): void;
}

/** Where pulls find the farm's workers (the scheduler). */
export interface ConnectedWorkers {
  connectedWorkers(): readonly WorkerConnection[];
}

interface RunningPull {
  /** Each worker's state by name. */
  readonly workers: Map<string, ImagePullState>;
  readonly onUpdate: (state: WorkerPullState) => void;
  readonly end: () => void;
}

/**
 * Image pulls the farm asks of its workers: admits the image as an action's
 * would be, hands it to every connected worker that runs images, and
 * relays what each reports (routed here by pull id) until all have
 * finished. A worker that leaves meanwhile has finished, UNAVAILABLE.
 */
export class ImagePulls {
  private readonly running = new Map<string, RunningPull>();

  constructor(
    private readonly policy: ImagePolicy,
    private readonly workers: ConnectedWorkers,
  ) {}

  /**
   * Starts a pull of `reference`; refusals (malformed, not allowed, a tag
   * where only digests run, no worker to pull) are thrown as statuses.
   * `onUpdate` gets a copy of a worker's state on every change, first one
   * per worker before this resolves.
   */
  async start(reference: string, onUpdate: (state: WorkerPullState) => void): Promise<StartedPull> {
    const image = await admitRequestedImage(this.policy, reference);
    const all = this.workers.connectedWorkers();
    const targets = all.filter((w) => !unmetProperty(w.properties, [IMAGE_CAPABILITY]));
    if (targets.length === 0) throw noWorkerFor(image, all.length);

    const pullId = randomUUID();
    let resolveFinished: () => void = () => {};
    const finished = new Promise<void>((resolve) => {
      resolveFinished = resolve;
    });
    const pull: RunningPull = {
      workers: new Map(targets.map((w) => [w.name, ImagePullState.fromPartial({})])),
      onUpdate,
      end: () => {
        this.running.delete(pullId);
        resolveFinished();
      },
    };
    this.running.set(pullId, pull);
    for (const [workerName, state] of pull.workers) onUpdate({ workerName, state: { ...state } });
    for (const worker of targets) worker.pullImage({ pullId, reference: String(image) });
    return { reference: String(image), workerNames: [...pull.workers.keys()], finished, stop: pull.end };
  }

  /** A worker's report; reports of pulls no one follows any more, or of other workers, are dropped. */
  report(workerName: string, progress: ImagePullProgress): void {
    const pull = this.running.get(progress.pullId);
    const state = pull?.workers.get(workerName);
    if (!pull || !state || state.finished || !progress.state) return;
    Object.assign(state, progress.state);
    if (state.finished && !state.status) {
      state.status = { code: Code.INTERNAL, message: "the worker sent no status", details: [] };
    }
    this.publish(pull, workerName, state);
  }

  /** The worker's stream is gone: its part of every pull is over. */
  workerLeft(workerName: string, reason: string): void {
    for (const pull of [...this.running.values()]) {
      const state = pull.workers.get(workerName);
      if (!state || state.finished) continue;
      state.finished = true;
      state.status = {
        code: Code.UNAVAILABLE,
        message: `worker ${workerName} left the farm before it finished the pull (${reason})`,
        details: [],
      };
      this.publish(pull, workerName, state);
    }
  }

  private publish(pull: RunningPull, workerName: string, state: ImagePullState): void {
    pull.onUpdate({ workerName, state: { ...state } });
    if ([...pull.workers.values()].every((s) => s.finished)) pull.end();
  }
}

/**
 * The image a request (not an action) names, admitted by the farm's policy:
 * refusals are the policy's, with the request's `reference` field named.
 */
export async function admitRequestedImage(policy: ImagePolicy, reference: string): Promise<ImageReference> {
  return policy.admit(parseReference(reference), undefined).catch((err: unknown) => {
    throw asPullError(err);
  });
}

function parseReference(reference: string): ImageReference {
  try {
    return parseImageReference(reference.trim());
  } catch (err) {
    if (err instanceof ImageReferenceError) throw invalidArgument("reference", err.message);
    throw err;
  }
}

/** The policy speaks of an action's platform property; here the image came as the request's reference. */
function asPullError(err: unknown): unknown {
  if (!(err instanceof StatusError)) return err;
  const violation = err.details.fieldViolations?.[0];
  if (violation?.field !== `platform property ${CONTAINER_IMAGE}`) return err;
  return invalidArgument("reference", violation.description);
}

function noWorkerFor(image: ImageReference, connected: number): StatusError {
  const message =
    connected === 0
      ? `no worker is connected to this farm, so none can pull ${image}; ` +
        "start one (berth serve runs local workers, berth worker --scheduler HOST:PORT joins from any host) and pull again"
      : `none of the ${connected} workers connected to this farm runs container images, so none can pull ${image}; ` +
        "workers run images when started as root";
  return new StatusError(Code.FAILED_PRECONDITION, message, {
    preconditionFailures: [
      { type: "UNSATISFIABLE_PLATFORM", subject: `${CONTAINER_IMAGE}=${image}`, description: "no worker runs images" },
    ],
  });
}
