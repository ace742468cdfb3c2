import type { Digest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { badEntry } from "../image/layer-tree.js";
import { directoryProperties, encodeDirectory, modeProperties, wire } from "./directories.js";
import type { MissingBlobUploader } from "./missing-blob-uploader.js";

export interface DraftDirectory {
  kind: "directory";
  mode: number;
  children: Map<string, DraftNode>;
}

export interface DraftFile {
  kind: "file";
  mode: number;
  digest: Digest;
  /** A `.wh.` entry: kept in the tree for the merge, never a hard link's target. */
  whiteout: boolean;
}

export interface DraftSymlink {
  kind: "symlink";
  target: string;
}

export type DraftNode = DraftDirectory | DraftFile | DraftSymlink;

const IMPLIED_DIRECTORY_MODE = 0o755;

/**
 * One layer's changeset held in memory while its tar is read: only names,
 * modes and digests (the file contents go to the CAS as they are read), so
 * even a layer of a million entries fits. Paths are component lists from
 * `entryPath`; errors name the tar entry as mount mode's do.
 */
export class LayerDraft {
  readonly root: DraftDirectory = { kind: "directory", mode: IMPLIED_DIRECTORY_MODE, children: new Map() };

  /** The directory that holds `parts`, creating missing ancestors. */
  parentOf(parts: readonly string[], entry: string): DraftDirectory {
    let dir = this.root;
    for (let i = 0; i < parts.length - 1; i++) {
      const name = parts[i] as string;
      const child = dir.children.get(name);
      if (child === undefined) {
        const created: DraftDirectory = { kind: "directory", mode: IMPLIED_DIRECTORY_MODE, children: new Map() };
        dir.children.set(name, created);
        dir = created;
      } else if (child.kind === "directory") {
        dir = child;
      } else {
        throw notADirectory(parts.slice(0, i + 1), child, entry);
      }
    }
    return dir;
  }

  /** Puts a file or symlink at `parts`, replacing whatever was there (a directory with its contents). */
  set(parts: readonly string[], node: DraftFile | DraftSymlink, entry: string): void {
    this.parentOf(parts, entry).children.set(parts.at(-1) as string, node);
  }

  /** A directory entry: an existing directory only takes the new mode and keeps its children. */
  setDirectory(parts: readonly string[], mode: number, entry: string): void {
    if (parts.length === 0) {
      this.root.mode = mode;
      return;
    }
    const parent = this.parentOf(parts, entry);
    const name = parts.at(-1) as string;
    const existing = parent.children.get(name);
    if (existing?.kind === "directory") existing.mode = mode;
    else parent.children.set(name, { kind: "directory", mode, children: new Map() });
  }

  /** The earlier file or symlink of this layer a hard link names, reached without symlinks. */
  linkTarget(parts: readonly string[], entry: string): DraftFile | DraftSymlink {
    let dir = this.root;
    for (let i = 0; i < parts.length - 1; i++) {
      const child = dir.children.get(parts[i] as string);
      const rel = parts.slice(0, i + 1);
      if (child === undefined) throw badEntry(entry, `${JSON.stringify(rel.join("/"))} does not exist in this layer`);
      if (child.kind !== "directory") throw notADirectory(rel, child, entry);
      dir = child;
    }
    const target = parts.length === 0 ? this.root : dir.children.get(parts.at(-1) as string);
    if (target === undefined || target.kind === "directory" || (target.kind === "file" && target.whiteout)) {
      throw badEntry(entry, `hard link target ${JSON.stringify(parts.join("/"))} is not an earlier file of this layer`);
    }
    return target;
  }

  /**
   * Encodes every directory, deepest first, queueing each for the CAS;
   * returns the root's digest and how many directories there were.
   */
  async encode(fn: DigestFunction, uploader: MissingBlobUploader): Promise<{ root: Digest; directories: number }> {
    let directories = 0;
    const visit = async (dir: DraftDirectory): Promise<Digest> => {
      directories++;
      const message: Directory = {
        files: [],
        directories: [],
        symlinks: [],
        nodeProperties: directoryProperties(dir.mode),
      };
      for (const [name, node] of dir.children) {
        if (node.kind === "directory") {
          message.directories.push({ name, digest: wire(await visit(node)) });
        } else if (node.kind === "file") {
          message.files.push({
            name,
            digest: wire(node.digest),
            isExecutable: (node.mode & 0o111) !== 0,
            nodeProperties: modeProperties(node.mode),
          });
        } else {
          message.symlinks.push({ name, target: node.target, nodeProperties: undefined });
        }
      }
      const blob = await encodeDirectory(fn, message);
      await uploader.add(blob);
      return blob.digest;
    };
    const root = await visit(this.root);
    return { root, directories };
  }
}

function notADirectory(parts: readonly string[], node: DraftFile | DraftSymlink, entry: string) {
  const rel = JSON.stringify(parts.join("/"));
  return badEntry(
    entry,
    node.kind === "symlink" ? `its parent ${rel} is a symlink` : `its parent ${rel} is not a directory`,
  );
}
