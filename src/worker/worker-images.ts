import { join } from "node:path";
import type { RegistryCredentials } from "../execution/action-platform.js";
import { registryStatus } from "../execution/image-policy.js";
import { ImageStore } from "../image/image-store.js";
import type { LayerDescriptor } from "../image/layer-store.js";
import { type ImageReference, parseImageReference } from "../image/reference.js";
import type { RegistryClient, ResolvedImage } from "../registry/client.js";
import { Credentials } from "../registry/credentials.js";
import { SingleFlight } from "../registry/single-flight.js";

export interface WorkerImagesOptions {
  /** The image store's directory (layers, downloads). */
  dir: string;
  maxBytes: number;
  registry: RegistryClient;
  /** How long a tag's resolution is trusted; digests are trusted forever. */
  tagRefreshMs: number;
}

/** An image ready to be an action's root; its layers stay until `release`. */
export interface PreparedImage {
  /** Pinned to the manifest that runs. */
  reference: ImageReference;
  manifestDigest: string;
  /** The image configuration's Env, NAME=VALUE. */
  env: string[];
  /** Unpacked layers, bottom to top. */
  layerDirs: string[];
  release(): Promise<void>;
}

/**
 * A worker's images: resolves references through the registry (a tag is
 * asked again only after `tagRefreshMs`), and pulls and unpacks each layer
 * once however many actions want it at the same time.
 */
export class WorkerImages {
  private readonly resolved = new Map<string, { image: ResolvedImage; at: number }>();
  private readonly resolving = new SingleFlight<string, ResolvedImage>();
  /** Who may fetch a layer being pulled: its repository and that action's credentials. */
  private readonly sources = new Map<string, { reference: ImageReference; credentials?: Credentials }>();
  private store: ImageStore | undefined;

  private constructor(private readonly options: WorkerImagesOptions) {}

  static async open(options: WorkerImagesOptions): Promise<WorkerImages> {
    const images = new WorkerImages(options);
    images.store = await ImageStore.open(join(options.dir, "store"), {
      maxBytes: options.maxBytes,
      fetchLayer: (layer, intoDir) => images.fetchLayer(layer, intoDir),
    });
    return images;
  }

  /** Resolves, pulls what is missing and pins the image; failures are statuses naming the image. */
  async prepare(reference: string, credentials: RegistryCredentials | undefined): Promise<PreparedImage> {
    const ref = parseImageReference(reference);
    const creds = credentials && new Credentials(credentials.username, credentials.password);
    try {
      const image = await this.resolve(ref, creds);
      const layers: LayerDescriptor[] = image.layers.map((l) => ({
        digest: l.digest,
        mediaType: l.mediaType,
        size: l.size,
      }));
      for (const layer of layers) {
        if (!this.sources.has(layer.digest)) this.sources.set(layer.digest, { reference: ref, credentials: creds });
      }
      const store = this.store as ImageStore;
      const acquired = await store.acquire({
        digest: image.manifestDigest,
        layers,
        config: { env: [...image.config.env] },
      });
      return {
        reference: image.reference,
        manifestDigest: image.manifestDigest,
        env: [...image.config.env],
        layerDirs: acquired.layerDirs,
        release: () => acquired.release(),
      };
    } catch (err) {
      throw registryStatus(err, ref);
    }
  }

  private async resolve(ref: ImageReference, credentials: Credentials | undefined): Promise<ResolvedImage> {
    // Per identity: one user's credentials must not vouch for another user's access.
    const key = `${ref}\0${credentials?.fingerprint() ?? ""}`;
    const known = this.resolved.get(key);
    const fresh = known && (ref.digest !== undefined || Date.now() - known.at < this.options.tagRefreshMs);
    if (known && fresh) return known.image;
    return this.resolving.run(key, async () => {
      const image = await this.options.registry.resolve(ref, undefined, { credentials });
      this.resolved.set(key, { image, at: Date.now() });
      return image;
    });
  }

  private async fetchLayer(layer: LayerDescriptor, intoDir: string): Promise<string> {
    const source = this.sources.get(layer.digest);
    if (!source) throw new Error(`no image names layer ${layer.digest}`);
    try {
      return await this.options.registry.fetchBlob(
        source.reference,
        { digest: layer.digest, size: layer.size },
        intoDir,
        { credentials: source.credentials },
      );
    } finally {
      this.sources.delete(layer.digest);
    }
  }
}
