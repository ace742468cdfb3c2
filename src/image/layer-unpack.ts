import { closeSync, constants, fchmodSync, fchownSync, futimesSync, openSync, writeSync } from "node:fs";
import { type FileHandle, lchown, link, lstat, lutimes, mkdir, open, rm, symlink } from "node:fs/promises";
import type { Header } from "tar-stream";
import { hostMode } from "./host-mode.js";
import { DEFAULT_IMAGE_LIMITS, type LayerMeter, layerMeter } from "./image-limits.js";
import { forEachTarEntry, layerCompression } from "./layer-source.js";
import { badEntry, entryPath, LayerTree, layerEntry } from "./layer-tree.js";
import { imageMode, isOpened } from "./open-directories.js";
import { markOpaque, type WhiteoutMaker } from "./whiteout.js";

export interface UnpackLimits {
  /** Total size of the regular files of one layer. */
  maxBytes: number;
  /** Tar entries of one layer, whatever their kind. */
  maxEntries: number;
}

export const DEFAULT_UNPACK_LIMITS: UnpackLimits = {
  maxBytes: DEFAULT_IMAGE_LIMITS.maxLayerBytes,
  maxEntries: DEFAULT_IMAGE_LIMITS.maxLayerEntries,
};

export interface UnpackOptions {
  whiteouts: WhiteoutMaker;
  /** Counts the layer against its image's caps as it is read; default: a meter of `limits` alone. */
  meter?: LayerMeter;
  limits?: Partial<UnpackLimits>;
  /** Give files the tar's owners (needs root); default: when running as root. */
  chown?: boolean;
  /** Filled with the directories whose mode was tamed and the opaque ones (see open-directories.ts). */
  layout?: LayerLayout;
}

/** What an action's overlay needs to know of a layer's directories besides what is on disk. */
export interface LayerLayout {
  /** Relative path → the image's mode, for directories stored without group or other write. */
  opened: Map<string, number>;
  /** Relative paths of opaque directories. */
  opaque: Set<string>;
}

export interface UnpackStats {
  entries: number;
  files: number;
  /** Sum of regular file sizes, each hard-linked file counted once. */
  bytes: number;
  whiteouts: number;
  opaqueDirs: number;
  /** Devices, FIFOs and other kinds a layer may not bring into an action. */
  skipped: number;
}

const WHITEOUT = ".wh.";
const OPAQUE = ".wh..wh..opq";
const NEW_FILE = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;
const DIRECTORY = constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW;

/**
 * Extracts a layer blob (tar, tar+gzip or tar+zstd) into `dest`, which must
 * not exist yet, in the form overlayfs stacks: whiteouts become 0/0
 * character devices and opaque markers an xattr on their directory. Any
 * refused entry or failure removes `dest` entirely.
 */
export async function unpackLayer(
  blobPath: string,
  mediaType: string,
  dest: string,
  options: UnpackOptions,
): Promise<UnpackStats> {
  layerCompression(mediaType);
  const meter = options.meter ?? layerMeter({ ...DEFAULT_UNPACK_LIMITS, ...options.limits });
  await mkdir(dest, { mode: 0o755 });
  try {
    const unpacker = new Unpacker(new LayerTree(dest), options, meter);
    await forEachTarEntry(blobPath, meter, (header, data) => unpacker.add(header, data));
    return await unpacker.finish();
  } catch (err) {
    await rm(dest, { recursive: true, force: true });
    throw err;
  }
}

class Unpacker {
  readonly stats: UnpackStats = { entries: 0, files: 0, bytes: 0, whiteouts: 0, opaqueDirs: 0, skipped: 0 };
  private readonly dirTimes: { parts: string[]; mtime: Date }[] = [];
  private readonly opaque = new Set<string>();
  private readonly opened = new Map<string, number>();
  private readonly chown: boolean;

  constructor(
    private readonly tree: LayerTree,
    private readonly options: UnpackOptions,
    private readonly meter: LayerMeter,
  ) {
    this.chown = options.chown ?? process.getuid?.() === 0;
  }

  async add(header: Header, data: AsyncIterable<unknown>): Promise<void> {
    this.stats.entries++;
    this.meter.entry();
    const { parts, whiteout } = layerEntry(header);
    if (whiteout) return this.whiteout(header.name, parts);
    switch (header.type) {
      case "file":
      case "contiguous-file":
        return this.file(header, parts, data);
      case "directory":
        return this.directory(header, parts);
      case "symlink":
        return this.symlink(header, parts);
      case "link":
        return this.hardLink(header, parts);
      default:
        this.stats.skipped++;
    }
  }

  async finish(): Promise<UnpackStats> {
    const opaque: string[] = [];
    for (const rel of this.opaque) {
      const parts = rel === "" ? [] : rel.split("/");
      if ((await this.tree.kind(parts)) === "directory") opaque.push(this.tree.abs(parts));
    }
    await markOpaque(opaque);
    this.stats.opaqueDirs = opaque.length;
    if (this.options.layout) {
      for (const rel of this.opaque)
        if (opaque.includes(this.tree.abs(rel === "" ? [] : rel.split("/")))) this.options.layout.opaque.add(rel);
      for (const [rel, mode] of this.opened) {
        // Still the directory that entry made (a later entry may have replaced it, or implied a new one).
        const info = await lstat(this.tree.abs(rel.split("/"))).catch(() => undefined);
        if (info?.isDirectory() && (info.mode & 0o7777) === hostMode(mode)) this.options.layout.opened.set(rel, mode);
      }
    }
    // Deepest first: setting a child's times would not touch its parent, but creating it did.
    this.dirTimes.sort((a, b) => b.parts.length - a.parts.length);
    for (const { parts, mtime } of this.dirTimes) {
      const dir = await open(this.tree.abs(parts), DIRECTORY).catch(() => undefined);
      if (!dir) continue; // replaced by a later entry of another kind
      await dir.utimes(mtime, mtime).finally(() => dir.close());
    }
    return this.stats;
  }

  /** `.wh.NAME` deletes NAME of lower layers; the entry itself is never extracted (OCI image spec). */
  private async whiteout(name: string, parts: string[]): Promise<void> {
    const base = parts.at(-1) ?? "";
    const parent = parts.slice(0, -1);
    if (base === OPAQUE) {
      await this.tree.prepareDirectory(parent, name);
      this.opaque.add(parent.join("/"));
      return;
    }
    const hidden = base.slice(WHITEOUT.length);
    if (hidden.startsWith(WHITEOUT)) {
      this.stats.skipped++; // other AUFS metadata (.wh..wh.plnk…) has no meaning here
      return;
    }
    if (hidden === "" || hidden === "." || hidden === "..") throw badEntry(name, "is a whiteout of no file");
    const target = [...parent, hidden];
    const path = await this.tree.prepare(target, name);
    // A whiteout applies to lower layers only: a file of this layer under that name stays.
    if ((await this.tree.kind(target)) !== "none") return;
    await this.options.whiteouts.create(path);
    this.stats.whiteouts++;
  }

  private async file(header: Header, parts: string[], data: AsyncIterable<unknown>): Promise<void> {
    const size = header.size ?? 0;
    // Counted before a byte is written: tar-stream hands over exactly `size` bytes, so a refused file
    // writes nothing and an accepted one no more than the cap allows.
    this.meter.bytes(size);
    const path = await this.tree.prepare(parts, header.name);
    // Synchronous calls on the descriptor: layers are mostly small files, and
    // five thread-pool round trips per file made unpacking 4x slower (measured).
    // Each call is short, and unpackLayer yields to the event loop often.
    const fd = await this.replacing(parts, async () => openSync(path, NEW_FILE, 0o600));
    try {
      for await (const chunk of data) {
        const bytes = chunk as Buffer;
        for (let done = 0; done < bytes.byteLength; ) done += writeSync(fd, bytes, done);
      }
      if (this.chown) fchownSync(fd, header.uid ?? 0, header.gid ?? 0);
      fchmodSync(fd, hostMode(header.mode ?? 0o644));
      const mtime = header.mtime ?? new Date(0);
      futimesSync(fd, mtime, mtime);
    } finally {
      closeSync(fd);
    }
    this.stats.files++;
    this.stats.bytes += size;
  }

  private async directory(header: Header, parts: string[]): Promise<void> {
    const path = await this.tree.prepare(parts, header.name);
    // An entry for an existing directory updates it; anything else in the way is replaced.
    const kind = await this.tree.kind(parts);
    if (kind === "other") await this.tree.remove(parts);
    if (kind !== "directory") await mkdir(path, { mode: 0o700 });
    this.tree.markDirectory(parts);
    const rel = parts.join("/");
    const mode = header.mode ?? 0o755;
    // The layer root's mode is the overlay's root's: not one an upper directory can restore.
    if (rel !== "" && isOpened(mode)) this.opened.set(rel, imageMode(mode));
    else this.opened.delete(rel);
    const dir = await open(path, DIRECTORY);
    try {
      await this.setOwnerAndMode(dir, header);
    } finally {
      await dir.close();
    }
    this.dirTimes.push({ parts, mtime: header.mtime ?? new Date(0) });
  }

  private async symlink(header: Header, parts: string[]): Promise<void> {
    const target = header.linkname ?? "";
    if (target === "" || target.includes("\0")) throw badEntry(header.name, "is a symlink to nothing");
    const path = await this.tree.prepare(parts, header.name);
    await this.replacing(parts, () => symlink(target, path));
    if (this.chown) await lchown(path, header.uid ?? 0, header.gid ?? 0);
    const mtime = header.mtime ?? new Date(0);
    await lutimes(path, mtime, mtime);
  }

  private async hardLink(header: Header, parts: string[]): Promise<void> {
    const linkname = header.linkname ?? "";
    const targetParts = entryPath(linkname, header.name, `hard link target ${JSON.stringify(linkname)} `);
    if (targetParts.join("/") === parts.join("/")) return;
    const target = await this.tree.existing(targetParts, header.name);
    const path = await this.tree.prepare(parts, header.name);
    await this.replacing(parts, () => link(target, path));
  }

  /** Runs `create`, first clearing the way if something is already at `parts`. */
  private async replacing<T>(parts: string[], create: () => Promise<T>): Promise<T> {
    try {
      return await create();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      await this.tree.remove(parts);
      return await create();
    }
  }

  private async setOwnerAndMode(handle: FileHandle, header: Header): Promise<void> {
    // chown before chmod: chown clears set-user-ID and set-group-ID bits.
    if (this.chown) await handle.chown(header.uid ?? 0, header.gid ?? 0);
    await handle.chmod(hostMode(header.mode ?? 0o755));
  }
}
