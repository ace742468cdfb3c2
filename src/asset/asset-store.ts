import { createHash } from "node:crypto";
import type { BlobStore } from "../cas/blob-store.js";
import type { Digest } from "../digest/digest.js";
import { formatDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type { Logger } from "../log/log.js";
import { SingleFlight } from "../registry/single-flight.js";
import { invalidArgument, missingBlobs, notFound } from "../status/status.js";
import type { AssetAssociations, AssetKind } from "./associations.js";
import { type StoredTree, storeTree, type TreeWalkLimits } from "./directory-trees.js";
import type { Fetched, OriginFetcher } from "./origin-fetcher.js";
import { type Qualifier, type ReadQualifiers, readQualifiers, unsupportedQualifiers } from "./qualifiers.js";
import { SriCheck } from "./sri.js";

/** What every Fetch and Push names: URIs (at least one) and qualifiers, in one instance, in one digest function. */
export interface AssetRequest {
  readonly instanceName: string;
  readonly uris: readonly string[];
  readonly qualifiers: readonly Qualifier[];
  readonly fn: DigestFunction;
}

export interface FetchRequest extends AssetRequest {
  /** oldest_content_accepted (ms since the epoch). */
  readonly oldestAccepted: number | undefined;
}

export interface FetchBlobRequest extends FetchRequest {
  /** timeout (ms); undefined: the farm's default. */
  readonly timeoutMs: number | undefined;
}

export interface PushRequest extends AssetRequest {
  /** expire_at (ms since the epoch). */
  readonly expireAt: number | undefined;
  readonly referencedBlobs: readonly Digest[];
  readonly referencedDirectories: readonly Digest[];
}

/** The content found for a request. */
export interface AssetAnswer {
  /** The URI of the request it was found or fetched for. */
  readonly uri: string;
  /** The blob, or the root Directory. */
  readonly digest: Digest;
  readonly expireAt: number | undefined;
}

/** The Remote Asset API as the rest of Berth sees it; errors are StatusErrors with the protocol's codes. */
export interface AssetStore {
  fetchBlob(request: FetchBlobRequest): Promise<AssetAnswer>;
  fetchDirectory(request: FetchRequest): Promise<AssetAnswer>;
  pushBlob(request: PushRequest & { readonly blob: Digest }): Promise<void>;
  pushDirectory(request: PushRequest & { readonly root: Digest }): Promise<void>;
  /** Stops downloads under way. */
  close(): void;
}

export interface FarmAssetStoreOptions {
  /** asset.fetch.defaultTimeoutSeconds and maxTimeoutSeconds, in ms. */
  defaultTimeoutMs: number;
  maxTimeoutMs: number;
  /** How far a pushed tree is walked (execution.inputLimits). */
  treeLimits: TreeWalkLimits;
}

/**
 * The farm's asset store: associations in the action cache, content in the
 * CAS, downloads by the OriginFetcher. Identical concurrent FetchBlobs share
 * one download, which runs to its own timeout even when the calls that
 * wanted it are gone (the protocol asks that it then be available to later
 * calls).
 */
export class FarmAssetStore implements AssetStore {
  private readonly downloads = new SingleFlight<string, Fetched>();

  constructor(
    private readonly cas: BlobStore,
    private readonly associations: AssetAssociations,
    private readonly fetcher: OriginFetcher,
    private readonly options: FarmAssetStoreOptions,
    private readonly log: Logger,
  ) {}

  async fetchBlob(request: FetchBlobRequest): Promise<AssetAnswer> {
    const urls = parseUris(request.uris);
    const qualifiers = readQualifiers(request.qualifiers, request.uris);
    const found = await this.find("blob", request, qualifiers);
    if (found) return found;
    if (qualifiers.unsupported.length > 0) throw unsupportedQualifiers(qualifiers.unsupported);
    const timeoutMs = this.timeoutOf(request.timeoutMs);
    const fetched = await this.downloads.run(flightKey(request), async () => {
      const result = await this.fetcher.fetch({
        uris: urls,
        fn: request.fn,
        checksums: qualifiers.checksums,
        headersFor: qualifiers.headersFor,
        timeoutMs,
        instanceName: request.instanceName,
      });
      await this.rememberFetched(request, qualifiers, result);
      return result;
    });
    return { uri: request.uris[fetched.uriIndex] as string, digest: fetched.digest, expireAt: undefined };
  }

  async fetchDirectory(request: FetchRequest): Promise<AssetAnswer> {
    parseUris(request.uris);
    const qualifiers = readQualifiers(request.qualifiers, request.uris);
    const found = await this.find("directory", request, qualifiers);
    if (found) return found;
    throw notFound(
      `no directory is associated with ${describeUris(request.uris)} and these qualifiers in instance ` +
        `"${request.instanceName}" (or its content was evicted or expired): this farm answers FetchDirectory ` +
        "with pushed directories only",
    );
  }

  async pushBlob(request: PushRequest & { readonly blob: Digest }): Promise<void> {
    const { qualifiers, references } = await this.checkPush(request, [request.blob]);
    if (qualifiers.checksums) await this.checkPushedChecksum(request.blob, qualifiers);
    await this.associations.remember(request.instanceName, "blob", request.fn, request.uris, qualifiers.key, {
      blob: request.blob,
      ...references,
      at: Date.now(),
      expireAt: request.expireAt,
    });
  }

  async pushDirectory(request: PushRequest & { readonly root: Digest }): Promise<void> {
    const { qualifiers, references } = await this.checkPush(request, []);
    const tree = await storeTree(this.cas, request.root, this.options.treeLimits, "root_directory_digest");
    await this.associations.remember(request.instanceName, "directory", request.fn, request.uris, qualifiers.key, {
      tree,
      ...references,
      at: Date.now(),
      expireAt: request.expireAt,
    });
  }

  close(): void {
    this.fetcher.close();
  }

  private async find(
    kind: AssetKind,
    request: FetchRequest,
    qualifiers: ReadQualifiers,
  ): Promise<AssetAnswer | undefined> {
    const found = await this.associations.find(
      request.instanceName,
      kind,
      request.fn,
      request.uris,
      qualifiers.key,
      request.oldestAccepted,
    );
    if (!found) return undefined;
    return { uri: request.uris[found.uriIndex] as string, digest: found.digest, expireAt: found.expireAt };
  }

  /**
   * Remembers a download. Content checked against checksum.sri is that
   * content whichever URI gave it, so it is remembered for every URI of the
   * request; without a checksum only for the URI it came from (another
   * URI of a list could name other content). Content reached with a
   * client's request headers (its credentials, usually) is remembered only
   * when a checksum was checked: otherwise a client without those
   * credentials would be answered what only they may read.
   */
  private async rememberFetched(
    request: FetchBlobRequest,
    qualifiers: ReadQualifiers,
    fetched: Fetched,
  ): Promise<void> {
    if (qualifiers.hasHeaders && !qualifiers.checksums) return;
    const uris = qualifiers.checksums ? request.uris : [request.uris[fetched.uriIndex] as string];
    try {
      await this.associations.remember(request.instanceName, "blob", request.fn, uris, qualifiers.key, {
        blob: fetched.digest,
        referencedBlobs: [],
        referencedTrees: [],
        at: fetched.startedAt,
        expireAt: undefined,
      });
    } catch (err) {
      // The blob is in the CAS and the answer stands; only a later call will fetch again.
      this.log.warn({ err }, "a fetched asset could not be remembered");
    }
  }

  private async checkPush(
    request: PushRequest,
    blobs: readonly Digest[],
  ): Promise<{ qualifiers: ReadQualifiers; references: { referencedBlobs: Digest[]; referencedTrees: StoredTree[] } }> {
    parseUris(request.uris);
    const qualifiers = readQualifiers(request.qualifiers, request.uris);
    if (qualifiers.hasHeaders) {
      throw invalidArgument(
        "qualifiers",
        "request headers (bazel.auth_headers, http_header:…) are not kept with an association; push without them",
      );
    }
    if (request.expireAt !== undefined && request.expireAt <= Date.now()) {
      throw invalidArgument("expire_at", "is in the past: the association would never be answered");
    }
    const missing = await this.cas.findMissing([...blobs, ...request.referencedBlobs]);
    if (missing.length > 0) throw missingBlobs(missing.map((d) => `blobs/${formatDigest(d)}`));
    const referencedTrees: StoredTree[] = [];
    for (const [i, root] of request.referencedDirectories.entries()) {
      referencedTrees.push(await storeTree(this.cas, root, this.options.treeLimits, `references_directories[${i}]`));
    }
    return { qualifiers, references: { referencedBlobs: [...request.referencedBlobs], referencedTrees } };
  }

  /**
   * A pushed blob said to match checksum.sri is checked, so that a later
   * fetch asking for that checksum is never answered other content, whoever
   * pushed it.
   */
  private async checkPushedChecksum(blob: Digest, qualifiers: ReadQualifiers): Promise<void> {
    const checksums = qualifiers.checksums ?? [];
    if (checksums.some((c) => c.algorithm === blob.fn.name && c.hex === blob.hash)) return;
    const stream = await this.cas.openRead(blob, 0, 0);
    if (!stream) throw missingBlobs([`blobs/${formatDigest(blob)}`]);
    const check = new SriCheck(checksums);
    for await (const chunk of stream as AsyncIterable<Buffer>) check.update(chunk);
    const mismatch = check.mismatch();
    if (mismatch) throw invalidArgument("qualifiers", `checksum.sri does not match blob_digest: ${mismatch}`);
  }

  private timeoutOf(asked: number | undefined): number {
    if (asked === undefined || asked === 0) return this.options.defaultTimeoutMs;
    return Math.min(asked, this.options.maxTimeoutMs);
  }
}

/**
 * Checks a request's URIs: at least one, each an absolute URI; an http(s)
 * one with credentials in it is refused (they would end up in logs and
 * messages). Returns the http(s) ones parsed, undefined for the others
 * (URNs and such, answered only from pushes).
 */
function parseUris(uris: readonly string[]): (URL | undefined)[] {
  if (uris.length === 0) throw invalidArgument("uris", "at least one URI is required");
  return uris.map((uri, i) => {
    const field = `uris[${i}]`;
    if (uri === "") throw invalidArgument(field, "is empty");
    let url: URL;
    try {
      url = new URL(uri);
    } catch {
      throw invalidArgument(field, `"${shownUri(uri)}" is not an absolute URI`);
    }
    if (url.protocol !== "http:" && url.protocol !== "https:") return undefined;
    if (url.username !== "" || url.password !== "") {
      throw invalidArgument(field, "a URL with credentials in it (user:password@host) is not accepted");
    }
    return url;
  });
}

/** A URI that did not parse, for a message: cut short, and whatever precedes an @ (credentials, maybe) left out. */
function shownUri(uri: string): string {
  const clipped = uri.length > 100 ? `${uri.slice(0, 100)}…` : uri;
  return clipped.includes("@")
    ? `${clipped.slice(0, clipped.indexOf(":") + 1)}…@${clipped.slice(clipped.lastIndexOf("@") + 1)}`
    : clipped;
}

function describeUris(uris: readonly string[]): string {
  const shown = uris.slice(0, 3).map((_, i) => `uris[${i}]`);
  return uris.length > 3 ? `${shown.join(", ")} and ${uris.length - 3} more` : shown.join(", ");
}

/** What makes two FetchBlobs the same download (hashed: it holds the request's headers). */
function flightKey(request: FetchBlobRequest): string {
  const key = JSON.stringify([request.instanceName, request.fn.name, request.uris, request.qualifiers]);
  return createHash("sha256").update(key).digest("hex");
}
