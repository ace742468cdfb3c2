import { mkdir, rm } from "node:fs/promises";
import type { BlobStore } from "../cas/blob-store.js";
import type { Digest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type { Logger } from "../log/log.js";
import { Code, StatusError } from "../status/status.js";
import { CurlLauncher } from "./curl-launcher.js";
import { DownloadSlots } from "./download-slots.js";
import { readGrowingFile } from "./growing-file.js";
import type { OriginPolicy } from "./origin-policy.js";
import { describeUrl, discard, failureOf, type OriginBody, openOrigin } from "./origin-request.js";
import { SriCheck, type SriChecksum } from "./sri.js";
import { UriFailure } from "./uri-failure.js";

export interface OriginFetcherOptions {
  /** Where curl writes downloads before they are verified and moved into the CAS (emptied at start). */
  tempDir: string;
  /** asset.fetch.maxBlobBytes */
  maxBlobBytes: number;
  /** asset.fetch.maxConcurrentDownloads */
  maxConcurrentDownloads: number;
}

/** One download: the URIs to try in order and what the content must satisfy. */
export interface OriginFetch {
  /** undefined for a URI that is no http(s) URL (a URN): nothing to download there. */
  readonly uris: readonly (URL | undefined)[];
  readonly fn: DigestFunction;
  /** checksum.sri: the content must match one of these. */
  readonly checksums: readonly SriChecksum[] | undefined;
  /** Request headers for uris[i] (a client's credentials): sent to that URI's origin only, never logged. */
  headersFor(index: number): Readonly<Record<string, string>>;
  readonly timeoutMs: number;
  /** For the log. */
  readonly instanceName: string;
}

export interface Fetched {
  /** Index in `uris` of the URI that gave the content. */
  readonly uriIndex: number;
  readonly digest: Digest;
  /** When the download started (what oldest_content_accepted is compared with). */
  readonly startedAt: number;
}

/**
 * Downloads a blob from the first URI that gives content satisfying the
 * checksums, into the CAS, within a deadline. curl writes the body into a
 * file of the temporary directory (origin-request.ts, curl-transfer.ts)
 * and cannot make it longer than maxBlobBytes; the body is hashed here as
 * it grows, and the file, once complete and verified, is moved into the CAS.
 */
export class OriginFetcher {
  private readonly stopping = new AbortController();
  private readonly slots: DownloadSlots;
  private readonly launcher: CurlLauncher;

  constructor(
    private readonly cas: BlobStore,
    private readonly policy: OriginPolicy,
    private readonly options: OriginFetcherOptions,
    private readonly log: Logger,
  ) {
    this.slots = new DownloadSlots(options.maxConcurrentDownloads);
    this.launcher = new CurlLauncher(options.maxBlobBytes);
  }

  /** Empties the temporary directory: what an earlier run left is of no use. */
  async open(): Promise<void> {
    await rm(this.options.tempDir, { recursive: true, force: true });
    await mkdir(this.options.tempDir, { recursive: true, mode: 0o700 });
    if (this.policy.fetches) this.launcher.prepare();
  }

  /** Aborts every download under way. */
  close(): void {
    this.stopping.abort(new Error("the server is stopping"));
    this.launcher.close();
  }

  /**
   * The content; or PERMISSION_DENIED (the policy refused every URI), NOT_FOUND (no URI gave it) or
   * DEADLINE_EXCEEDED (the timeout passed), each URI's reason named.
   */
  async fetch(request: OriginFetch): Promise<Fetched> {
    if (this.stopping.signal.aborted) throw new StatusError(Code.UNAVAILABLE, "the server is stopping");
    // One controller per fetch, ended by its timeout or by close(); both hooks are removed when it is done.
    const controller = new AbortController();
    const started = Date.now();
    const timer = setTimeout(
      () => controller.abort(new DOMException("the fetch's timeout passed", "TimeoutError")),
      request.timeoutMs,
    );
    const stop = () => controller.abort(this.stopping.signal.reason);
    this.stopping.signal.addEventListener("abort", stop, { once: true });
    try {
      let release: () => void;
      try {
        release = await this.slots.acquire(controller.signal);
      } catch {
        const limit = `${this.slots.size} (asset.fetch.maxConcurrentDownloads)`;
        if (this.stopping.signal.aborted) throw new StatusError(Code.UNAVAILABLE, "the server is stopping");
        throw new StatusError(
          Code.DEADLINE_EXCEEDED,
          `the fetch's timeout of ${request.timeoutMs / 1000} s passed while it waited for a download slot: ` +
            `all ${limit} were busy`,
        );
      }
      try {
        return await this.tryUris(request, controller.signal, started + request.timeoutMs);
      } finally {
        release();
        // The next download's curl starts now, between downloads rather than during one.
        this.launcher.prepare();
      }
    } finally {
      clearTimeout(timer);
      this.stopping.signal.removeEventListener("abort", stop);
    }
  }

  private async tryUris(request: OriginFetch, signal: AbortSignal, deadline: number): Promise<Fetched> {
    const startedAt = Date.now();
    const reasons: string[] = [];
    let allRefused = true;
    for (const [i, url] of request.uris.entries()) {
      if (!url) {
        reasons.push(`uris[${i}]: no association, and not an http or https URL to download`);
        allRefused = false;
        continue;
      }
      const began = Date.now();
      try {
        const digest = await this.fetchOne(url, request, request.headersFor(i), signal, deadline);
        this.log.info(
          { instance: request.instanceName, uri: describeUrl(url), bytes: digest.sizeBytes, ms: Date.now() - began },
          `fetched ${describeUrl(url)} (${digest.sizeBytes} bytes) into the CAS`,
        );
        return { uriIndex: i, digest, startedAt };
      } catch (err) {
        // The CAS or the disk failing is no fault of the URI: the next one would fail alike.
        if (err instanceof StoreFailure) throw err.cause;
        const failure = failureOf(err, signal);
        reasons.push(`uris[${i}] (${describeUrl(url)}): ${failure.message}`);
        if (failure.kind !== "refused") allRefused = false;
        this.log.info(
          { instance: request.instanceName, uri: describeUrl(url), reason: failure.message },
          `fetching ${describeUrl(url)} failed: ${failure.message}`,
        );
        if (failure.kind === "timedOut") {
          throw new StatusError(
            Code.DEADLINE_EXCEEDED,
            `the fetch did not finish within its timeout of ${request.timeoutMs / 1000} s: ${reasons.join("; ")}`,
          );
        }
        if (signal.aborted) throw new StatusError(Code.UNAVAILABLE, `the fetch was stopped: ${reasons.join("; ")}`);
      }
    }
    // The protocol's code for "an asset from a disallowed origin"; any other failure is "not found there".
    if (allRefused) throw new StatusError(Code.PERMISSION_DENIED, `no URI may be fetched: ${reasons.join("; ")}`);
    throw new StatusError(Code.NOT_FOUND, `no URI gave the asset: ${reasons.join("; ")}`);
  }

  private async fetchOne(
    url: URL,
    request: OriginFetch,
    headers: Readonly<Record<string, string>>,
    signal: AbortSignal,
    deadline: number,
  ): Promise<Digest> {
    const max = this.options.maxBlobBytes;
    const limits = { launcher: this.launcher, tempDir: this.options.tempDir, maxBytes: max, deadline };
    const origin = await openOrigin(url, headers, this.policy, signal, limits);
    try {
      if (origin.length !== undefined && origin.length > max) {
        throw new UriFailure(`its ${origin.length} bytes are more than asset.fetch.maxBlobBytes (${max})`);
      }
      // With a checksum in the CAS's own function and the length announced, the blob's digest is known now:
      // the CAS may hold that blob already (another URL, an association evicted before its blob).
      const sameFunction = request.checksums?.filter((c) => c.algorithm === request.fn.name) ?? [];
      if (sameFunction.length === 1 && origin.length !== undefined) {
        const expected = { fn: request.fn, hash: (sameFunction[0] as SriChecksum).hex, sizeBytes: origin.length };
        if ((await stored(() => this.cas.findMissing([expected]))).length === 0) return expected;
      }
      const digest = await this.readBody(origin, request, signal);
      // Verified, and nothing writes the file any more: it becomes the blob by a rename. A downloaded asset is a
      // copy of what its URL serves, named by a write-behind association: flushed in the background (see
      // PutOptions.durable); a crash may lose both, and the next fetch downloads it again.
      await stored(() =>
        // An empty body may leave no file (curl creates it at the first byte).
        digest.sizeBytes === 0
          ? this.cas.put(digest, new Uint8Array(0), { durable: false })
          : this.cas.adoptFile(digest, origin.path, { durable: false }),
      );
      return digest;
    } catch (err) {
      throw err instanceof StoreFailure ? err : failureOf(err, signal);
    } finally {
      // Whatever happened, curl is gone and its file too before the download slot is given back.
      await discard(origin.transfer, origin.path);
    }
  }

  /** Hashes the body as curl writes it; the blob's digest once it is complete, of the right length and checksum. */
  private async readBody(origin: OriginBody, request: OriginFetch, signal: AbortSignal): Promise<Digest> {
    const max = this.options.maxBlobBytes;
    const hasher = await request.fn.createHasher();
    const check = request.checksums ? new SriCheck(request.checksums, request.fn.name) : undefined;
    const size = await readGrowingFile(
      origin.path,
      origin.transfer,
      (chunk) => {
        hasher.update(chunk);
        check?.update(chunk);
      },
      signal,
    );
    // The file may hold one byte past the cap (prlimit lets it grow to max + 1): a body longer than the cap.
    if (size > max) throw new UriFailure(`it sent more than asset.fetch.maxBlobBytes (${max} bytes)`);
    if (origin.length !== undefined && size !== origin.length) {
      throw new UriFailure(`the body ended after ${size} of ${origin.length} bytes`);
    }
    const digest: Digest = { fn: request.fn, hash: hasher.digestHex(), sizeBytes: size };
    const mismatch = check?.mismatch(digest.hash);
    if (mismatch) throw new UriFailure(mismatch);
    return digest;
  }
}

/** A failure of the CAS or the disk while a download is stored (`cause`: what they threw). */
class StoreFailure extends Error {
  constructor(override readonly cause: unknown) {
    super("storing the download failed");
  }
}

async function stored<T>(operation: () => Promise<T>): Promise<T> {
  try {
    return await operation();
  } catch (err) {
    throw new StoreFailure(err);
  }
}
