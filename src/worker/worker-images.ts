import { chmod, mkdir } from "node:fs/promises";
import { join } from "node:path";
import type { RegistryCredentials } from "../action/action-platform.js";
import type { ImageLimits } from "../image/image-limits.js";
import { ImageStore, type LayerWatcher } from "../image/image-store.js";
import type { BytesReceived, LayerDescriptor } from "../image/layer-store.js";
import type { UpperDirectory } from "../image/open-directories.js";
import { type ImageReference, parseImageReference } from "../image/reference.js";
import type { RegistryClient } from "../registry/client.js";
import { Credentials } from "../registry/credentials.js";
import { registryStatus } from "../registry/registry-status.js";
import { ResolvedImages } from "../registry/resolved-images.js";

export interface WorkerImagesOptions {
  /** The image store's directory (layers, downloads). */
  dir: string;
  maxBytes: number;
  /** Caps on one layer and one image, enforced while layers are unpacked. */
  limits?: ImageLimits;
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
  /** Directories to make in the action's upper layer (the image's own modes, see open-directories.ts). */
  upperDirectories: UpperDirectory[];
  release(): Promise<void>;
}

/** How far an image's pull is, summed over the manifest's layers. */
export interface PullProgress {
  /** Layer blob bytes downloaded; a layer already unpacked counts whole. */
  bytesDone: number;
  bytesTotal: number;
  /** Layers unpacked in the store. */
  layersDone: number;
  layersTotal: number;
}

/**
 * A worker's images: resolves references through the registry (a tag is
 * asked again only after `tagRefreshMs`), and pulls and unpacks each layer
 * once however many actions want it at the same time.
 */
export class WorkerImages {
  private readonly resolved: ResolvedImages;
  /** Who may fetch a layer being pulled: its repository and that action's credentials. */
  private readonly sources = new Map<string, { reference: ImageReference; credentials?: Credentials }>();
  private store: ImageStore | undefined;

  private constructor(private readonly options: WorkerImagesOptions) {
    this.resolved = new ResolvedImages(options.registry, options.tagRefreshMs);
  }

  static async open(options: WorkerImagesOptions): Promise<WorkerImages> {
    const images = new WorkerImages(options);
    // Root only, whatever the parent: the layers below keep their images' owners.
    await mkdir(options.dir, { recursive: true, mode: 0o700 });
    await chmod(options.dir, 0o700);
    images.store = await ImageStore.open(join(options.dir, "store"), {
      maxBytes: options.maxBytes,
      imageLimits: options.limits,
      fetchLayer: (layer, intoDir, onReceived) => images.fetchLayer(layer, intoDir, onReceived),
    });
    return images;
  }

  /**
   * Resolves, pulls what is missing and pins the image; failures are
   * statuses naming the image. `onProgress` hears of every change once the
   * image is resolved, including downloads that other callers started.
   */
  async prepare(
    reference: string,
    credentials: RegistryCredentials | undefined,
    onProgress?: (progress: PullProgress) => void,
  ): Promise<PreparedImage> {
    const ref = parseImageReference(reference);
    const creds = credentials && new Credentials(credentials.username, credentials.password);
    try {
      const image = await this.resolved.resolve(ref, creds);
      const layers: LayerDescriptor[] = image.layers.map((l) => ({
        digest: l.digest,
        mediaType: l.mediaType,
        size: l.size,
      }));
      for (const layer of layers) {
        if (!this.sources.has(layer.digest)) this.sources.set(layer.digest, { reference: ref, credentials: creds });
      }
      const store = this.store as ImageStore;
      const acquired = await store.acquire(
        { digest: image.manifestDigest, name: String(image.reference), layers, config: { env: [...image.config.env] } },
        onProgress && progressWatcher(layers, store, onProgress),
      );
      return {
        reference: image.reference,
        manifestDigest: image.manifestDigest,
        env: [...image.config.env],
        layerDirs: acquired.layerDirs,
        upperDirectories: acquired.upperDirectories,
        release: () => acquired.release(),
      };
    } catch (err) {
      throw registryStatus(err, ref);
    }
  }

  private async fetchLayer(layer: LayerDescriptor, intoDir: string, onReceived?: BytesReceived): Promise<string> {
    const source = this.sources.get(layer.digest);
    if (!source) throw new Error(`no image names layer ${layer.digest}`);
    try {
      return await this.options.registry.fetchBlob(
        source.reference,
        { digest: layer.digest, size: layer.size },
        intoDir,
        { credentials: source.credentials, onProgress: onReceived },
      );
    } finally {
      this.sources.delete(layer.digest);
    }
  }
}

/** Sums the states of an image's layers into one PullProgress, reported at once and on every change. */
function progressWatcher(
  layers: readonly LayerDescriptor[],
  store: ImageStore,
  report: (progress: PullProgress) => void,
): LayerWatcher {
  const received = new Map<string, number>();
  const ready = new Set(layers.map((l) => l.digest).filter((digest) => store.hasLayer(digest)));
  const bytesTotal = layers.reduce((sum, layer) => sum + layer.size, 0);
  const emit = () => {
    let bytesDone = 0;
    let layersDone = 0;
    for (const layer of layers) {
      if (ready.has(layer.digest)) {
        bytesDone += layer.size;
        layersDone++;
      } else {
        bytesDone += Math.min(received.get(layer.digest) ?? 0, layer.size);
      }
    }
    report({ bytesDone, bytesTotal, layersDone, layersTotal: layers.length });
  };
  emit();
  return {
    received: (digest, bytes) => {
      received.set(digest, bytes);
      emit();
    },
    ready: (digest) => {
      ready.add(digest);
      emit();
    },
  };
}
