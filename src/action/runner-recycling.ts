import { createHash } from "node:crypto";
import { invalidArgument } from "../status/status.js";
import type { Property } from "./property.js";

/** BuildBuddy's properties for keeping an action's runner for the next action with the same key. */
export const RECYCLE_RUNNER = "recycle-runner";
/** BuildBuddy's older name of recycle-runner, still sent by clients configured for Docker. */
export const DOCKER_REUSE = "dockerReuse";
/** Any string: actions with different values never share a runner (a way to keep warm runners apart). */
export const RUNNER_RECYCLING_KEY = "runner-recycling-key";
export const PRESERVE_WORKSPACE = "preserve-workspace";
export const CLEAN_WORKSPACE_INPUTS = "clean-workspace-inputs";

export const RECYCLING_PROPERTIES: readonly string[] = [
  RECYCLE_RUNNER,
  DOCKER_REUSE,
  RUNNER_RECYCLING_KEY,
  PRESERVE_WORKSPACE,
  CLEAN_WORKSPACE_INPUTS,
];

/** How an action that asked for a recycled runner wants its workspace treated between actions. */
export interface Recycling {
  /**
   * Keep the previous action's files in the workspace (only its outputs are
   * removed before the new input root is laid out); otherwise the workspace
   * is emptied.
   */
  readonly preserveWorkspace: boolean;
  /** With preserveWorkspace: files kept from earlier actions that match these are removed too. */
  readonly cleanInputs: readonly string[];
}

/**
 * Reads the recycling properties (`single` gives a property's one value, or
 * undefined, and refuses a repeated one). undefined when the action does not
 * ask for a recycled runner; `preserve-workspace` and `clean-workspace-inputs`
 * mean nothing then, and are accepted as BuildBuddy accepts them.
 */
export function readRecycling(single: (name: string) => string | undefined): Recycling | undefined {
  const recycle = booleanProperty(RECYCLE_RUNNER, single(RECYCLE_RUNNER));
  const reuse = booleanProperty(DOCKER_REUSE, single(DOCKER_REUSE));
  if (recycle !== undefined && reuse !== undefined && recycle !== reuse) {
    throw invalidArgument(
      `platform property ${DOCKER_REUSE}`,
      `is an alias of ${RECYCLE_RUNNER} and says ${reuse} where ${RECYCLE_RUNNER} says ${recycle}; give one of them`,
    );
  }
  const preserveWorkspace = booleanProperty(PRESERVE_WORKSPACE, single(PRESERVE_WORKSPACE)) ?? false;
  const cleanInputs = workspaceGlobs(single(CLEAN_WORKSPACE_INPUTS));
  single(RUNNER_RECYCLING_KEY); // any value; read only so that a repeated one is refused
  if (!(recycle ?? reuse)) return undefined;
  return { preserveWorkspace, cleanInputs };
}

function booleanProperty(name: string, value: string | undefined): boolean | undefined {
  if (value === undefined) return undefined;
  if (value === "true") return true;
  if (value === "false") return false;
  throw invalidArgument(`platform property ${name}`, `"${value}" is not "true" or "false"`);
}

/** Comma-separated globs relative to the workspace: none absolute, none climbing out of it with "..". */
function workspaceGlobs(value: string | undefined): string[] {
  if (value === undefined || value.trim() === "") return [];
  const globs = value.split(",").map((g) => g.trim());
  for (const glob of globs) {
    const why =
      glob === ""
        ? "is empty (two commas in a row, or one at an end)"
        : glob.startsWith("/")
          ? "is absolute; give it relative to the workspace"
          : glob.split("/").includes("..")
            ? 'climbs out of the workspace with ".."'
            : glob.includes("\0")
              ? "holds a NUL byte"
              : undefined;
    if (why) throw invalidArgument(`platform property ${CLEAN_WORKSPACE_INPUTS}`, `the glob "${glob}" ${why}`);
  }
  return globs;
}

/** What a warm runner is kept for: never shared by two actions whose keys differ. */
export interface RunnerKeyParts {
  instanceName: string;
  /** Who sent the action (the client's grant; "anonymous" on a farm that checks no tokens). */
  client: string;
  /** The action's whole platform, as sent (every property, the recycling key included). */
  properties: readonly Property[];
  /** The image the action runs in, by digest where known (a tag moves; the runner holds what it pulled). */
  image: string;
}

/**
 * The key as a SHA-256 hex: the platform may hold a registry password, and
 * the key travels to workers and into their pools' logs; a hash of it does
 * not tell the password. Properties are taken in a canonical order, so the
 * same platform in another order is the same key.
 */
export function runnerKey(parts: RunnerKeyParts): string {
  const properties = [...parts.properties]
    .map((p) => [p.name, p.value] as const)
    .sort((a, b) => (a[0] === b[0] ? compare(a[1], b[1]) : compare(a[0], b[0])));
  const canonical = JSON.stringify([parts.instanceName, parts.client, parts.image, properties]);
  return createHash("sha256").update(canonical).digest("hex");
}

function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
