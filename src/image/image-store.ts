import { DEFAULT_IMAGE_LIMITS, ImageBudget, type ImageLimits, imageCaps } from "./image-limits.js";
import { type LayerDescriptor, LayerStore, type LayerStoreOptions } from "./layer-store.js";
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
  onEvict?: (digest: string, size: number) => void;
  /** Failures of evictions done in the background (after a release). */
  onError?: (err: unknown) => void;
}

/**
 * The worker's images, kept as unpacked layers shared between images. A
 * layer is pinned while any acquired image uses it and is never evicted
 * then; the others go least recently used first once the cap is passed.
 */
export class ImageStore {
  private readonly pins = new Map<string, number>();

  private constructor(
    private readonly layers: LayerStore,
    private readonly options: ImageStoreOptions,
  ) {}

  static async open(root: string, options: ImageStoreOptions): Promise<ImageStore> {
    const store = new ImageStore(await LayerStore.open(root, options), options);
    await store.evict();
    return store;
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

  /** Unpacks what `image` lacks, its layers in parallel, and pins them until released. */
  async acquire(image: Image, watcher?: LayerWatcher): Promise<AcquiredImage> {
    const digests = [...new Set(image.layers.map((layer) => layer.digest))];
    // Pinned before anything is awaited, so that concurrent evictions spare what this image is unpacking.
    for (const digest of digests) this.pins.set(digest, (this.pins.get(digest) ?? 0) + 1);
    let released = false;
    const release = async (): Promise<void> => {
      if (released) return;
      released = true;
      for (const digest of digests) {
        const count = (this.pins.get(digest) ?? 1) - 1;
        if (count === 0) this.pins.delete(digest);
        else this.pins.set(digest, count);
        this.layers.touch(digest);
      }
      await this.evict().catch((err: unknown) => this.options.onError?.(err));
    };
    // The image's bytes are held to the store's cap too: an image the store cannot hold stops while it is read.
    const caps = imageCaps(this.options.imageLimits ?? DEFAULT_IMAGE_LIMITS, {
      value: this.options.maxBytes,
      key: "images.storeMaxSizeBytes",
    });
    const budget = new ImageBudget(image.name ?? image.digest, caps);
    try {
      const settled = await Promise.allSettled(image.layers.map((layer) => this.ensure(layer, watcher, budget)));
      const layerDirs: string[] = [];
      for (const result of settled) {
        if (result.status === "rejected") throw result.reason;
        layerDirs.push(result.value);
      }
      await this.evict();
      const upper = await upperDirectories(
        image.layers.map((layer, i) => ({ dir: layerDirs[i] as string, ...this.layers.layoutOf(layer.digest) })),
      );
      return { digest: image.digest, layerDirs, upperDirectories: upper, config: image.config, release };
    } catch (err) {
      await release();
      throw err;
    }
  }

  private async ensure(
    layer: LayerDescriptor,
    watcher: LayerWatcher | undefined,
    budget: ImageBudget,
  ): Promise<string> {
    if (!watcher) return this.layers.ensure(layer, undefined, budget);
    const dir = await this.layers.ensure(layer, (bytes) => watcher.received(layer.digest, bytes), budget);
    watcher.ready(layer.digest);
    return dir;
  }

  /**
   * Brings the store back under its cap if it can. Layers in use may keep it
   * above for a while (several large images running at once); the cap is
   * met again as they are released.
   */
  private async evict(): Promise<void> {
    let used = this.layers.usedBytes;
    if (used <= this.options.maxBytes) return;
    const victims: string[] = [];
    for (const [digest, size] of this.layers.entries()) {
      if (used <= this.options.maxBytes) break;
      if (this.pins.has(digest)) continue;
      victims.push(digest);
      used -= size;
      this.options.onEvict?.(digest, size);
    }
    await Promise.all(victims.map((digest) => this.layers.remove(digest)));
  }
}
