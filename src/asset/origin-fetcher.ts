import { mkdir, rm } from "node:fs/promises";
import type { BlobStore } from "../cas/blob-store.js";
import type { Digest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type { Logger } from "../log/log.js";
import { Code, StatusError } from "../status/status.js";
import { type BlobSink, CasSink, TempFileSink } from "./blob-sink.js";
import { DownloadSlots } from "./download-slots.js";
import type { OriginPolicy } from "./origin-policy.js";
import { describeUrl, failureOf, type OriginBody, openOrigin, UriFailure } from "./origin-request.js";
import { SriCheck, type SriChecksum } from "./sri.js";

export interface OriginFetcherOptions {
  /** Where downloads whose digest is not known in advance are written first (emptied at start). */
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

/** Bytes gathered before a write reaches the sink: one writev of the network's 16-64 KiB chunks, not copied together. */
const WRITE_BYTES = 1024 * 1024;

/**
 * Downloads a blob from the first URI that gives content satisfying the
 * checksums, into the CAS, within a deadline. The body streams to disk as it
 * arrives (a chunk in memory at a time) and is cut off past maxBlobBytes.
 */
export class OriginFetcher {
  private readonly stopping = new AbortController();
  private readonly slots: DownloadSlots;

  constructor(
    private readonly cas: BlobStore,
    private readonly policy: OriginPolicy,
    private readonly options: OriginFetcherOptions,
    private readonly log: Logger,
  ) {
    this.slots = new DownloadSlots(options.maxConcurrentDownloads);
  }

  /** Empties the temporary directory: what an earlier run left is of no use. */
  async open(): Promise<void> {
    await rm(this.options.tempDir, { recursive: true, force: true });
    await mkdir(this.options.tempDir, { recursive: true, mode: 0o700 });
  }

  /** Aborts every download under way. */
  close(): void {
    this.stopping.abort(new Error("the server is stopping"));
  }

  /**
   * The content; or PERMISSION_DENIED (the policy refused every URI), NOT_FOUND (no URI gave it) or
   * DEADLINE_EXCEEDED (the timeout passed), each URI's reason named.
   */
  async fetch(request: OriginFetch): Promise<Fetched> {
    if (this.stopping.signal.aborted) throw new StatusError(Code.UNAVAILABLE, "the server is stopping");
    // One controller per fetch, ended by its timeout or by close(); both hooks are removed when it is done.
    const controller = new AbortController();
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
        return await this.tryUris(request, controller.signal);
      } finally {
        release();
      }
    } finally {
      clearTimeout(timer);
      this.stopping.signal.removeEventListener("abort", stop);
    }
  }

  private async tryUris(request: OriginFetch, signal: AbortSignal): Promise<Fetched> {
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
        const digest = await this.fetchOne(url, request, request.headersFor(i), signal);
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
  ): Promise<Digest> {
    const origin = await openOrigin(url, headers, this.policy, signal);
    const max = this.options.maxBlobBytes;
    if (origin.length !== undefined && origin.length > max) {
      origin.body.destroy();
      throw new UriFailure(`its ${origin.length} bytes are more than asset.fetch.maxBlobBytes (${max})`);
    }
    // With a checksum in the CAS's own function and the length announced, the blob's digest is known now:
    // the bytes go straight into the CAS, whose writer checks them.
    const sameFunction = request.checksums?.filter((c) => c.algorithm === request.fn.name) ?? [];
    const expected =
      sameFunction.length === 1 && origin.length !== undefined
        ? { fn: request.fn, hash: (sameFunction[0] as SriChecksum).hex, sizeBytes: origin.length }
        : undefined;
    // The CAS may hold that blob already (another URL, an association evicted before its blob): no need to read on.
    if (expected && (await stored(() => this.cas.findMissing([expected]))).length === 0) {
      origin.body.destroy();
      return expected;
    }
    const sink = await stored<BlobSink>(() =>
      expected ? CasSink.open(this.cas, expected) : TempFileSink.open(this.cas, request.fn, this.options.tempDir),
    );
    const check = expected || !request.checksums ? undefined : new SriCheck(request.checksums);
    try {
      await copyBody(origin, sink, check, max, signal);
    } catch (err) {
      origin.body.destroy();
      await sink.abort();
      throw err instanceof StoreFailure ? err : failureOf(err, signal);
    }
    const mismatch = check?.mismatch();
    if (mismatch) {
      await sink.abort();
      throw new UriFailure(mismatch);
    }
    try {
      return await sink.finish();
    } catch (err) {
      if (expected && err instanceof StatusError && err.code === Code.INVALID_ARGUMENT) {
        const asked = (sameFunction[0] as SriChecksum).text;
        throw new UriFailure(`the content does not match checksum.sri ${asked} (its ${request.fn.name} differs)`);
      }
      throw new StoreFailure(err);
    }
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

/** Streams the body into the sink, a megabyte of chunks at a time, counting against the cap. */
async function copyBody(
  origin: OriginBody,
  sink: BlobSink,
  check: SriCheck | undefined,
  max: number,
  signal: AbortSignal,
): Promise<void> {
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  let total = 0;
  const flush = async () => {
    if (pendingBytes === 0) return;
    const chunks = pending;
    pending = [];
    pendingBytes = 0;
    if (check) for (const chunk of chunks) check.update(chunk);
    await stored(() => sink.write(chunks));
  };
  try {
    for await (const chunk of origin.body as AsyncIterable<Buffer>) {
      total += chunk.byteLength;
      if (total > max) throw new UriFailure(`it sent more than asset.fetch.maxBlobBytes (${max} bytes)`);
      pending.push(chunk);
      pendingBytes += chunk.byteLength;
      if (pendingBytes >= WRITE_BYTES) await flush();
    }
    if (signal.aborted) throw signal.reason;
    if (origin.length !== undefined && total !== origin.length) {
      throw new UriFailure(`the body ended after ${total} of ${origin.length} bytes`);
    }
    await flush();
  } finally {
    origin.body.destroy();
  }
}
