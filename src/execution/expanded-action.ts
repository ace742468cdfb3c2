import { posix } from "node:path";
import { CONTAINER_IMAGE, IMAGE_MODE, REGISTRY_PASSWORD, REGISTRY_USERNAME } from "../action/action-platform.js";
import type { BlobStore } from "../cas/blob-store.js";
import type { Digest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { graftInputRoot } from "../expand/graft.js";
import type { ExpandedImageTree } from "../expand/image-expander.js";
import type { ExpandedImage } from "../gen/berth/worker/v1/worker.js";
import type { Action, Command, Platform } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { mergeEnvironment } from "../image/environment.js";

/** Properties about the image itself: honoured by the expansion, meaningless (and secret) past it. */
const IMAGE_PROPERTIES = new Set([CONTAINER_IMAGE, IMAGE_MODE, REGISTRY_USERNAME, REGISTRY_PASSWORD]);

/** The action a worker runs in expand mode, and what it needs to know of the image. */
export interface ExpandedAction {
  action: Action;
  command: Command;
  expandedImage: ExpandedImage;
}

/**
 * Rewrites an action for expand mode: its input root grafted into the
 * image's tree at `inputRootPath` (a clash is INVALID_ARGUMENT naming the
 * path), its working directory moved below that path, the image's Env
 * beneath the command's, and the image properties dropped. Output paths are
 * relative to the working directory, so they and the result the client sees
 * stay as they were; the client's action digest is not touched.
 */
export async function expandedAction(
  fn: DigestFunction,
  cas: BlobStore,
  client: { action: Action; command: Command; inputRootDigest: Digest },
  image: ExpandedImageTree,
  inputRootPath: string,
): Promise<ExpandedAction> {
  const { action, command } = client;
  const { base, merged } = await graftInputRoot(fn, cas, image.root, client.inputRootDigest, inputRootPath);
  return {
    action: {
      ...action,
      inputRootDigest: { hash: merged.hash, sizeBytes: merged.sizeBytes },
      platform: withoutImageProperties(action.platform),
    },
    command: {
      ...command,
      workingDirectory: posix.join(posix.relative("/", inputRootPath), command.workingDirectory),
      environmentVariables: mergeEnvironment(image.env, command.environmentVariables),
      platform: withoutImageProperties(command.platform),
    },
    expandedImage: {
      baseRootDigest: { hash: base.hash, sizeBytes: base.sizeBytes },
      inputRootPath,
      reference: String(image.reference),
      manifestDigest: image.manifestDigest,
    },
  };
}

function withoutImageProperties(platform: Platform | undefined): Platform | undefined {
  if (!platform) return undefined;
  return { properties: platform.properties.filter((p) => !IMAGE_PROPERTIES.has(p.name)) };
}
