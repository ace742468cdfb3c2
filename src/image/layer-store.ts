import { randomBytes } from "node:crypto";
import { chmod, mkdir, readdir, readFile, rename, rm, stat, utimes, writeFile } from "node:fs/promises";
import { join } from "node:path";
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

/** A layer being fetched and unpacked, shared by everyone who asked for it meanwhile. */
interface Unpacking {
  readonly done: Promise<string>;
  /** Whose caps the layer is counted against while it is read. */
  readonly budget: ImageBudget | undefined;
  received: number;
  readonly watchers: Set<BytesReceived>;
}

/** How long a use may go unrecorded on disk; the in-memory order is always exact. */
const MTIME_RESOLUTION_MS = 60_000;
const DIGEST = /^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$/;

/**
 * Unpacked layers by the digest of their blob, under
 * `root/layers/{algorithm}/{hex}/tree`, with `layer.json` beside the tree.
 * A layer is unpacked under `root/tmp/` and renamed into place whole, so
 * what is under `layers/` is always complete; the mtime of `layer.json`
 * records the last use and orders the layers across restarts. The map
 * below is in least-recently-used order. Eviction policy is the caller's.
 */
export class LayerStore {
  private readonly layers = new Map<
    string,
    { size: number; entries: number; touchedAt: number; layout: LayerLayout }
  >();
  private readonly unpacking = new Map<string, Unpacking>();
  private readonly removing = new Map<string, Promise<void>>();
  private readonly waiting: (() => void)[] = [];
  private readonly whiteouts: WhiteoutMaker;
  private running = 0;
  private totalBytes = 0;

  private constructor(
    readonly root: string,
    private readonly options: LayerStoreOptions,
  ) {
    this.whiteouts = new WhiteoutMaker(join(root, "whiteout"));
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
    return this.totalBytes;
  }

  has(digest: string): boolean {
    return this.layers.has(digest);
  }

  sizeOf(digest: string): number | undefined {
    return this.layers.get(digest)?.size;
  }

  /** What a stored layer holds, for the caps of the images that use it. */
  countOf(digest: string): LayerCount | undefined {
    const entry = this.layers.get(digest);
    return entry && { bytes: entry.size, entries: entry.entries };
  }

  /** What an overlay of a stored layer needs besides its tree (see open-directories.ts). */
  layoutOf(digest: string): LayerLayout {
    return this.layers.get(digest)?.layout ?? NO_LAYOUT;
  }

  treeOf(digest: string): string {
    return join(this.dirOf(digest), "tree");
  }

  /** Layers with their sizes, least recently used first. */
  entries(): [string, number][] {
    return [...this.layers].map(([digest, { size }]) => [digest, size]);
  }

  /**
   * The unpacked tree of `layer`, fetching and unpacking it first if needed
   * (once, however many ask). `onReceived` follows the download, also when
   * it was started by someone else.
   */
  async ensure(layer: LayerDescriptor, onReceived?: BytesReceived, budget?: ImageBudget): Promise<string> {
    if (!DIGEST.test(layer.digest)) {
      throw new StatusError(Code.INVALID_ARGUMENT, `layer digest ${JSON.stringify(layer.digest)} is not supported`);
    }
    for (;;) {
      if (this.touch(layer.digest)) {
        budget?.charge(layer.digest, this.countOf(layer.digest) as LayerCount);
        return this.treeOf(layer.digest);
      }
      let pending = this.unpacking.get(layer.digest);
      if (!pending) {
        const watchers = new Set<BytesReceived>();
        const started: Unpacking = {
          received: 0,
          watchers,
          budget,
          done: this.unpack(
            layer,
            (bytes) => {
              started.received = bytes;
              for (const watch of watchers) watch(bytes);
            },
            budget,
          ).finally(() => this.unpacking.delete(layer.digest)),
        };
        pending = started;
        this.unpacking.set(layer.digest, pending);
      }
      try {
        const tree = await this.follow(pending, onReceived);
        // Read for another image: counted against this one's caps now that its size is known.
        if (pending.budget !== budget) budget?.charge(layer.digest, this.countOf(layer.digest) as LayerCount);
        return tree;
      } catch (err) {
        // Another image's caps stopped the layer, not its own: it may well fit this image, so read it again.
        const othersImage = err instanceof ImageLimitError && err.scope === "image" && err.budget !== budget;
        if (!othersImage) throw err;
      }
    }
  }

  private async follow(pending: Unpacking, onReceived: BytesReceived | undefined): Promise<string> {
    if (!onReceived) return pending.done;
    if (pending.received > 0) onReceived(pending.received);
    pending.watchers.add(onReceived);
    try {
      return await pending.done;
    } finally {
      pending.watchers.delete(onReceived);
    }
  }

  /** Marks a layer as just used; returns whether it is present. */
  touch(digest: string): boolean {
    const entry = this.layers.get(digest);
    if (!entry) return false;
    this.layers.delete(digest);
    this.layers.set(digest, entry);
    const now = Date.now();
    if (now - entry.touchedAt > MTIME_RESOLUTION_MS) {
      entry.touchedAt = now;
      const at = new Date(now);
      utimes(this.recordOf(digest), at, at).catch(() => {});
    }
    return true;
  }

  /** Deletes a layer; the caller makes sure no one uses it. */
  async remove(digest: string): Promise<void> {
    const entry = this.layers.get(digest);
    if (!entry) return;
    this.layers.delete(digest);
    this.totalBytes -= entry.size;
    // Renamed away first so the layer vanishes at once; a crash mid-delete leaves it in tmp/.
    const doomed = this.tempPath();
    const done = rename(this.dirOf(digest), doomed)
      .then(() => rm(doomed, { recursive: true, force: true }))
      .finally(() => this.removing.delete(digest));
    this.removing.set(digest, done);
    await done;
  }

  private async unpack(
    layer: LayerDescriptor,
    onReceived: BytesReceived,
    budget: ImageBudget | undefined,
  ): Promise<string> {
    await this.removing.get(layer.digest)?.catch(() => {});
    await this.slot();
    const work = this.tempPath();
    try {
      await mkdir(join(work, "blob"), { recursive: true });
      await mkdir(join(work, "layer"));
      const blob = await this.options.fetchLayer(layer, join(work, "blob"), onReceived);
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
      this.layers.set(layer.digest, { size: stats.bytes, entries: stats.entries, touchedAt: Date.now(), layout });
      this.totalBytes += stats.bytes;
      return this.treeOf(layer.digest);
    } catch (err) {
      // Limit errors name the image and the layer already.
      if (err instanceof StatusError && !(err instanceof ImageLimitError)) {
        throw new StatusError(err.code, `layer ${layer.digest}: ${err.message}`, err.details);
      }
      throw err;
    } finally {
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
    const found: { digest: string; size: number; entries: number; layout: LayerLayout; mtime: number }[] = [];
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
          found.push({ digest, size: record.size, entries: record.entries ?? 0, layout, mtime: info.mtimeMs });
        } catch {
          // Not something this store committed whole: never use it.
          await rm(this.dirOf(digest), { recursive: true, force: true });
        }
      }
    }
    found.sort((a, b) => a.mtime - b.mtime);
    for (const { digest, size, entries, layout, mtime } of found) {
      this.layers.set(digest, { size, entries, touchedAt: mtime, layout });
      this.totalBytes += size;
    }
  }
}
