import type { InputTreeLimits } from "../cas/tree-limits.js";
import type { DirectoryCache } from "./directory-cache.js";
import type { FileCache } from "./file-cache.js";
import type { TreeOwner } from "./input-root.js";
import type { RemoteCas } from "./remote-cas.js";

/**
 * Where an action's inputs come from and how they are laid out, shared by
 * the worker's actions: the farm's CAS, the file cache its files are
 * hard-linked from, the Directory messages already fetched, the user the
 * tree is given to, and the bounds a tree must keep.
 */
export interface ActionInputs {
  /** The farm's CAS, for the instance of the action at hand (see `forInstance`). */
  readonly cas: RemoteCas;
  readonly files: FileCache;
  readonly directories: DirectoryCache;
  /** The action's unprivileged user, who must be able to write in its input root; undefined: the worker's own. */
  readonly owner: TreeOwner | undefined;
  /** Input trees past these are refused before anything is laid out. */
  readonly limits: InputTreeLimits;
}

/** The same inputs, read from the CAS under `instanceName`. */
export function inputsForInstance(inputs: ActionInputs, instanceName: string): ActionInputs {
  return { ...inputs, cas: inputs.cas.withInstance(instanceName) };
}
