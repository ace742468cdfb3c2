import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import type { ActionPlatform } from "../execution/action-platform.js";
import { ImageUsed } from "../gen/berth/image/v1/image.js";
import type { Any } from "../gen/google/protobuf/any.js";
import { overlayMountArgs, writeLayerLinks } from "../image/overlay.js";
import type { ImageRoot } from "../sandbox/sandbox.js";
import { Code, StatusError } from "../status/status.js";
import type { WorkerImages } from "./worker-images.js";

/** An action's image, ready for the sandbox. */
export interface ActionImage {
  root: ImageRoot;
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
  platform: ActionPlatform,
  images: WorkerImages | undefined,
  inputRootPath: string,
  base: string,
): Promise<ActionImage> {
  if (!images) throw new StatusError(Code.FAILED_PRECONDITION, `this worker runs no container images (${reference})`);
  const image = await images.prepare(reference, platform.credentials);
  try {
    const upperDir = join(base, "upper");
    const workDir = join(base, "work");
    await Promise.all([mkdir(upperDir), mkdir(workDir)]);
    const overlay = overlayMountArgs(image.layerDirs, upperDir, workDir, join(base, "layers"));
    await writeLayerLinks(overlay);
    const used = ImageUsed.encode({
      reference: String(image.reference),
      manifestDigest: image.manifestDigest,
    }).finish();
    return {
      root: {
        overlayOptions: overlay.options,
        overlayCwd: overlay.cwd,
        upperDir,
        inputRootPath,
        runAsRoot: platform.runAsRoot,
      },
      env: image.env,
      used: { typeUrl: "type.googleapis.com/berth.image.v1.ImageUsed", value: Buffer.from(used) },
      release: image.release,
    };
  } catch (err) {
    await image.release();
    throw err;
  }
}

/** The image's variables with the command's on top: a name the command sets replaces the image's. */
export function mergeEnvironment(
  imageEnv: readonly string[],
  commandEnv: readonly { name: string; value: string }[],
): { name: string; value: string }[] {
  const overridden = new Set(commandEnv.map((v) => v.name));
  const inherited: { name: string; value: string }[] = [];
  for (const entry of imageEnv) {
    const eq = entry.indexOf("=");
    const name = eq < 0 ? entry : entry.slice(0, eq);
    if (name === "" || overridden.has(name)) continue;
    inherited.push({ name, value: eq < 0 ? "" : entry.slice(eq + 1) });
  }
  return [...inherited, ...commandEnv];
}
