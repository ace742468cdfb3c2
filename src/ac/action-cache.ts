import type { Digest } from "../digest/digest.js";
import type { ActionResult } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";

/** Results of actions by action digest, kept apart per instance name. */
export interface ActionCache {
  get(instanceName: string, actionDigest: Digest): Promise<ActionResult | undefined>;
  put(instanceName: string, actionDigest: Digest, result: ActionResult): Promise<void>;
}
