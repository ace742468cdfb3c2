import { chownSync, lstatSync, mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import type { Launcher } from "../process/launcher.js";
import { type ActionRoot, HOST_ROOT, INPUT_ROOT_AS_ROOT } from "../sandbox/action-root.js";
import type { SlotCgroup } from "../sandbox/cgroups.js";
import {
  type ResidentRunRequest,
  type ResidentSandbox,
  type ResidentSandboxOptions,
  startResidentSandbox,
} from "../sandbox/resident-sandbox.js";
import { overlayRoot } from "./bubblewrap-runner.js";
import type { RunRequest, RunRoot, RunUser } from "./runner.js";

/**
 * What the runners that keep resident sandboxes (made ahead, warm, a
 * persistent worker's) share: starting one for a shape of action, telling
 * whether a kept one still fits, and handing it a command.
 */

/** What is fixed when a resident sandbox starts: an action of another shape cannot run in it. */
export interface ResidentShape {
  root: RunRoot;
  user: RunUser;
  network: boolean;
}

/** The host ids and cgroup a resident sandbox runs as (a slot's, or a runner's own). */
export interface HostIdentity {
  uid: number;
  gid: number;
  cgroup: SlotCgroup | undefined;
  /** A launcher living in `cgroup` (the slot's); without it the sandbox is started outside and moved in. */
  launcher?: Launcher;
}

/** What every resident sandbox shares with the worker's fresh ones (limits, masked files, tools). */
export type ResidentSettings = Pick<ResidentSandboxOptions, "bwrapPath" | "limits" | "slirp4netnsPath" | "maskedFiles">;

export interface StartedResident {
  sandbox: ResidentSandbox;
  /** Bound into the sandbox as the input root, the identity's (an action may write anywhere in it). */
  workspace: string;
  /** The image layers its root is made of (none on the host's root or an input root). */
  layerDirs: readonly string[];
}

/**
 * A resident sandbox of `shape` in `dir` (made here, removed again when the
 * start fails): its workspace, its writable layer when the root has layers,
 * its state. The workspace is bound while still empty.
 */
export async function startResident(
  dir: string,
  shape: ResidentShape,
  identity: HostIdentity,
  settings: ResidentSettings,
): Promise<StartedResident> {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const workspace = join(dir, "workspace");
  try {
    mkdirSync(workspace, { mode: 0o755 });
    chownSync(workspace, identity.uid, identity.gid);
    let root: ActionRoot = HOST_ROOT;
    if (shape.root.kind === "input-root") root = INPUT_ROOT_AS_ROOT;
    if (shape.root.kind === "layers") root = await overlayRoot(shape.root, dir);
    const sandbox = await startResidentSandbox({
      ...settings,
      inputRoot: workspace,
      stateDir: join(dir, "sandbox"),
      root,
      user: shape.user,
      network: shape.network,
      uid: identity.uid,
      gid: identity.gid,
      cgroup: identity.cgroup,
      launcher: identity.launcher,
    });
    const layerDirs = shape.root.kind === "layers" ? shape.root.layerDirs : [];
    return { sandbox, workspace, layerDirs };
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}

/** The shape as a string: equal for two actions that may run in the same resident sandbox. */
export function shapeKey(shape: ResidentShape): string {
  const { root } = shape;
  const rootKey =
    root.kind === "layers"
      ? { kind: root.kind, layers: root.layerDirs, at: root.inputRootPath, upper: root.upperDirectories }
      : { kind: root.kind };
  return JSON.stringify([rootKey, shape.user.uid, shape.user.gid, shape.network]);
}

/**
 * Whether a kept sandbox can still be used: it runs, and the image layers
 * its root is made of were not evicted meanwhile (its root would no longer
 * be what it was).
 */
export function stillWhole(started: StartedResident): boolean {
  if (!started.sandbox.usable) return false;
  return started.layerDirs.every((dir) => {
    try {
      return lstatSync(dir).isDirectory();
    } catch {
      return false;
    }
  });
}

/** The command of a run request, for a resident sandbox started earlier with its root, ids and network. */
export function residentCommand(request: RunRequest): ResidentRunRequest {
  const { workingDirectory, argv, env, timeoutMs, stdoutPath, stderrPath, signal } = request;
  return { workingDirectory, argv, env, timeoutMs, stdoutPath, stderrPath, signal };
}
