import { createHash } from "node:crypto";
import { type Digest, digestKey } from "../digest/digest.js";
import { ActionResult } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { LruDirectory } from "../store/lru-directory.js";
import type { ActionCache } from "./action-cache.js";

/** Each entry: MAGIC, the SHA-256 of the encoded ActionResult, then the ActionResult. */
const MAGIC = Buffer.from("BAC1");
const HEADER_BYTES = MAGIC.byteLength + 32;

/**
 * Action results as encoded protos in an LRU-capped directory. The instance
 * name is hashed into the key, so any name is a safe path.
 *
 * An entry's name is not its content's hash, so each carries a checksum: a
 * file a crash cut short or damaged (a protobuf cut at a field boundary still
 * decodes) is a miss and is removed, never a wrong result. Writes are durable
 * (LruDirectory flushes file and name before `put` resolves).
 */
export class DiskActionCache implements ActionCache {
  constructor(
    private readonly files: LruDirectory,
    private readonly onDamaged: (key: string, reason: string) => void = () => {},
  ) {}

  async get(instanceName: string, actionDigest: Digest): Promise<ActionResult | undefined> {
    const key = this.key(instanceName, actionDigest);
    const bytes = await this.files.readFile(key);
    if (bytes === undefined) return undefined;
    const result = decodeEntry(bytes);
    if (typeof result === "string") {
      this.onDamaged(key, `the action cache entry is damaged (${result}); dropped`);
      await this.files.remove(key);
      return undefined;
    }
    return result;
  }

  async put(instanceName: string, actionDigest: Digest, result: ActionResult): Promise<void> {
    await this.files.writeFile(this.key(instanceName, actionDigest), encodeEntry(result));
  }

  private key(instanceName: string, actionDigest: Digest): string {
    const instance = createHash("sha256").update(instanceName).digest("hex").slice(0, 32);
    return `${instance}/${digestKey(actionDigest)}`;
  }
}

function encodeEntry(result: ActionResult): Buffer {
  const payload = ActionResult.encode(result).finish();
  const sum = createHash("sha256").update(payload).digest();
  return Buffer.concat([MAGIC, sum, payload]);
}

/** The entry's result, or why it is not one. */
function decodeEntry(bytes: Buffer): ActionResult | string {
  if (bytes.byteLength < HEADER_BYTES || !bytes.subarray(0, MAGIC.byteLength).equals(MAGIC)) {
    return `${bytes.byteLength} bytes without the entry header`;
  }
  const payload = bytes.subarray(HEADER_BYTES);
  const sum = createHash("sha256").update(payload).digest();
  if (!sum.equals(bytes.subarray(MAGIC.byteLength, HEADER_BYTES))) return "its checksum does not match";
  try {
    return ActionResult.decode(payload);
  } catch (err) {
    return `not an ActionResult: ${(err as Error).message}`;
  }
}
