import { closeSync, constants, openSync, writeSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import type { Header } from "tar-stream";
import type { BlobStore } from "../cas/blob-store.js";
import { type Digest, digestOf } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { hostMode } from "../image/host-mode.js";
import { type LayerMeter, layerMeter } from "../image/image-limits.js";
import { forEachTarEntry, layerCompression } from "../image/layer-source.js";
import { badEntry, entryPath, layerEntry } from "../image/layer-tree.js";
import { DEFAULT_UNPACK_LIMITS, type UnpackLimits } from "../image/layer-unpack.js";
import { OPAQUE_MARKER, WHITEOUT_PREFIX } from "./directories.js";
import { LayerDraft } from "./layer-draft.js";
import { MissingBlobUploader } from "./missing-blob-uploader.js";

export interface LayerTreeStats {
  /** Tar entries, whatever their kind. */
  entries: number;
  /** Regular file entries (hard links not counted). */
  files: number;
  /** Sum of regular file sizes, each hard-linked file counted once. */
  bytes: number;
  /** Directory messages of the resulting tree, the root included. */
  directories: number;
  symlinks: number;
  /** `.wh.NAME` and `.wh..wh..opq` entries, kept in the tree as empty files. */
  whiteouts: number;
  /** Devices, FIFOs, sockets and AUFS metadata, which a tree cannot or need not hold. */
  skipped: number;
}

export interface LayerToTreeOptions {
  /** Counts the layer against its image's caps as it is read; default: a meter of `limits` alone. */
  meter?: LayerMeter;
  limits?: Partial<UnpackLimits>;
  /** Bytes of the blob file read so far (for a progress bar). */
  onProgress?: (compressedBytesRead: number) => void;
  /**
   * Where files larger than `maxMemoryFileBytes` are spooled while they are
   * hashed (the CAS wants a blob's digest before its bytes). Required when
   * the layer holds such a file; a private subdirectory is made and removed.
   */
  tempDir?: string;
  /** Files up to this size are held in memory until stored; default 4 MiB. */
  maxMemoryFileBytes?: number;
}

const DEFAULT_MAX_MEMORY_FILE_BYTES = 4 * 1024 * 1024;
const NEW_FILE = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;

/**
 * Converts a layer blob (tar, tar+gzip or tar+zstd, sniffed as unpackLayer
 * does) into a Directory tree in `cas`: the layer's changeset, whiteouts
 * kept as empty files for mergeLayerTrees. Entries are refused exactly as
 * mount mode refuses them. Returns the root Directory's digest.
 */
export async function layerToTree(
  blobPath: string,
  mediaType: string,
  fn: DigestFunction,
  cas: BlobStore,
  options: LayerToTreeOptions = {},
): Promise<{ root: Digest; stats: LayerTreeStats }> {
  layerCompression(mediaType);
  const meter = options.meter ?? layerMeter({ ...DEFAULT_UNPACK_LIMITS, ...options.limits });
  const spool = options.tempDir === undefined ? undefined : await mkdtemp(join(options.tempDir, "layer-"));
  const uploader = new MissingBlobUploader(cas);
  const converter = new LayerConverter(fn, uploader, meter, options.maxMemoryFileBytes, spool);
  try {
    await forEachTarEntry(blobPath, meter, (header, data) => converter.add(header, data), options.onProgress);
    const { root, directories } = await converter.draft.encode(fn, uploader);
    await uploader.finish();
    return { root, stats: { ...converter.stats, directories } };
  } catch (err) {
    await uploader.abort();
    throw err;
  } finally {
    if (spool !== undefined) await rm(spool, { recursive: true, force: true });
  }
}

class LayerConverter {
  readonly draft = new LayerDraft();
  readonly stats: Omit<LayerTreeStats, "directories"> = {
    entries: 0,
    files: 0,
    bytes: 0,
    symlinks: 0,
    whiteouts: 0,
    skipped: 0,
  };
  private spooled = 0;
  private emptyDigest: Digest | undefined;

  constructor(
    private readonly fn: DigestFunction,
    private readonly uploader: MissingBlobUploader,
    private readonly meter: LayerMeter,
    private readonly maxMemoryFileBytes = DEFAULT_MAX_MEMORY_FILE_BYTES,
    private readonly spool: string | undefined,
  ) {}

  async add(header: Header, data: AsyncIterable<unknown>): Promise<void> {
    this.stats.entries++;
    this.meter.entry();
    const { parts, whiteout } = layerEntry(header);
    if (whiteout) return this.whiteout(header, parts);
    const name = header.name;
    switch (header.type) {
      case "file":
      case "contiguous-file":
        return this.file(header, parts, data);
      case "directory":
        // Kept as the image says: the Directory's unix_mode is tamed when encoded, the image's mode kept beside.
        this.draft.setDirectory(parts, (header.mode ?? 0o755) & 0o7777, name);
        return;
      case "symlink":
        return this.symlink(header, parts);
      case "link":
        return this.hardLink(header, parts);
      default:
        this.stats.skipped++;
    }
  }

  /** Kept as an empty file, whatever the entry's type, for the merge to interpret (OCI changeset form). */
  private async whiteout(header: Header, parts: string[]): Promise<void> {
    const base = parts.at(-1) as string;
    const hidden = base.slice(WHITEOUT_PREFIX.length);
    if (base !== OPAQUE_MARKER) {
      if (hidden.startsWith(WHITEOUT_PREFIX)) {
        this.stats.skipped++; // other AUFS metadata (.wh..wh.plnk…) means nothing here
        return;
      }
      if (hidden === "" || hidden === "." || hidden === "..") throw badEntry(header.name, "is a whiteout of no file");
    }
    this.emptyDigest ??= await digestOf(this.fn, new Uint8Array(0));
    const mode = header.mode ?? 0o644;
    this.draft.set(parts, { kind: "file", mode, digest: this.emptyDigest, whiteout: true }, header.name);
    this.stats.whiteouts++;
  }

  private async file(header: Header, parts: string[], data: AsyncIterable<unknown>): Promise<void> {
    const size = header.size ?? 0;
    // Counted before the data is read: a refused file is neither spooled nor stored.
    this.meter.bytes(size);
    const parent = this.draft.parentOf(parts, header.name);
    const digest = size > this.maxMemoryFileBytes ? await this.spoolFile(header, data) : await this.keepFile(data);
    const mode = hostMode(header.mode ?? 0o644);
    parent.children.set(parts.at(-1) as string, { kind: "file", mode, digest, whiteout: false });
    this.stats.files++;
    this.stats.bytes += size;
  }

  /**
   * The content, queued for the CAS. Most files arrive as one chunk, a view
   * of the decompressed stream's buffer, kept as it is: copying cost more
   * (allocation, GC) than it saved. The uploader counts the whole buffers
   * such views pin, so memory stays bounded.
   */
  private async keepFile(data: AsyncIterable<unknown>): Promise<Digest> {
    const chunks: Buffer[] = [];
    for await (const chunk of data) chunks.push(chunk as Buffer);
    const content = chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks);
    const blob = { digest: await digestOf(this.fn, content), data: content };
    await this.uploader.add(blob);
    return blob.digest;
  }

  /** Hashes while writing to a temporary file, which the uploader streams into the CAS and deletes. */
  private async spoolFile(header: Header, data: AsyncIterable<unknown>): Promise<Digest> {
    if (this.spool === undefined) {
      throw new Error(
        `layerToTree needs options.tempDir for files over ${this.maxMemoryFileBytes} bytes, such as ${JSON.stringify(header.name)}`,
      );
    }
    const path = join(this.spool, String(++this.spooled));
    const hasher = await this.fn.createHasher();
    let size = 0;
    // Synchronous writes, as in unpackLayer: short calls on one descriptor, and the caller yields often.
    const fd = openSync(path, NEW_FILE, 0o600);
    try {
      for await (const chunk of data) {
        const bytes = chunk as Buffer;
        hasher.update(bytes);
        for (let done = 0; done < bytes.byteLength; ) done += writeSync(fd, bytes, done);
        size += bytes.byteLength;
      }
    } finally {
      closeSync(fd);
    }
    const digest = { fn: this.fn, hash: hasher.digestHex(), sizeBytes: size };
    await this.uploader.add({ digest, path });
    return digest;
  }

  private symlink(header: Header, parts: string[]): void {
    const target = header.linkname ?? "";
    if (target === "" || target.includes("\0")) throw badEntry(header.name, "is a symlink to nothing");
    this.draft.set(parts, { kind: "symlink", target }, header.name);
    this.stats.symlinks++;
  }

  /** A second name for an earlier file (or symlink) of this layer: the same node under another name. */
  private hardLink(header: Header, parts: string[]): void {
    const linkname = header.linkname ?? "";
    const targetParts = entryPath(linkname, header.name, `hard link target ${JSON.stringify(linkname)} `);
    if (targetParts.join("/") === parts.join("/")) return;
    const target = this.draft.linkTarget(targetParts, header.name);
    this.draft.set(parts, target, header.name);
  }
}
