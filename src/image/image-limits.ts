import { Code, StatusError } from "../status/status.js";

/** How much one image may bring onto a host: configuration keys under `images`. */
export interface ImageLimits {
  /** Bytes of regular files in one layer, counted as they are read. */
  maxLayerBytes: number;
  /** Tar entries of one layer, whatever their kind (an empty file costs an inode too). */
  maxLayerEntries: number;
  /** maxLayerBytes summed over an image's layers. */
  maxImageBytes: number;
  /** maxLayerEntries summed over an image's layers. */
  maxImageEntries: number;
}

export const DEFAULT_IMAGE_LIMITS: ImageLimits = {
  maxLayerBytes: 16 * 1024 ** 3,
  maxLayerEntries: 1_000_000,
  maxImageBytes: 32 * 1024 ** 3,
  maxImageEntries: 2_000_000,
};

/** A limit with the configuration key that sets it, so that a refusal tells the operator what to change. */
export interface Cap {
  value: number;
  key: string;
}

/** What a layer brought, as counted while it was read. */
export interface LayerCount {
  bytes: number;
  entries: number;
}

/**
 * Counts one layer as it is read, before anything is written: `entry` for
 * each tar entry, `bytes` with a regular file's size before its data is
 * written. Throws an ImageLimitError past a cap, which the reader lets
 * through, removing what it wrote.
 */
export interface LayerMeter {
  readonly maxBytes: number;
  readonly maxEntries: number;
  entry(): void;
  bytes(count: number): void;
  /** The error for a decompressed stream past `tarBytes` (file bytes plus room for every entry's headers). */
  overflow(tarBytes: number): Error;
}

/**
 * A cap passed. FAILED_PRECONDITION, not RESOURCE_EXHAUSTED: the image is
 * over a limit of the farm's configuration, and asking again cannot help
 * (clients such as Bazel retry RESOURCE_EXHAUSTED); the violation names
 * the image, the message the layer and the configuration key.
 */
export class ImageLimitError extends StatusError {
  constructor(
    readonly scope: "layer" | "image",
    readonly budget: object | undefined,
    image: string,
    description: string,
  ) {
    super(Code.FAILED_PRECONDITION, `image ${image}: ${description}`, {
      preconditionFailures: [{ type: "IMAGE_LIMIT", subject: image, description }],
    });
  }
}

/**
 * The caps of one image: the configured limits, with the image's bytes
 * also held to `storeBytes` (a store that cannot hold the image whole
 * should refuse it while unpacking, not after).
 */
export function imageCaps(limits: ImageLimits, storeBytes?: Cap): Record<keyof ImageLimits, Cap> {
  const cap = (key: keyof ImageLimits): Cap => ({ value: limits[key], key: `images.${key}` });
  const imageBytes = cap("maxImageBytes");
  return {
    maxLayerBytes: cap("maxLayerBytes"),
    maxLayerEntries: cap("maxLayerEntries"),
    maxImageBytes: storeBytes && storeBytes.value < imageBytes.value ? storeBytes : imageBytes,
    maxImageEntries: cap("maxImageEntries"),
  };
}

/**
 * The running count of one image's layers against its caps. Layers read
 * for this image count through `meter` as they stream; layers found
 * unpacked already, or read for another image at the same time, count
 * through `charge` with what they held. Each digest counts once.
 */
export class ImageBudget {
  private bytes = 0;
  private entries = 0;
  private readonly counted = new Set<string>();

  constructor(
    readonly image: string,
    private readonly caps: Record<keyof ImageLimits, Cap>,
  ) {}

  /** Whether `err` is this budget's refusal of the image as a whole (as opposed to a layer's own cap). */
  refusedImage(err: unknown): boolean {
    return err instanceof ImageLimitError && err.scope === "image" && err.budget === this;
  }

  /** A whole layer at once. */
  charge(digest: string, count: LayerCount): void {
    if (this.counted.has(digest)) return;
    this.counted.add(digest);
    if (count.entries > this.caps.maxLayerEntries.value) this.layerOver(digest, "maxLayerEntries", "entries");
    if (count.bytes > this.caps.maxLayerBytes.value) this.layerOver(digest, "maxLayerBytes", "bytes of files");
    this.add(digest, count.bytes, count.entries);
  }

  /** Counts `digest` as it is read. */
  meter(digest: string): LayerMeter {
    this.counted.add(digest);
    const caps = this.caps;
    let bytes = 0;
    let entries = 0;
    const bytesCap = caps.maxLayerBytes.value <= caps.maxImageBytes.value ? caps.maxLayerBytes : caps.maxImageBytes;
    const entriesCap =
      caps.maxLayerEntries.value <= caps.maxImageEntries.value ? caps.maxLayerEntries : caps.maxImageEntries;
    return {
      maxBytes: bytesCap.value,
      maxEntries: entriesCap.value,
      overflow: (tarBytes) =>
        new ImageLimitError(
          "layer",
          this,
          this.image,
          `layer ${digest} decompresses to more than ${tarBytes} bytes of tar (${bytesCap.key}, with room for the headers of ${entriesCap.key} entries)`,
        ),
      entry: () => {
        if (++entries > caps.maxLayerEntries.value) this.layerOver(digest, "maxLayerEntries", "entries");
        this.add(digest, 0, 1);
      },
      bytes: (count) => {
        bytes += count;
        if (bytes > caps.maxLayerBytes.value) this.layerOver(digest, "maxLayerBytes", "bytes of files");
        this.add(digest, count, 0);
      },
    };
  }

  private add(digest: string, bytes: number, entries: number): void {
    this.bytes += bytes;
    this.entries += entries;
    const over = (key: "maxImageBytes" | "maxImageEntries", what: string): never => {
      const cap = this.caps[key];
      throw new ImageLimitError(
        "image",
        this,
        this.image,
        `its layers hold more than ${cap.value} ${what} (${cap.key}); refused while reading layer ${digest}`,
      );
    };
    if (this.bytes > this.caps.maxImageBytes.value) over("maxImageBytes", "bytes of files");
    if (this.entries > this.caps.maxImageEntries.value) over("maxImageEntries", "entries");
  }

  private layerOver(digest: string, key: "maxLayerBytes" | "maxLayerEntries", what: string): never {
    const cap = this.caps[key];
    throw new ImageLimitError(
      "layer",
      this,
      this.image,
      `layer ${digest} holds more than ${cap.value} ${what} (${cap.key})`,
    );
  }
}

/**
 * A meter for one layer alone, for callers with no image (tests, tools):
 * the same caps and errors, naming the layer where an image would be.
 */
export function layerMeter(limits: { maxBytes: number; maxEntries: number }, name = "layer"): LayerMeter {
  const caps = imageCaps({
    maxLayerBytes: limits.maxBytes,
    maxLayerEntries: limits.maxEntries,
    maxImageBytes: limits.maxBytes,
    maxImageEntries: limits.maxEntries,
  });
  return new ImageBudget(name, caps).meter(name);
}
