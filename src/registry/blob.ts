import { randomUUID } from "node:crypto";
import { createWriteStream } from "node:fs";
import { rename, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { Readable, Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { ReadableStream as NodeReadableStream } from "node:stream/web";
import { hasher, type ParsedDigest, parseContentDigest } from "./digests.js";
import { describeErrorBody, RegistryError } from "./errors.js";
import { type RetryPolicy, TransientFailure, withRetries } from "./retry.js";
import type { RegistrySession } from "./session.js";
import { networkCause } from "./transport.js";

/** Where a blob is, and how big it is: the part of a descriptor a download needs. */
export interface BlobDescriptor {
  readonly digest: string;
  readonly size: number;
}

/** Called as bytes arrive; `total` is the descriptor's size. */
export type ProgressCallback = (received: number, total: number) => void;

/** Reads a small blob (a configuration) into memory, verified against its descriptor. */
export async function readBlob(session: RegistrySession, blob: BlobDescriptor, maxBytes: number): Promise<Uint8Array> {
  const digest = checkedDigest(session, blob);
  if (blob.size > maxBytes) {
    throw new RegistryError(
      "invalid",
      session.reference,
      `blob ${blob.digest} is ${blob.size} bytes, more than ${maxBytes} allowed here`,
    );
  }
  const response = await session.get(`blobs/${blob.digest}`, {});
  await checkBlobResponse(session, blob, response);
  const bytes = await readLimited(response, blob.size, session, blob);
  verify(session, blob, digest, bytes.byteLength, hasher(digest).update(bytes).digest("hex"));
  return bytes;
}

/**
 * Streams a blob to `dir/<algorithm>-<hex>` and returns that path. The data
 * goes to a temporary file in `dir` that is renamed only after its size and
 * digest were checked, so the final name never holds anything unverified and
 * an existing final file (from an earlier download) is used as it is.
 */
export async function downloadBlob(
  session: RegistrySession,
  blob: BlobDescriptor,
  dir: string,
  retry: RetryPolicy,
  onProgress?: ProgressCallback,
): Promise<string> {
  const digest = checkedDigest(session, blob);
  const finalPath = join(dir, `${digest.algorithm}-${digest.hex}`);
  const existing = await stat(finalPath).catch(() => undefined);
  if (existing?.isFile() && existing.size === blob.size) return finalPath;
  return withRetries(retry, session.signal, session.reference, () =>
    downloadOnce(session, blob, digest, finalPath, onProgress),
  );
}

async function downloadOnce(
  session: RegistrySession,
  blob: BlobDescriptor,
  digest: ParsedDigest,
  finalPath: string,
  onProgress: ProgressCallback | undefined,
): Promise<string> {
  const temporary = join(finalPath, "..", `.${digest.hex.slice(0, 16)}.${randomUUID()}.partial`);
  try {
    const response = await session.get(`blobs/${blob.digest}`, {}, { retry: false });
    await checkBlobResponse(session, blob, response);
    if (!response.body) throw new TransientFailure(`the registry sent no body for blob ${blob.digest}`);
    const hash = hasher(digest);
    let received = 0;
    const measure = new Transform({
      transform(chunk: Buffer, _encoding, done) {
        received += chunk.byteLength;
        if (received > blob.size) {
          done(sizeMismatch(session, blob, `more than ${blob.size}`));
          return;
        }
        hash.update(chunk);
        onProgress?.(received, blob.size);
        done(null, chunk);
      },
    });
    const body = Readable.fromWeb(response.body as NodeReadableStream<Uint8Array>);
    try {
      await pipeline(body, measure, createWriteStream(temporary, { flags: "wx", mode: 0o644, flush: true }), {
        signal: session.signal,
      });
    } catch (err) {
      if (err instanceof RegistryError || session.signal.aborted || isLocalFileError(err)) throw err;
      throw new TransientFailure(`the download of blob ${blob.digest} broke off: ${networkCause(err)}`, undefined, {
        cause: err,
      });
    }
    verify(session, blob, digest, received, hash.digest("hex"));
    await rename(temporary, finalPath);
    return finalPath;
  } catch (err) {
    await rm(temporary, { force: true });
    throw err;
  }
}

function checkedDigest(session: RegistrySession, blob: BlobDescriptor): ParsedDigest {
  const digest = parseContentDigest(blob.digest);
  if (typeof digest === "string") throw new RegistryError("invalid", session.reference, digest);
  return digest;
}

async function checkBlobResponse(session: RegistrySession, blob: BlobDescriptor, response: Response): Promise<void> {
  if (response.ok) return;
  const detail = describeErrorBody(await response.text());
  if (response.status === 404) {
    throw new RegistryError(
      "not-found",
      session.reference,
      `blob ${blob.digest} is not in repository ${session.ref.repository} on registry ${session.ref.registry}${detail ? ` (${detail})` : ""}`,
    );
  }
  throw new RegistryError(
    "invalid",
    session.reference,
    `the registry answered HTTP ${response.status} for blob ${blob.digest}${detail ? `: ${detail}` : ""}`,
  );
}

function verify(session: RegistrySession, blob: BlobDescriptor, digest: ParsedDigest, size: number, hex: string): void {
  if (size !== blob.size) throw sizeMismatch(session, blob, String(size));
  if (hex !== digest.hex) {
    throw new RegistryError(
      "invalid",
      session.reference,
      `digest mismatch: the registry sent data whose ${digest.algorithm} is ${hex}, not ${digest.hex} as blob ${blob.digest} requires (corrupt storage or a faulty proxy)`,
    );
  }
}

function sizeMismatch(session: RegistrySession, blob: BlobDescriptor, received: string): RegistryError {
  return new RegistryError(
    "invalid",
    session.reference,
    `size mismatch: the registry sent ${received} bytes for blob ${blob.digest}, whose manifest says ${blob.size}`,
  );
}

/** Reads a whole response, refusing more than `limit` bytes (a registry must not make us buffer without bound). */
export async function readLimited(
  response: Response,
  limit: number,
  session: RegistrySession,
  blob?: BlobDescriptor,
): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  let total = 0;
  if (!response.body) return new Uint8Array(0);
  try {
    for await (const chunk of Readable.fromWeb(response.body as NodeReadableStream<Uint8Array>)) {
      total += (chunk as Buffer).byteLength;
      if (total > limit) {
        // Leaving the loop destroys the stream, which closes the connection.
        if (blob) throw sizeMismatch(session, blob, `more than ${limit}`);
        throw new RegistryError("invalid", session.reference, `the registry's answer is larger than ${limit} bytes`);
      }
      chunks.push(chunk as Buffer);
    }
  } catch (err) {
    if (err instanceof RegistryError || session.signal.aborted) throw err;
    throw new RegistryError("unavailable", session.reference, `the answer broke off: ${networkCause(err)}`, {
      cause: err,
    });
  }
  return Buffer.concat(chunks);
}

function isLocalFileError(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return (
    typeof code === "string" && /^(ENOSPC|EACCES|EPERM|EROFS|ENOENT|EEXIST|EDQUOT|EMFILE|ENOTDIR|EISDIR)$/.test(code)
  );
}
