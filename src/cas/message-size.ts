import { type Digest, formatDigest } from "../digest/digest.js";
import { Code, StatusError } from "../status/status.js";

/**
 * Action and Command blobs are read whole into memory and decoded. A digest
 * states its blob's size (and the CAS only serves blobs that match it), so
 * one over its limit is refused before a byte of it is read: without this,
 * a client naming a 1 GiB blob as its action costs the server 1 GiB per
 * Execute. An Action is a few digests, a timeout and some platform
 * properties: a few hundred bytes. A Command of a large link, or with a
 * tree artifact's many output paths, reaches megabytes, but Linux runs no
 * program whose arguments and environment pass a quarter of its stack limit
 * (2 MiB by default). (Directory messages: InputTreeLimits.maxDirectoryBytes.)
 */
export const DEFAULT_MAX_ACTION_BYTES = 1024 * 1024;
export const DEFAULT_MAX_COMMAND_BYTES = 16 * 1024 * 1024;

/** Bytes of Directory blobs read at once while a tree is walked (a single Directory may be this large). */
export const MAX_DIRECTORY_BYTES_IN_FLIGHT = 64 * 1024 * 1024;

/**
 * Refuses `digest` when it names a blob of more than `limit` bytes:
 * FAILED_PRECONDITION with a MESSAGE_SIZE_LIMIT violation whose subject is
 * `key`, the configuration key an operator would raise, as for the input
 * tree's limits. `what` names the message ("action_digest", "input
 * directory \"a/b\"").
 */
export function checkMessageSize(digest: Digest, limit: number, what: string, key: string): void {
  if (digest.sizeBytes <= limit) return;
  const message =
    `${what} (${formatDigest(digest)}) is a blob of ${digest.sizeBytes} bytes, ` +
    `more than this farm's limit of ${limit} bytes for that message (${key})`;
  throw new StatusError(Code.FAILED_PRECONDITION, message, {
    preconditionFailures: [{ type: "MESSAGE_SIZE_LIMIT", subject: key, description: message }],
  });
}

/** Splits `digests` into batches of at most `maxCount` blobs and, unless one blob alone is more, `maxBytes` bytes. */
export function* blobBatches(digests: readonly Digest[], maxCount: number, maxBytes: number): Generator<Digest[]> {
  let batch: Digest[] = [];
  let bytes = 0;
  for (const digest of digests) {
    if (batch.length > 0 && (batch.length >= maxCount || bytes + digest.sizeBytes > maxBytes)) {
      yield batch;
      batch = [];
      bytes = 0;
    }
    batch.push(digest);
    bytes += digest.sizeBytes;
  }
  if (batch.length > 0) yield batch;
}
