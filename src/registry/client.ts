import { type ImageReference, makeReference } from "../image/reference.js";
import { Authenticator } from "./auth.js";
import { type BlobDescriptor, downloadBlob, type ProgressCallback, readBlob } from "./blob.js";
import { type CredentialSource, type Credentials, composeCredentials, type FoundCredentials } from "./credentials.js";
import { RegistryError } from "./errors.js";
import { type FetchedManifest, fetchManifest } from "./fetch-manifest.js";
import { type ImageConfig, parseImageConfig } from "./image-config.js";
import type { Descriptor, ImageManifest } from "./manifest.js";
import { isConfigMediaType, type LayerCompression, layerSupport } from "./media-types.js";
import { defaultPlatform, formatPlatform, type Platform, selectManifest } from "./platform.js";
import { DEFAULT_RETRY, type RetryPolicy } from "./retry.js";
import { RegistrySession } from "./session.js";
import { Transport } from "./transport.js";

const MAX_CONFIG_BYTES = 16 * 1024 * 1024;

export interface RegistryClientOptions {
  /** Credentials known to the farm (configuration, Docker config.json); per-request ones take precedence. */
  readonly credentials?: CredentialSource;
  /** Registries (`host` or `host:port`) reached over plain HTTP; loopback always is. */
  readonly insecureRegistries?: readonly string[];
  readonly retry?: Partial<RetryPolicy>;
  /** Time allowed for one `resolve` or one `fetchBlob`, retries included; none by default. */
  readonly timeoutMs?: number;
  readonly userAgent?: string;
}

export interface RequestOptions {
  /** Credentials for this request only (e.g. from the action's platform properties). */
  readonly credentials?: Credentials;
  readonly signal?: AbortSignal;
}

export interface FetchBlobOptions extends RequestOptions {
  readonly onProgress?: ProgressCallback;
}

export interface LayerDescriptor {
  readonly digest: string;
  readonly size: number;
  readonly mediaType: string;
  readonly compression: LayerCompression;
}

/** An image pinned down for one platform: everything needed to fetch and unpack it. */
export interface ResolvedImage {
  /** The reference as asked, pinned to `manifestDigest`. */
  readonly reference: ImageReference;
  /** Digest of the platform's image manifest (not of the index, when there is one). */
  readonly manifestDigest: string;
  readonly manifestMediaType: string;
  readonly manifest: ImageManifest;
  /** Digest of the index the manifest was chosen from, when the reference named an index. */
  readonly indexDigest?: string;
  readonly config: ImageConfig;
  readonly configDigest: string;
  /** Bottom layer first, as in the manifest. */
  readonly layers: readonly LayerDescriptor[];
}

export interface RegistryClient {
  /** Finds the image manifest for `platform` (default: this machine's), reads its configuration, checks its layers. */
  resolve(ref: ImageReference, platform?: Platform, options?: RequestOptions): Promise<ResolvedImage>;
  /** Downloads a blob of `ref`'s repository into `dir` (see `downloadBlob`) and returns its path. */
  fetchBlob(ref: ImageReference, blob: BlobDescriptor, dir: string, options?: FetchBlobOptions): Promise<string>;
}

export function createRegistryClient(options: RegistryClientOptions = {}): RegistryClient {
  return new HttpRegistryClient(options);
}

export class HttpRegistryClient implements RegistryClient {
  readonly #transport: Transport;
  readonly #authenticator: Authenticator;
  readonly #retry: RetryPolicy;

  constructor(readonly options: RegistryClientOptions = {}) {
    this.#retry = { ...DEFAULT_RETRY, ...options.retry };
    this.#transport = new Transport({
      insecureRegistries: new Set((options.insecureRegistries ?? []).map((h) => h.toLowerCase())),
      retry: this.#retry,
      userAgent: options.userAgent ?? "berth",
    });
    this.#authenticator = new Authenticator(this.#transport);
  }

  async resolve(ref: ImageReference, platform?: Platform, options: RequestOptions = {}): Promise<ResolvedImage> {
    return this.#withSession(ref, options, async (session) => {
      const wanted = platform ?? defaultPlatform();
      const first = await fetchManifest(session, ref.digest ?? ref.tag ?? "latest");
      const image = first.kind === "index" ? await platformManifest(session, first, wanted) : first;
      const layers = checkLayers(image.manifest, session.reference);
      const configDescriptor = image.manifest.config;
      if (!isConfigMediaType(configDescriptor.mediaType)) {
        throw new RegistryError(
          "invalid",
          session.reference,
          `config media type "${configDescriptor.mediaType}" is not an image configuration (is this an artifact rather than an image?)`,
        );
      }
      const config = parseImageConfig(await readBlob(session, configDescriptor, MAX_CONFIG_BYTES), session.reference);
      if (config.diffIds.length !== layers.length) {
        throw new RegistryError(
          "invalid",
          session.reference,
          `the manifest lists ${layers.length} layers but the configuration ${config.diffIds.length} diff_ids`,
        );
      }
      return {
        reference: makeReference(ref.registry, ref.repository, ref.tag, image.digest),
        manifestDigest: image.digest,
        manifestMediaType: image.mediaType,
        manifest: image.manifest,
        ...(first.kind === "index" ? { indexDigest: first.digest } : {}),
        config,
        configDigest: configDescriptor.digest,
        layers,
      };
    });
  }

  async fetchBlob(
    ref: ImageReference,
    blob: BlobDescriptor,
    dir: string,
    options: FetchBlobOptions = {},
  ): Promise<string> {
    return this.#withSession(ref, options, (session) =>
      downloadBlob(session, blob, dir, this.#retry, options.onProgress),
    );
  }

  async #withSession<T>(
    ref: ImageReference,
    options: RequestOptions,
    run: (session: RegistrySession) => Promise<T>,
  ): Promise<T> {
    const found = await this.#credentialsFor(ref, options.credentials);
    const signals = options.signal ? [options.signal] : [];
    let timer: NodeJS.Timeout | undefined;
    if (this.options.timeoutMs !== undefined) {
      const controller = new AbortController();
      const seconds = this.options.timeoutMs / 1000;
      timer = setTimeout(() => {
        const reason = new Error(`the pull did not finish within ${seconds} s`);
        reason.name = "TimeoutError";
        controller.abort(reason);
      }, this.options.timeoutMs);
      signals.push(controller.signal);
    }
    const session = new RegistrySession(ref, this.#transport, this.#authenticator, found, AbortSignal.any(signals));
    try {
      return await run(session);
    } finally {
      clearTimeout(timer);
    }
  }

  async #credentialsFor(
    ref: ImageReference,
    perRequest: Credentials | undefined,
  ): Promise<FoundCredentials | undefined> {
    const source = composeCredentials(
      perRequest && { lookup: async () => ({ credentials: perRequest, origin: "the request's credentials" }) },
      this.options.credentials,
    );
    return source.lookup(ref.registry);
  }
}

/** The image manifest an index lists for `wanted`; nested indexes are not followed. */
async function platformManifest(
  session: RegistrySession,
  index: FetchedManifest & { kind: "index" },
  wanted: Platform,
): Promise<FetchedManifest & { kind: "image" }> {
  const chosen = selectManifest(index.index, wanted, session.reference);
  const image = await fetchManifest(session, chosen.digest);
  if (image.kind === "image") return image;
  throw new RegistryError(
    "invalid",
    session.reference,
    `index entry ${chosen.digest} for ${formatPlatform(wanted)} is itself an index; Berth expects an image manifest there`,
  );
}

function checkLayers(manifest: ImageManifest, reference: string): LayerDescriptor[] {
  return manifest.layers.map((layer: Descriptor, i) => {
    const support = layerSupport(layer.mediaType);
    if (!support.ok) throw new RegistryError("invalid", reference, `layer ${i} (${layer.digest}): ${support.reason}`);
    return { digest: layer.digest, size: layer.size, mediaType: layer.mediaType, compression: support.compression };
  });
}
