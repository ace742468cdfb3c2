import { randomBytes } from "node:crypto";
import { chmod, mkdir, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { type Created, type Lease, PinnedLru } from "../cache/pinned-lru.js";
import { stampUse } from "../cache/use-stamp.js";
import { Code, StatusError } from "../status/status.js";
import { type ImageBudget, ImageLimitError, type LayerCount } from "./image-limits.js";
import { type LayerLayout, type UnpackLimits, type UnpackStats, unpackLayer } from "./layer-unpack.js";
import { WhiteoutMaker } from "./whiteout.js";

/** A layer as an image manifest lists it. */
export interface LayerDescriptor {
  digest: string;
  mediaType: string;
  size: number;
}

/** Told the bytes of a layer's blob downloaded so far (from 0 again when a download is retried). */
export type BytesReceived = (bytes: number) => void;

/**
 * Downloads a layer blob into `intoDir` (fresh and empty) and returns the
 * file's path; the fetcher verifies the digest and reports the bytes as they
 * arrive. The store deletes the blob once it is unpacked.
 */
export type FetchLayer = (layer: LayerDescriptor, intoDir: string, onReceived?: BytesReceived) => Promise<string>;

export interface LayerStoreOptions {
  fetchLayer: FetchLayer;
  limits?: Partial<UnpackLimits>;
  /** Layers fetched and unpacked at once, across all images. */
  concurrency?: number;
  onUnpacked?: (digest: string, stats: UnpackStats, millis: number) => void;
  /** Past this many bytes, the least recently used layers no one holds (`acquire`) are deleted; default: no cap. */
  maxBytes?: number;
  onEvict?: (digest: string, size: number) => void;
  /** Failures of evictions done in the background (after a release). */
  onError?: (err: unknown) => void;
}

/** A stored layer, held (never evicted) until `release`. */
export interface AcquiredLayer {
  tree: string;
  layout: LayerLayout;
  /** Idempotent; resolves once the store is back under its cap as far as it can be; never rejects. */
  release(): Promise<void>;
}

interface LayerRecord {
  /** LAYER_FORMAT when written; layers of other versions are unpacked again. */
  format?: number;
  digest: string;
  mediaType: string;
  /** Bytes of regular files: what the layer costs on disk, near enough. */
  size: number;
  /** Tar entries (absent in records of older versions: counted as none). */
  entries?: number;
  /** Directories tamed on the host, with the image's modes, and opaque directories (see LayerLayout). */
  opened?: [string, number][];
  opaque?: string[];
}

/** 2: modes tamed (hostMode), entries and opened directories recorded. Older layers may keep setuid bits. */
const LAYER_FORMAT = 2;

const NO_LAYOUT: LayerLayout = { opened: new Map(), opaque: new Set() };

/** What the index keeps of a stored layer (its size is the index's). */
interface StoredLayer {
  entries: number;
  layout: LayerLayout;
  /** When `layer.json`'s mtime was last moved forward (see stampUse). */
  usedAt: number;
}

/** The download of a layer being fetched, followed by everyone who asked for it meanwhile. */
interface Unpacking {
  received: number;
  readonly watchers: Set<BytesReceived>;
}
const DIGEST = /^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$/;

/**
 * Unpacked layers by the digest of their blob, under
 * `root/layers/{algorithm}/{hex}/tree`, with `layer.json` beside the tree.
 * A layer is unpacked under `root/tmp/` and renamed into place whole, so
 * what is under `layers/` is always complete; the mtime of `layer.json`
 * records the last use and orders the layers across restarts. Past
 * `maxBytes`, the least recently used layers no one holds are deleted.
 */
export class LayerStore {
  private readonly layers: PinnedLru<string, StoredLayer>;
  private readonly unpacking = new Map<string, Unpacking>();
  private readonly waiting: (() => void)[] = [];
  private readonly whiteouts: WhiteoutMaker;
  private running = 0;

  private constructor(
    readonly root: string,
    private readonly options: LayerStoreOptions,
  ) {
    this.whiteouts = new WhiteoutMaker(join(root, "whiteout"));
    this.layers = new PinnedLru({
      maxBytes: options.maxBytes,
      dispose: (digest, _layer, size, reason) => {
        if (reason === "evicted") options.onEvict?.(digest, size);
        return this.deleteTree(digest);
      },
      onError: options.onError,
    });
  }

  static async open(root: string, options: LayerStoreOptions): Promise<LayerStore> {
    const store = new LayerStore(root, options);
    // Root only, whatever the parent: layers hold what images bring (owners, modes) and nobody else's business.
    await mkdir(root, { recursive: true, mode: 0o700 });
    await chmod(root, 0o700);
    await rm(join(root, "tmp"), { recursive: true, force: true });
    await mkdir(join(root, "tmp"), { recursive: true });
    await mkdir(join(root, "layers"), { recursive: true });
    await store.scan();
    return store;
  }

  get usedBytes(): number {
    return this.layers.bytes;
  }

  has(digest: string): boolean {
    return this.layers.has(digest);
  }

  sizeOf(digest: string): number | undefined {
    return this.layers.sizeOf(digest);
  }

  /** What a stored layer holds, for the caps of the images that use it. */
  countOf(digest: string): LayerCount | undefined {
    const layer = this.layers.peek(digest);
    return layer && { bytes: this.layers.sizeOf(digest) ?? 0, entries: layer.entries };
  }

  /** What an overlay of a stored layer needs besides its tree (see open-directories.ts). */
  layoutOf(digest: string): LayerLayout {
    return this.layers.peek(digest)?.layout ?? NO_LAYOUT;
  }

  treeOf(digest: string): string {
    return join(this.dirOf(digest), "tree");
  }

  /** Layers with their sizes, least recently used first. */
  entries(): [string, number][] {
    return [...this.layers.entries()].map(({ key, size }) => [key, size]);
  }

  /**
   * The unpacked tree of `layer`, fetching and unpacking it first if needed,
   * not held: with a cap, use `acquire`.
   */
  async ensure(layer: LayerDescriptor, onReceived?: BytesReceived, budget?: ImageBudget): Promise<string> {
    const held = await this.acquire(layer, onReceived, budget);
    await held.release();
    return held.tree;
  }

  /**
   * The unpacked tree of `layer`, fetching and unpacking it first if needed
   * (once, however many ask), held until `release`. `onReceived` follows the
   * download, also when it was started by someone else. The layer is counted
   * against `budget`: as it is read, or at once when it is stored already.
   */
  async acquire(layer: LayerDescriptor, onReceived?: BytesReceived, budget?: ImageBudget): Promise<AcquiredLayer> {
    if (!DIGEST.test(layer.digest)) {
      throw new StatusError(Code.INVALID_ARGUMENT, `layer digest ${JSON.stringify(layer.digest)} is not supported`);
    }
    for (;;) {
      const stored = this.layers.tryAcquire(layer.digest);
      if (stored) return this.charged(layer.digest, stored, budget);
      // Set when this call's unpack is the one the others wait for: it charges `budget` as it reads.
      let started = false;
      const acquiring = this.layers.acquire(layer.digest, () => {
        started = true;
        return this.unpack(layer, onReceived, budget);
      });
      const followed = started || !onReceived ? undefined : this.unpacking.get(layer.digest);
      if (followed && onReceived) {
        if (followed.received > 0) onReceived(followed.received);
        followed.watchers.add(onReceived);
      }
      try {
        const lease = await acquiring;
        // Read for another image: counted against this one's caps now that its size is known.
        return started ? this.held(layer.digest, lease) : await this.charged(layer.digest, lease, budget);
      } catch (err) {
        // Another image's caps stopped the layer, not its own: it may well fit this image, so read it again.
        const othersImage = err instanceof ImageLimitError && err.scope === "image" && err.budget !== budget;
        if (!othersImage) throw err;
      } finally {
        if (onReceived) followed?.watchers.delete(onReceived);
      }
    }
  }

  /** The layer counted against `budget` (each digest once), or released if it does not fit. */
  private async charged(
    digest: string,
    lease: Lease<StoredLayer>,
    budget: ImageBudget | undefined,
  ): Promise<AcquiredLayer> {
    try {
      budget?.charge(digest, this.countOf(digest) as LayerCount);
    } catch (err) {
      await lease.release();
      throw err;
    }
    return this.held(digest, lease);
  }

  private held(digest: string, lease: Lease<StoredLayer>): AcquiredLayer {
    this.stamp(digest, lease.value);
    return { tree: this.treeOf(digest), layout: lease.value.layout, release: lease.release };
  }

  /** Marks a layer as just used; returns whether it is present. */
  touch(digest: string): boolean {
    const layer = this.layers.touch(digest);
    if (layer) this.stamp(digest, layer);
    return layer !== undefined;
  }

  private stamp(digest: string, layer: StoredLayer): void {
    stampUse(layer, this.recordOf(digest));
  }

  /** Deletes a layer; the caller makes sure no one uses it. */
  async remove(digest: string): Promise<void> {
    await this.layers.delete(digest);
  }

  /** Renamed away first so the layer vanishes at once; a crash mid-delete leaves it in tmp/. */
  private async deleteTree(digest: string): Promise<void> {
    const doomed = this.tempPath();
    await rename(this.dirOf(digest), doomed);
    await rm(doomed, { recursive: true, force: true });
  }

  private async unpack(
    layer: LayerDescriptor,
    onReceived: BytesReceived | undefined,
    budget: ImageBudget | undefined,
  ): Promise<Created<StoredLayer>> {
    const unpacking: Unpacking = { received: 0, watchers: new Set(onReceived ? [onReceived] : []) };
    this.unpacking.set(layer.digest, unpacking);
    const received = (bytes: number) => {
      unpacking.received = bytes;
      for (const watch of unpacking.watchers) watch(bytes);
    };
    await this.slot();
    const work = this.tempPath();
    try {
      await mkdir(join(work, "blob"), { recursive: true });
      await mkdir(join(work, "layer"));
      const blob = await this.options.fetchLayer(layer, join(work, "blob"), received);
      const started = performance.now();
      const layout: LayerLayout = { opened: new Map(), opaque: new Set() };
      const stats = await unpackLayer(blob, layer.mediaType, join(work, "layer", "tree"), {
        layout,
        whiteouts: this.whiteouts,
        limits: this.options.limits,
        meter: budget?.meter(layer.digest),
      });
      this.options.onUnpacked?.(layer.digest, stats, performance.now() - started);
      const record: LayerRecord = {
        format: LAYER_FORMAT,
        digest: layer.digest,
        mediaType: layer.mediaType,
        size: stats.bytes,
        entries: stats.entries,
        opened: [...layout.opened],
        opaque: [...layout.opaque],
      };
      await writeFile(join(work, "layer", "layer.json"), JSON.stringify(record));
      const final = this.dirOf(layer.digest);
      await mkdir(join(final, ".."), { recursive: true });
      await rename(join(work, "layer"), final);
      return { value: { entries: stats.entries, layout, usedAt: Date.now() }, size: stats.bytes };
    } catch (err) {
      // Limit errors name the image and the layer already.
      if (err instanceof StatusError && !(err instanceof ImageLimitError)) {
        throw new StatusError(err.code, `layer ${layer.digest}: ${err.message}`, err.details);
      }
      throw err;
    } finally {
      this.unpacking.delete(layer.digest);
      await rm(work, { recursive: true, force: true });
      this.running--;
      this.waiting.shift()?.();
    }
  }

  private async slot(): Promise<void> {
    if (this.running >= (this.options.concurrency ?? 4)) {
      await new Promise<void>((resolve) => this.waiting.push(resolve));
    }
    this.running++;
  }

  private tempPath(): string {
    return join(this.root, "tmp", randomBytes(12).toString("hex"));
  }

  private dirOf(digest: string): string {
    const [algorithm = "", hex = ""] = digest.split(":");
    return join(this.root, "layers", algorithm, hex);
  }

  private recordOf(digest: string): string {
    return join(this.dirOf(digest), "layer.json");
  }

  private async scan(): Promise<void> {
    const found: { key: string; size: number; value: StoredLayer; usedAt: number }[] = [];
    for (const algorithm of await readdir(join(this.root, "layers"))) {
      const hexes = await readdir(join(this.root, "layers", algorithm)).catch(() => []);
      for (const hex of hexes) {
        const digest = `${algorithm}:${hex}`;
        try {
          if (!DIGEST.test(digest)) throw new Error("not a layer");
          const record = JSON.parse(await readFile(this.recordOf(digest), "utf8")) as LayerRecord;
          const info = await stat(this.recordOf(digest));
          if (record.digest !== digest || typeof record.size !== "number") throw new Error("stale record");
          if (record.format !== LAYER_FORMAT) throw new Error("unpacked by an older version, untamed");
          await stat(this.treeOf(digest));
          const layout = { opened: new Map(record.opened ?? []), opaque: new Set(record.opaque ?? []) };
          const value = { entries: record.entries ?? 0, layout, usedAt: info.mtimeMs };
          found.push({ key: digest, size: record.size, value, usedAt: info.mtimeMs });
        } catch {
          // Not something this store committed whole: never use it.
          await rm(this.dirOf(digest), { recursive: true, force: true });
        }
      }
    }
    await this.layers.restore(found);
  }
}
