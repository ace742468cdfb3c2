import { DEFAULT_IMAGE_LIMITS, ImageBudget, type ImageLimits, imageCaps } from "./image-limits.js";
import { type AcquiredLayer, type LayerDescriptor, LayerStore, type LayerStoreOptions } from "./layer-store.js";
import { type UpperDirectory, upperDirectories } from "./open-directories.js";

/** What an action inherits from its image's config (OCI image config `config` object). */
export interface ImageConfig {
  env: string[];
  workingDir?: string;
  user?: string;
}

/** An image by its manifest digest: its layers bottom to top and its config. */
export interface Image {
  digest: string;
  /** How refusals name the image (its reference); default: the digest. */
  name?: string;
  layers: readonly LayerDescriptor[];
  config: ImageConfig;
}

/** An image ready to mount; its layers stay on disk until `release`. */
export interface AcquiredImage {
  digest: string;
  /** Unpacked layer trees, bottom to top, as the manifest lists them. */
  layerDirs: string[];
  /** To make in an action's upper layer: the image's own modes of directories tamed on the host. */
  upperDirectories: UpperDirectory[];
  config: ImageConfig;
  /** Idempotent; resolves once the store is back under its cap (it never rejects: see `onError`). */
  release(): Promise<void>;
}

/** Follows the layers of one `acquire`. */
export interface LayerWatcher {
  /** Bytes of the layer's blob downloaded so far (from 0 again when a download is retried). */
  received(digest: string, bytes: number): void;
  /** The layer is unpacked in the store; at once for a layer that was there already. */
  ready(digest: string): void;
}

export interface ImageStoreOptions extends LayerStoreOptions {
  /** Evict least recently used layers no acquired image uses once the total passes this many bytes. */
  maxBytes: number;
  /** Caps on what one layer and one image may hold, enforced as layers are read. */
  imageLimits?: ImageLimits;
}

/**
 * The worker's images, kept as unpacked layers shared between images. A
 * layer is held while any acquired image uses it and is never evicted
 * then; the others go least recently used first once the cap is passed
 * (the layer store's index, a PinnedLru, does both).
 */
export class ImageStore {
  private constructor(
    private readonly layers: LayerStore,
    private readonly options: ImageStoreOptions,
  ) {}

  static async open(root: string, options: ImageStoreOptions): Promise<ImageStore> {
    return new ImageStore(await LayerStore.open(root, options), options);
  }

  get usedBytes(): number {
    return this.layers.usedBytes;
  }

  get maxBytes(): number {
    return this.options.maxBytes;
  }

  /** Whether every layer of `image` is unpacked (acquiring it then fetches nothing). */
  isPresent(image: Image): boolean {
    return image.layers.every((layer) => this.layers.has(layer.digest));
  }

  /** Whether one layer is unpacked. */
  hasLayer(digest: string): boolean {
    return this.layers.has(digest);
  }

  /** Unpacks what `image` lacks, its layers in parallel, and holds them until released. */
  async acquire(image: Image, watcher?: LayerWatcher): Promise<AcquiredImage> {
    // The image's bytes are held to the store's cap too: an image the store cannot hold stops while it is read.
    const caps = imageCaps(this.options.imageLimits ?? DEFAULT_IMAGE_LIMITS, {
      value: this.options.maxBytes,
      key: "images.storeMaxSizeBytes",
    });
    const budget = new ImageBudget(image.name ?? image.digest, caps);
    // Every layer already stored is held before anything is awaited, so that concurrent evictions spare it.
    const settled = await Promise.allSettled(image.layers.map((layer) => this.acquireLayer(layer, watcher, budget)));
    const layers: AcquiredLayer[] = [];
    for (const result of settled) if (result.status === "fulfilled") layers.push(result.value);
    let released: Promise<void> | undefined;
    const release = (): Promise<void> => {
      released ??= Promise.all(layers.map((layer) => layer.release())).then(() => {});
      return released;
    };
    try {
      for (const result of settled) if (result.status === "rejected") throw result.reason;
      const upper = await upperDirectories(layers.map(({ tree, layout }) => ({ dir: tree, ...layout })));
      const layerDirs = layers.map((layer) => layer.tree);
      return { digest: image.digest, layerDirs, upperDirectories: upper, config: image.config, release };
    } catch (err) {
      await release();
      throw err;
    }
  }

  private async acquireLayer(
    layer: LayerDescriptor,
    watcher: LayerWatcher | undefined,
    budget: ImageBudget,
  ): Promise<AcquiredLayer> {
    if (!watcher) return this.layers.acquire(layer, undefined, budget);
    const held = await this.layers.acquire(layer, (bytes) => watcher.received(layer.digest, bytes), budget);
    try {
      watcher.ready(layer.digest);
    } catch (err) {
      await held.release();
      throw err;
    }
    return held;
  }
}
