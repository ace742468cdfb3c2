import { createHash } from "node:crypto";
import { type Digest, digestKey } from "../digest/digest.js";
import { ActionResult } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { LruDirectory } from "../store/lru-directory.js";
import type { ActionCache } from "./action-cache.js";

/**
 * Action results as encoded protos in an LRU-capped directory. The instance
 * name is hashed into the key, so any name is a safe path.
 */
export class DiskActionCache implements ActionCache {
  constructor(private readonly files: LruDirectory) {}

  async get(instanceName: string, actionDigest: Digest): Promise<ActionResult | undefined> {
    const bytes = await this.files.readFile(this.key(instanceName, actionDigest));
    return bytes === undefined ? undefined : ActionResult.decode(bytes);
  }

  async put(instanceName: string, actionDigest: Digest, result: ActionResult): Promise<void> {
    await this.files.writeFile(this.key(instanceName, actionDigest), ActionResult.encode(result).finish());
  }

  private key(instanceName: string, actionDigest: Digest): string {
    const instance = createHash("sha256").update(instanceName).digest("hex").slice(0, 32);
    return `${instance}/${digestKey(actionDigest)}`;
  }
}
