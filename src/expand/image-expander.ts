import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import type { ActionCache } from "../ac/action-cache.js";
import type { RegistryCredentials } from "../action/action-platform.js";
import type { BlobStore } from "../cas/blob-store.js";
import { type Digest, digestKey } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import {
  type Cap,
  DEFAULT_IMAGE_LIMITS,
  ImageBudget,
  ImageLimitError,
  type ImageLimits,
  imageCaps,
  type LayerCount,
} from "../image/image-limits.js";
import type { ImageReference } from "../image/reference.js";
import type { LayerDescriptor, RegistryClient, ResolvedImage } from "../registry/client.js";
import { Credentials } from "../registry/credentials.js";
import { registryStatus } from "../registry/registry-status.js";
import type { ResolvedImages } from "../registry/resolved-images.js";
import { SingleFlight } from "../registry/single-flight.js";
import { layerToTree } from "./layer-to-tree.js";
import { mergeLayerTrees } from "./merge-layers.js";
import {
  countOfResult,
  type ExpansionStep,
  missingOfResult,
  rememberTree,
  rootOfResult,
  syntheticActionDigest,
} from "./synthetic-actions.js";

/** How far an expansion is: layer blob bytes downloaded and converted, and layers whose tree is ready. */
export interface ExpandProgress {
  bytesDone: number;
  bytesTotal: number;
  layersDone: number;
  layersTotal: number;
}

/** An image as a tree in the CAS, and what an action inherits from its configuration. */
export interface ExpandedImageTree {
  root: Digest;
  /** The reference pinned to the manifest that was expanded. */
  reference: ImageReference;
  manifestDigest: string;
  /** The configuration's Env, NAME=VALUE. */
  env: string[];
}

export interface ImageExpanderOptions {
  /** Layer blobs are downloaded below this directory and deleted once converted. */
  tempDir: string;
  /** Caps on one layer and one image, enforced while layers are converted. */
  limits?: ImageLimits;
  /** The CAS's capacity: an image's bytes are held to it too (a tree the CAS cannot hold would be evicted). */
  casBytes?: Cap;
  /** How many blobs the CAS has evicted so far: a tree verified complete stays so while this does not move. */
  casEvictions: () => number;
  /** Layers downloaded and converted at once. */
  concurrency?: number;
}

/** Verified trees remembered; past this the memory starts over (a check costs one Tree read). */
const MAX_VERIFIED = 10_000;

/**
 * Expand mode's server side: turns an image into a Directory tree in the CAS.
 * Each layer, then the image, is remembered in the action cache under a
 * synthetic action, so an image expanded before costs one lookup and a layer
 * shared by images is converted once. An entry whose blobs were evicted is a
 * miss and is built again.
 */
export class ImageExpander {
  /** Work done, as opposed to found in the action cache: for metrics, logs and tests. */
  readonly stats = { layersConverted: 0, imagesMerged: 0 };
  private readonly verified = new Map<string, number>();
  private readonly layers = new SingleFlight<string, StepTree>();
  private readonly images = new SingleFlight<string, Digest>();
  private running = 0;
  private readonly waiting: (() => void)[] = [];

  constructor(
    private readonly cas: BlobStore,
    private readonly ac: ActionCache,
    private readonly registry: RegistryClient,
    private readonly resolved: ResolvedImages,
    private readonly options: ImageExpanderOptions,
  ) {}

  /** Failures are statuses naming the image (registry refusals as for mount mode, bad layers INVALID_ARGUMENT). */
  async expand(
    instanceName: string,
    fn: DigestFunction,
    ref: ImageReference,
    credentials: RegistryCredentials | undefined,
    onProgress?: (progress: ExpandProgress) => void,
  ): Promise<ExpandedImageTree> {
    const creds = credentials && new Credentials(credentials.username, credentials.password);
    try {
      const image = await this.resolved.resolve(ref, creds);
      const key = `${instanceName}\0${fn.name}\0${image.manifestDigest}`;
      const root = await this.images.run(key, () =>
        this.imageTree({ instanceName, fn, image, credentials: creds }, onProgress),
      );
      return { root, reference: image.reference, manifestDigest: image.manifestDigest, env: [...image.config.env] };
    } catch (err) {
      throw registryStatus(err, ref);
    }
  }

  private async imageTree(
    request: ExpansionRequest,
    onProgress: ((progress: ExpandProgress) => void) | undefined,
  ): Promise<Digest> {
    const { instanceName, fn, image } = request;
    const progress = new ProgressSum(image.layers, onProgress);
    const cached = await this.lookup(instanceName, fn, "image", image.manifestDigest);
    if (cached) {
      progress.allDone();
      return cached.root;
    }
    const evictions = this.options.casEvictions();
    const budget = new ImageBudget(
      String(image.reference),
      imageCaps(this.options.limits ?? DEFAULT_IMAGE_LIMITS, this.options.casBytes),
    );
    // Settled all before failing, so that no conversion of this image is still writing when the caller hears.
    const settled = await Promise.allSettled(
      image.layers.map((layer, i) => this.layerTree(request, layer, progress.forLayer(i), budget)),
    );
    const layers: StepTree[] = [];
    for (const result of settled) {
      if (result.status === "rejected") throw result.reason;
      layers.push(result.value);
    }
    const root = await mergeLayerTrees(
      fn,
      this.cas,
      layers.map((layer) => layer.root),
    );
    this.stats.imagesMerged++;
    const count = layers.reduce(
      (sum, layer) => ({ bytes: sum.bytes + layer.count.bytes, entries: sum.entries + layer.count.entries }),
      { bytes: 0, entries: 0 },
    );
    await rememberTree(this.ac, this.cas, instanceName, "image", image.manifestDigest, root, count);
    this.markVerified(root, evictions);
    return root;
  }

  /**
   * One layer's tree, counted against `budget`: as it is converted when this
   * image starts the conversion, whole once known otherwise (found in the
   * action cache, or converted for another image at the same time).
   */
  private async layerTree(
    request: ExpansionRequest,
    layer: LayerDescriptor,
    progress: LayerProgress,
    budget: ImageBudget,
  ): Promise<StepTree> {
    const { instanceName, fn } = request;
    const key = `${instanceName}\0${fn.name}\0${layer.digest}`;
    try {
      for (;;) {
        let metered = false;
        const flight = this.layers.run(key, async () => {
          const cached = await this.lookup(instanceName, fn, "layer", layer.digest);
          if (cached) return cached;
          metered = true;
          return this.limited(() => this.convertLayer(request, layer, progress, budget));
        });
        try {
          const tree = await flight;
          if (!metered) budget.charge(layer.digest, tree.count);
          return tree;
        } catch (err) {
          // Another image's caps stopped the conversion, not the layer's own: it may fit this image.
          const othersImage = err instanceof ImageLimitError && err.scope === "image" && err.budget !== budget;
          if (!othersImage) throw err;
        }
      }
    } finally {
      progress.done();
    }
  }

  private async convertLayer(
    request: ExpansionRequest,
    layer: LayerDescriptor,
    progress: LayerProgress,
    budget: ImageBudget,
  ): Promise<StepTree> {
    const { instanceName, fn, image, credentials } = request;
    const evictions = this.options.casEvictions();
    // Root only: layer blobs and spooled files of images wait here.
    await mkdir(this.options.tempDir, { recursive: true, mode: 0o700 });
    const dir = await mkdtemp(join(this.options.tempDir, "layer-"));
    try {
      const blob = await this.registry.fetchBlob(image.reference, { digest: layer.digest, size: layer.size }, dir, {
        credentials,
        onProgress: (bytes) => progress.downloaded(bytes),
      });
      const { root, stats } = await layerToTree(blob, layer.mediaType, fn, this.cas, {
        meter: budget.meter(layer.digest),
        tempDir: dir,
        onProgress: (bytes) => progress.converted(bytes),
      });
      this.stats.layersConverted++;
      const count = { bytes: stats.bytes, entries: stats.entries };
      await rememberTree(this.ac, this.cas, instanceName, "layer", layer.digest, root, count);
      this.markVerified(root, evictions);
      return { root, count };
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }

  /** The tree a synthetic entry names, when the entry exists and every blob of its tree is still stored. */
  private async lookup(
    instanceName: string,
    fn: DigestFunction,
    step: ExpansionStep,
    input: string,
  ): Promise<StepTree | undefined> {
    const result = await this.ac.get(instanceName, await syntheticActionDigest(fn, step, input));
    const root = result && rootOfResult(fn, result);
    const count = result && countOfResult(result);
    if (!result || !root || !count) return undefined;
    const evictions = this.options.casEvictions();
    if (this.verified.get(digestKey(root)) === evictions) return { root, count };
    if ((await missingOfResult(fn, result, this.cas)).length > 0) {
      this.verified.delete(digestKey(root));
      return undefined;
    }
    this.markVerified(root, evictions);
    return { root, count };
  }

  /** `evictions`: the count before the tree was built or checked, so an eviction meanwhile forces a new check. */
  private markVerified(root: Digest, evictions: number): void {
    if (this.verified.size >= MAX_VERIFIED) this.verified.clear();
    this.verified.set(digestKey(root), evictions);
  }

  private async limited<T>(work: () => Promise<T>): Promise<T> {
    const limit = this.options.concurrency ?? 3;
    while (this.running >= limit) await new Promise<void>((resolve) => this.waiting.push(resolve));
    this.running++;
    try {
      return await work();
    } finally {
      this.running--;
      this.waiting.shift()?.();
    }
  }
}

/** What one expansion step made, and what it holds. */
interface StepTree {
  root: Digest;
  count: LayerCount;
}

/** One expansion: where its results go, and the image as resolved for the caller's credentials. */
interface ExpansionRequest {
  instanceName: string;
  fn: DigestFunction;
  image: ResolvedImage;
  credentials: Credentials | undefined;
}

interface LayerProgress {
  downloaded(bytes: number): void;
  converted(bytes: number): void;
  done(): void;
}

/** Sums the layers' progress: half of a layer's size for its download, half for its conversion. */
class ProgressSum {
  private readonly downloaded: number[];
  private readonly converted: number[];
  private readonly finished: boolean[];

  constructor(
    private readonly layers: readonly LayerDescriptor[],
    private readonly report: ((progress: ExpandProgress) => void) | undefined,
  ) {
    this.downloaded = layers.map(() => 0);
    this.converted = layers.map(() => 0);
    this.finished = layers.map(() => false);
    this.emit();
  }

  forLayer(i: number): LayerProgress {
    return {
      downloaded: (bytes) => {
        this.downloaded[i] = bytes;
        this.emit();
      },
      converted: (bytes) => {
        this.converted[i] = bytes;
        this.emit();
      },
      done: () => {
        this.finished[i] = true;
        this.emit();
      },
    };
  }

  allDone(): void {
    this.finished.fill(true);
    this.emit();
  }

  private emit(): void {
    if (!this.report) return;
    let bytesDone = 0;
    this.layers.forEach((layer, i) => {
      if (this.finished[i]) bytesDone += layer.size;
      else bytesDone += Math.min(layer.size, ((this.downloaded[i] ?? 0) + (this.converted[i] ?? 0)) / 2);
    });
    this.report({
      bytesDone: Math.floor(bytesDone),
      bytesTotal: this.layers.reduce((sum, layer) => sum + layer.size, 0),
      layersDone: this.finished.filter(Boolean).length,
      layersTotal: this.layers.length,
    });
  }
}
