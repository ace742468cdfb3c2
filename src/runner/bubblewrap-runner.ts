import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { EXPANDED_IMAGE_CAPABILITY, IMAGE_CAPABILITY } from "../action/action-platform.js";
import type { Property } from "../action/property.js";
import { makeUpperDirectories } from "../image/open-directories.js";
import { overlayMountArgs, writeLayerLinks } from "../image/overlay.js";
import { type ActionRoot, HOST_ROOT, INPUT_ROOT_AS_ROOT, type OverlayRoot } from "../sandbox/action-root.js";
import type { Sandbox } from "../sandbox/sandbox.js";
import { Code, StatusError } from "../status/status.js";
import type { LayeredRunRoot, Runner, RunRequest, RunResult } from "./runner.js";

export interface BubblewrapRunnerOptions {
  /**
   * Whether it may give actions layered roots (images, pulled or expanded):
   * mounting an overlay needs root, so a worker started as another user runs
   * actions on the host's root and in their input root only.
   */
  layeredRoots: boolean;
}

/**
 * Berth's namespace sandbox as a runner: every action in a bubblewrap
 * sandbox of its own, created for it and gone with it. A layered root
 * becomes an overlay whose upper layer is in the action's scratch directory,
 * so whatever the action writes, the layers stay as they are.
 */
export class BubblewrapRunner implements Runner {
  readonly capabilities: readonly Property[];

  constructor(
    private readonly sandbox: Sandbox,
    private readonly options: BubblewrapRunnerOptions,
  ) {
    this.capabilities = options.layeredRoots ? [IMAGE_CAPABILITY, EXPANDED_IMAGE_CAPABILITY] : [];
  }

  async run(request: RunRequest): Promise<RunResult> {
    const { scratchDir, root: _, ...rest } = request;
    return this.sandbox.run({ ...rest, root: await this.actionRoot(request) });
  }

  private async actionRoot(request: RunRequest): Promise<ActionRoot> {
    switch (request.root.kind) {
      case "host":
        return HOST_ROOT;
      case "input-root":
        return INPUT_ROOT_AS_ROOT;
      case "layers":
        if (!this.options.layeredRoots) {
          throw new StatusError(Code.FAILED_PRECONDITION, "this worker runs no images: it cannot mount their layers");
        }
        return overlayRoot(request.root, request.scratchDir);
    }
  }
}

/**
 * The overlay of the root's layers with an upper layer and a work directory
 * in `scratchDir`. The root's upper directories are made in the upper layer
 * first: the image's own modes of directories stored tamed on the host (a
 * 0777 /workspace), for this action alone.
 */
export async function overlayRoot(root: LayeredRunRoot, scratchDir: string): Promise<OverlayRoot> {
  const upperDir = join(scratchDir, "upper");
  const workDir = join(scratchDir, "work");
  await Promise.all([mkdir(upperDir), mkdir(workDir)]);
  await makeUpperDirectories(upperDir, root.upperDirectories);
  const overlay = overlayMountArgs(root.layerDirs, upperDir, workDir, join(scratchDir, "layers"));
  await writeLayerLinks(overlay);
  return {
    kind: "overlay",
    overlayOptions: overlay.options,
    overlayCwd: overlay.cwd,
    upperDir,
    inputRootPath: root.inputRootPath,
  };
}
