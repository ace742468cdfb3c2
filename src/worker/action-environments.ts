import type {
  ActionEnvironment,
  ContainerImageEnvironment,
  ExpandedImageEnvironment,
} from "../action/action-environment.js";
import type { ActionPlatform } from "../action/action-platform.js";
import { parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { ImageUsed } from "../gen/berth/image/v1/image.js";
import type { Any } from "../gen/google/protobuf/any.js";
import type { RunRoot } from "../runner/runner.js";
import { Code, StatusError } from "../status/status.js";
import type { ActionInputs } from "./action-inputs.js";
import type { ExpandedRoots } from "./expanded-roots.js";
import type { WorkerImages } from "./worker-images.js";

/** What an action runs in, ready for its runner, held until `release`. */
export interface PreparedEnvironment {
  root: RunRoot;
  /** The image's Env, beneath the command's variables (empty but for a pulled image). */
  env: string[];
  /** ExecutedActionMetadata.auxiliary_metadata entry saying which image ran, if one did. */
  used: Any | undefined;
  release(): Promise<void>;
}

export interface ActionEnvironmentsOptions {
  workerName: string;
  /** The worker's images, when it runs actions in container images. */
  images: WorkerImages | undefined;
  /** The base roots of expanded images, when it runs actions in images the farm expanded into the CAS. */
  expandedRoots: ExpandedRoots | undefined;
  /** Where the input root appears inside a pulled image. */
  inputRootPath: string;
}

const NOTHING_HELD = async () => {};

/**
 * Makes each action's environment ready: pulls (once) and pins a container
 * image, materializes (once) and pins an expanded image's base root; the
 * host's root and the input root need nothing. What the layers become (an
 * overlay, a disk) is the runner's business.
 */
export class ActionEnvironments {
  constructor(private readonly options: ActionEnvironmentsOptions) {}

  /** FAILED_PRECONDITION when this worker cannot give `environment` at all, before anything is laid out. */
  check(environment: ActionEnvironment): void {
    if (environment.kind === "container-image") this.imagesFor(environment);
    if (environment.kind === "expanded-image") this.rootsFor(environment);
  }

  async prepare(
    fn: DigestFunction,
    environment: ActionEnvironment,
    platform: Pick<ActionPlatform, "credentials">,
    inputs: ActionInputs,
  ): Promise<PreparedEnvironment> {
    switch (environment.kind) {
      case "host-root":
        return { root: { kind: "host" }, env: [], used: undefined, release: NOTHING_HELD };
      case "input-root-as-root":
        return { root: { kind: "input-root" }, env: [], used: undefined, release: NOTHING_HELD };
      case "container-image":
        return this.pulled(environment, platform);
      case "expanded-image":
        return this.expanded(fn, environment, inputs);
    }
  }

  /** Mount mode: the image's layers, pulled once and pinned while the action runs. */
  private async pulled(
    environment: ContainerImageEnvironment,
    platform: Pick<ActionPlatform, "credentials">,
  ): Promise<PreparedEnvironment> {
    const image = await this.imagesFor(environment).prepare(environment.reference, platform.credentials);
    const root: RunRoot = {
      kind: "layers",
      layerDirs: image.layerDirs,
      upperDirectories: image.upperDirectories,
      inputRootPath: this.options.inputRootPath,
    };
    return {
      root,
      env: image.env,
      used: imageUsed(String(image.reference), image.manifestDigest),
      release: image.release,
    };
  }

  /**
   * Expand mode: the image came as a tree in the CAS (`base_root_digest`),
   * which the worker materializes once and shares, read-only, as the single
   * lower layer. Its Env is already in the command's environment.
   */
  private async expanded(
    fn: DigestFunction,
    environment: ExpandedImageEnvironment,
    inputs: ActionInputs,
  ): Promise<PreparedEnvironment> {
    const roots = this.rootsFor(environment);
    const { image } = environment;
    const baseRoot = parseDigest(fn, image.baseRootDigest, "expanded_image.base_root_digest");
    const acquired = await roots.acquire(fn, baseRoot, inputs.cas, inputs.files, inputs.directories);
    const root: RunRoot = {
      kind: "layers",
      layerDirs: [acquired.dir],
      upperDirectories: acquired.upperDirectories,
      inputRootPath: image.inputRootPath,
    };
    return { root, env: [], used: imageUsed(image.reference, image.manifestDigest), release: acquired.release };
  }

  private imagesFor(environment: ContainerImageEnvironment): WorkerImages {
    const { images, workerName } = this.options;
    if (images) return images;
    throw new StatusError(
      Code.FAILED_PRECONDITION,
      `worker ${workerName} runs no container images (${environment.reference})`,
    );
  }

  private rootsFor(environment: ExpandedImageEnvironment): ExpandedRoots {
    const { expandedRoots, workerName } = this.options;
    if (expandedRoots) return expandedRoots;
    throw new StatusError(
      Code.FAILED_PRECONDITION,
      `worker ${workerName} runs no expanded images (${environment.image.reference || "expanded_image"})`,
    );
  }
}

/** The auxiliary_metadata entry (berth.image.v1.ImageUsed) saying which image an action ran in. */
function imageUsed(reference: string, manifestDigest: string): Any {
  const used = ImageUsed.encode({ reference, manifestDigest }).finish();
  return { typeUrl: "type.googleapis.com/berth.image.v1.ImageUsed", value: Buffer.from(used) };
}
