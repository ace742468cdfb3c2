import { randomBytes } from "node:crypto";
import { unlink } from "node:fs/promises";
import { join } from "node:path";
import type { CurlLauncher } from "./curl-launcher.js";
import { CurlTransfer, type ResponseHead } from "./curl-transfer.js";
import { type OriginPolicy, OriginRefused } from "./origin-policy.js";
import { UriFailure } from "./uri-failure.js";

const MAX_REDIRECTS = 10;
const REDIRECTS = new Set([301, 302, 303, 307, 308]);

/** Scheme, host and path: never userinfo, and no query (where pre-signed URLs keep their signatures). */
export function describeUrl(url: URL): string {
  return `${url.protocol}//${url.host}${url.pathname.length > 200 ? `${url.pathname.slice(0, 200)}…` : url.pathname}`;
}

/** A 200 answer of an origin, its body being written by curl into `path`. */
export interface OriginBody {
  readonly transfer: CurlTransfer;
  /** The file the body is written to (the caller removes it). */
  readonly path: string;
  /** Content-Length, when the origin sent one. */
  readonly length: number | undefined;
  /** Where the body came from, after redirects. */
  readonly url: URL;
}

export interface OriginLimits {
  /** Starts curl under the same byte cap as `maxBytes`. */
  readonly launcher: CurlLauncher;
  /** Where the body's file is made. */
  readonly tempDir: string;
  readonly maxBytes: number;
  /** When the whole fetch must be over (Date.now() clock): curl's own backstop deadline. */
  readonly deadline: number;
}

/**
 * GETs `start`, following redirects by hand so that every hop is checked by
 * the policy (host, port, scheme, the addresses its name resolves to, which
 * are the only ones curl may connect to); `headers` (a client's
 * credentials) go only to the first URL's origin. Anything but 200 at the
 * end is a UriFailure. Each hop's curl is killed when `signal` aborts.
 */
export async function openOrigin(
  start: URL,
  headers: Readonly<Record<string, string>>,
  policy: OriginPolicy,
  signal: AbortSignal,
  limits: OriginLimits,
): Promise<OriginBody> {
  let url = start;
  for (let hop = 0; ; hop++) {
    let addresses: string[] | undefined;
    try {
      policy.check(url);
      addresses = await policy.addressesFor(url);
    } catch (err) {
      if (!(err instanceof OriginRefused)) throw failureOf(err, signal);
      throw new UriFailure(hop === 0 ? err.message : `redirected to ${describeUrl(url)}: ${err.message}`, "refused");
    }
    if (signal.aborted) throw failureOf(signal.reason, signal);
    // curl creates the file itself: one opened with O_TRUNC over an existing empty file would be flushed to
    // disk when curl closes it (ext4's auto_da_alloc), a write-back no download needs before it is verified.
    const path = join(limits.tempDir, `download-${randomBytes(12).toString("hex")}`);
    const transfer = CurlTransfer.start(limits.launcher.take(), {
      url,
      addresses,
      headers: url.origin === start.origin ? headers : {},
      outputPath: path,
      maxBytes: limits.maxBytes,
      maxTimeMs: limits.deadline - Date.now() + CURL_DEADLINE_GRACE_MS,
    });
    const stop = () => transfer.kill();
    signal.addEventListener("abort", stop, { once: true });
    transfer.done.then(
      () => signal.removeEventListener("abort", stop),
      () => signal.removeEventListener("abort", stop),
    );
    let head: ResponseHead;
    try {
      head = await transfer.head;
    } catch (err) {
      await discard(transfer, path);
      throw failureOf(err, signal);
    }
    const location = head.headers.get("location");
    if (REDIRECTS.has(head.status) && location !== undefined) {
      await discard(transfer, path);
      if (hop >= MAX_REDIRECTS) throw new UriFailure(`more than ${MAX_REDIRECTS} redirects`);
      try {
        url = new URL(location, url);
      } catch {
        throw new UriFailure(`redirected to a location that is not a URL`);
      }
      continue;
    }
    if (head.status !== 200) {
      await discard(transfer, path);
      const where = hop === 0 ? "" : ` (after redirects, at ${describeUrl(url)})`;
      throw new UriFailure(`HTTP ${head.status} ${head.statusText}`.trim() + where);
    }
    const header = head.headers.get("content-length");
    const length = header !== undefined && /^[0-9]+$/.test(header) ? Number(header) : undefined;
    return { transfer, path, length, url };
  }
}

/** curl's --max-time is set this much past the fetch's deadline: the fetch's own timer is the one that counts. */
const CURL_DEADLINE_GRACE_MS = 2000;

/** Stops a transfer whose body is not wanted and removes its file once curl is gone. */
export async function discard(transfer: CurlTransfer, path: string): Promise<void> {
  transfer.kill();
  await transfer.done.catch(() => {});
  await unlink(path).catch(() => {});
}

/** What a failed hop says, in words a person can act on; once the signal aborted, that is the reason. */
export function failureOf(err: unknown, signal: AbortSignal): UriFailure {
  if (signal.aborted) {
    const reason: unknown = signal.reason;
    const timedOut = reason instanceof Error && reason.name === "TimeoutError";
    return timedOut
      ? new UriFailure("the fetch's timeout passed", "timedOut")
      : new UriFailure("the fetch was stopped");
  }
  if (err instanceof UriFailure) return err;
  if (err instanceof OriginRefused) return new UriFailure(err.message, "refused");
  return new UriFailure(lookupCause(err));
}

/** What the policy's DNS lookup failed with (curl does no lookup of its own). */
const LOOKUP_WORDS: Record<string, string> = {
  ENOTFOUND: "the host name does not resolve",
  EAI_AGAIN: "the host name could not be resolved",
};

function lookupCause(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code;
  if (typeof code === "string") return `${LOOKUP_WORDS[code] ?? (err as Error).message} [${code}]`;
  return err instanceof Error ? err.message : String(err);
}
