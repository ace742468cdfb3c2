import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import type { ActionPlatform } from "../action/action-platform.js";
import { parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { ImageUsed } from "../gen/berth/image/v1/image.js";
import type { ExpandedImage } from "../gen/berth/worker/v1/worker.js";
import type { Any } from "../gen/google/protobuf/any.js";
import { makeUpperDirectories, type UpperDirectory } from "../image/open-directories.js";
import { overlayMountArgs, writeLayerLinks } from "../image/overlay.js";
import type { OverlayRoot } from "../sandbox/action-root.js";
import { Code, StatusError } from "../status/status.js";
import type { DirectoryCache } from "./directory-cache.js";
import type { ExpandedRoots } from "./expanded-roots.js";
import type { FileCache } from "./file-cache.js";
import type { RemoteCas } from "./remote-cas.js";
import type { WorkerImages } from "./worker-images.js";

/** An action's image, ready for the sandbox. */
export interface ActionImage {
  root: OverlayRoot;
  /** The image's Env, to which the command's variables are added. */
  env: string[];
  /** ExecutedActionMetadata.auxiliary_metadata entry saying which image ran. */
  used: Any;
  release(): Promise<void>;
}

/**
 * Pulls (once) and pins the image, and lays out the action's overlay
 * directories below `base`: an upper layer of its own, discarded with
 * `base`, so the image's layers are never written.
 */
export async function prepareActionImage(
  reference: string,
  platform: Pick<ActionPlatform, "credentials">,
  images: WorkerImages | undefined,
  inputRootPath: string,
  base: string,
): Promise<ActionImage> {
  if (!images) throw new StatusError(Code.FAILED_PRECONDITION, `this worker runs no container images (${reference})`);
  const image = await images.prepare(reference, platform.credentials);
  try {
    return {
      root: await overlayImageRoot(image.layerDirs, image.upperDirectories, base, inputRootPath),
      env: image.env,
      used: imageUsed(String(image.reference), image.manifestDigest),
      release: image.release,
    };
  } catch (err) {
    await image.release();
    throw err;
  }
}

/**
 * Expand mode: the image came as a tree in the CAS (`expanded.base_root_digest`),
 * which the worker materializes once and shares, read-only, as the single
 * lower layer of the same overlay mount mode uses. Its Env is already in the
 * command's environment, so none is added here.
 */
export async function prepareExpandedImage(
  fn: DigestFunction,
  expanded: ExpandedImage,
  roots: ExpandedRoots,
  base: string,
  cas: RemoteCas,
  files: FileCache,
  directories: DirectoryCache,
): Promise<ActionImage> {
  const baseRoot = parseDigest(fn, expanded.baseRootDigest, "expanded_image.base_root_digest");
  const acquired = await roots.acquire(fn, baseRoot, cas, files, directories);
  try {
    return {
      root: await overlayImageRoot([acquired.dir], acquired.upperDirectories, base, expanded.inputRootPath),
      env: [],
      used: imageUsed(expanded.reference, expanded.manifestDigest),
      release: acquired.release,
    };
  } catch (err) {
    await acquired.release();
    throw err;
  }
}

/**
 * The overlay of `layerDirs` (bottom to top) with an upper layer and a work
 * directory of the action's own below `base`, discarded with it: whatever
 * the action writes, the layers stay as they are. `upperDirectories` are
 * made in the upper layer first: the image's own modes of directories
 * stored tamed on the host (a 0777 /workspace), for this action alone.
 */
async function overlayImageRoot(
  layerDirs: readonly string[],
  upperDirectories: readonly UpperDirectory[],
  base: string,
  inputRootPath: string,
): Promise<OverlayRoot> {
  const upperDir = join(base, "upper");
  const workDir = join(base, "work");
  await Promise.all([mkdir(upperDir), mkdir(workDir)]);
  await makeUpperDirectories(upperDir, upperDirectories);
  const overlay = overlayMountArgs(layerDirs, upperDir, workDir, join(base, "layers"));
  await writeLayerLinks(overlay);
  return { kind: "overlay", overlayOptions: overlay.options, overlayCwd: overlay.cwd, upperDir, inputRootPath };
}

/** The auxiliary_metadata entry (berth.image.v1.ImageUsed) saying which image an action ran in. */
function imageUsed(reference: string, manifestDigest: string): Any {
  const used = ImageUsed.encode({ reference, manifestDigest }).finish();
  return { typeUrl: "type.googleapis.com/berth.image.v1.ImageUsed", value: Buffer.from(used) };
}
