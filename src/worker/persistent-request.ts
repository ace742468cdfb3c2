import { type Digest, digestKey } from "../digest/digest.js";
import type { FlagfileLimits } from "../persistent/persistent-action.js";
import {
  PERSISTENT_WORKER_KEY,
  type PersistentWorkerSpec,
  persistentWorkerSpec,
} from "../persistent/persistent-action.js";
import type { ActionInputs } from "./action-inputs.js";
import type { ActionRequest } from "./action-request.js";

/**
 * The persistent-worker spec of an action that carries a persistentWorkerKey
 * (Bazel 6+, --experimental_remote_mark_tool_inputs), read from its input
 * tree as laid out (its Directory messages are in the worker's cache by
 * then; flagfiles are read from the CAS by digest, never from the disk the
 * action may have written). The scope keeps processes apart by what the
 * scheduler keyed the action by (instance, caller, platform), or by instance.
 */
export async function persistentRequest(
  request: ActionRequest,
  inputs: ActionInputs,
  scope: string,
  limits: FlagfileLimits | undefined,
): Promise<PersistentWorkerSpec | undefined> {
  const { action, command } = request;
  const properties = action.platform?.properties.length ? action.platform.properties : command.platform?.properties;
  if (!properties?.some((p) => p.name === PERSISTENT_WORKER_KEY)) return undefined;
  const source = {
    fn: request.fn,
    root: request.inputRootDigest,
    directory: (digest: Digest) => inputs.directories.get(digestKey(digest)),
    readFile: async (digest: Digest) => {
      const data = (await inputs.cas.readBlobs([digest])).get(digest);
      if (!data) throw new Error(`input ${digest.hash} is not in the CAS`);
      return data;
    },
  };
  return persistentWorkerSpec(action, command, source, { scope, limits });
}
