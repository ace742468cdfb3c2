import { lstat, mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { Code, StatusError } from "../status/status.js";

/** The error for a layer entry Berth refuses to extract; the message names the entry. */
export function badEntry(name: string, why: string): StatusError {
  return new StatusError(Code.INVALID_ARGUMENT, `layer entry ${JSON.stringify(name)}: ${why}`);
}

/** Where a layer entry goes, and whether it is a whiteout (`.wh.NAME`, `.wh..wh..opq`) rather than content. */
export interface LayerEntry {
  parts: string[];
  whiteout: boolean;
}

/**
 * The checks every tar entry of a layer passes, whether it is unpacked
 * (mount mode) or turned into a tree (expand mode): a path inside the
 * layer, and only a directory may name the layer's root. (Entries are
 * counted by the reader's LayerMeter.)
 */
export function layerEntry(header: { name: string; type?: string | null }): LayerEntry {
  const parts = entryPath(header.name, header.name);
  const whiteout = (parts.at(-1) ?? "").startsWith(".wh.");
  if (!whiteout && parts.length === 0 && header.type !== "directory") {
    throw badEntry(header.name, "names the layer root");
  }
  return { parts, whiteout };
}

/**
 * The components of a path inside the layer ([] for the root), from the
 * name or hard link target of tar entry `entry`. Normalization is lexical,
 * as in Docker and containerd: `a/../b` is `b` whatever `a` is, so a symlink
 * never takes part in resolving `..`. Absolute paths are refused rather than
 * stripped: a layer naming `/etc/passwd` was not made by an honest tool.
 */
export function entryPath(path: string, entry: string, subject = ""): string[] {
  if (path.includes("\0")) throw badEntry(entry, `${subject}contains a NUL byte`);
  const parts: string[] = [];
  for (const part of path.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") {
      if (parts.length === 0) throw badEntry(entry, `${subject}escapes the layer root`);
      parts.pop();
    } else {
      parts.push(part);
    }
  }
  if (path.startsWith("/") && parts.length > 0) throw badEntry(entry, `${subject}is an absolute path`);
  return parts;
}

/**
 * The directory a layer is being extracted into. It remembers which of its
 * paths are real directories (created or checked with lstat during this
 * extraction), so that no entry is ever written through a symlink and
 * deep trees cost one lstat per directory, not one per entry and level.
 * Only this extraction writes here, so what it remembers stays true as long
 * as every removal goes through `remove`.
 */
export class LayerTree {
  private readonly dirs = new Set<string>([""]);

  constructor(readonly root: string) {}

  abs(parts: readonly string[]): string {
    return join(this.root, ...parts);
  }

  /** Makes every parent of `parts` a real directory (creating missing ones) and returns the path. */
  async prepare(parts: readonly string[], entry: string): Promise<string> {
    await this.checkParents(parts, entry, true);
    return this.abs(parts);
  }

  /** Makes `parts` itself a real directory, creating it and its parents if missing. */
  async prepareDirectory(parts: readonly string[], entry: string): Promise<void> {
    await this.checkParents([...parts, ""], entry, true);
  }

  /** The path of an existing non-directory reached without symlinks, or an error naming `entry`. */
  async existing(parts: readonly string[], entry: string): Promise<string> {
    await this.checkParents(parts, entry, false);
    const path = this.abs(parts);
    const info = await lstat(path).catch(() => undefined);
    if (!info || info.isDirectory()) {
      throw badEntry(entry, `hard link target ${JSON.stringify(parts.join("/"))} is not an earlier file of this layer`);
    }
    return path;
  }

  markDirectory(parts: readonly string[]): void {
    this.dirs.add(parts.join("/"));
  }

  /** Whatever is at `parts`, if anything, without following a symlink there. */
  async kind(parts: readonly string[]): Promise<"none" | "directory" | "other"> {
    if (this.dirs.has(parts.join("/"))) return "directory";
    const info = await lstat(this.abs(parts)).catch((err: NodeJS.ErrnoException) => {
      if (err.code === "ENOENT") return undefined;
      throw err;
    });
    if (!info) return "none";
    return info.isDirectory() ? "directory" : "other";
  }

  /** Deletes what is at `parts` so a later entry can take its place (OCI: a new entry replaces the old). */
  async remove(parts: readonly string[]): Promise<void> {
    const rel = parts.join("/");
    if (rel === "") throw new Error("the layer root cannot be replaced");
    await rm(this.abs(parts), { recursive: true, force: true });
    const prefix = `${rel}/`;
    for (const dir of this.dirs) if (dir === rel || dir.startsWith(prefix)) this.dirs.delete(dir);
  }

  private async checkParents(parts: readonly string[], entry: string, create: boolean): Promise<void> {
    for (let i = 1; i < parts.length; i++) {
      const rel = parts.slice(0, i).join("/");
      if (this.dirs.has(rel)) continue;
      const path = this.abs(parts.slice(0, i));
      const info = await lstat(path).catch((err: NodeJS.ErrnoException) => {
        if (err.code === "ENOENT") return undefined;
        throw err;
      });
      if (!info) {
        if (!create) throw badEntry(entry, `${JSON.stringify(rel)} does not exist in this layer`);
        await mkdir(path, { mode: 0o755 });
      } else if (info.isSymbolicLink()) {
        throw badEntry(entry, `its parent ${JSON.stringify(rel)} is a symlink`);
      } else if (!info.isDirectory()) {
        throw badEntry(entry, `its parent ${JSON.stringify(rel)} is not a directory`);
      }
      this.dirs.add(rel);
    }
  }
}
