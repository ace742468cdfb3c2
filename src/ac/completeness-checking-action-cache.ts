import type { BlobStore } from "../cas/blob-store.js";
import type { Digest } from "../digest/digest.js";
import type { ActionResult } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { ActionCache } from "./action-cache.js";
import { missingReferences } from "./referenced-blobs.js";

/**
 * Answers a hit only when every blob of the result is still in the CAS, so
 * a client is never told of outputs it cannot download. Entries whose blobs
 * were evicted read as misses and are rebuilt by the client.
 */
export class CompletenessCheckingActionCache implements ActionCache {
  constructor(
    private readonly inner: ActionCache,
    private readonly cas: BlobStore,
    private readonly onIncomplete?: (actionDigest: Digest, missing: number) => void,
  ) {}

  async get(instanceName: string, actionDigest: Digest): Promise<ActionResult | undefined> {
    const result = await this.inner.get(instanceName, actionDigest);
    if (!result) return undefined;
    const missing = await missingReferences(actionDigest.fn, result, this.cas);
    if (missing.length > 0) {
      this.onIncomplete?.(actionDigest, missing.length);
      return undefined;
    }
    return result;
  }

  put(instanceName: string, actionDigest: Digest, result: ActionResult): Promise<void> {
    return this.inner.put(instanceName, actionDigest, result);
  }
}
