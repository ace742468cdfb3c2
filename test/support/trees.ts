/**
 * REAPI Directory trees written by hand in tests, e.g. an image's root
 * filesystem as the farm's expand mode puts it in the CAS:
 *
 *   const base = dir({ etc: dir({ marker: file("x\n") }), bin: dir({ sh: symlink("busybox") }) });
 *   const { root, blobs } = encodeTree(base);
 */
import { Directory } from "../../src/gen/build/bazel/remote/execution/v2/remote_execution.js";
import { imageModeProperty } from "../../src/image/open-directories.js";
import { sha256, type WireDigest } from "./blobs.js";

export interface FileNode {
  kind: "file";
  content: Buffer;
  executable: boolean;
}

export interface SymlinkNode {
  kind: "symlink";
  target: string;
}

export interface DirNode {
  kind: "dir";
  entries: Record<string, TreeNode>;
  /** node_properties.unix_mode of the Directory, when set. */
  mode: number | undefined;
}

export type TreeNode = FileNode | SymlinkNode | DirNode;

export function file(content: string | Buffer, executable = false): FileNode {
  return { kind: "file", content: typeof content === "string" ? Buffer.from(content) : content, executable };
}

export function symlink(target: string): SymlinkNode {
  return { kind: "symlink", target };
}

export function dir(entries: Record<string, TreeNode> = {}, mode?: number): DirNode {
  return { kind: "dir", entries, mode };
}

/** `tree` with the directory at `path` (slash-separated, relative) replaced by `replacement`. */
export function graft(tree: DirNode, path: string, replacement: DirNode): DirNode {
  const [name, ...rest] = path.split("/").filter((part) => part !== "");
  if (name === undefined) return replacement;
  const child = tree.entries[name];
  if (child?.kind !== "dir") throw new Error(`no directory ${name} to graft into`);
  return { ...tree, entries: { ...tree.entries, [name]: graft(child, rest.join("/"), replacement) } };
}

export interface EncodedTree {
  root: WireDigest;
  /** Every Directory message and file of the tree, each once. */
  blobs: { digest: WireDigest; data: Buffer }[];
}

/** The tree's Directory messages (entries sorted by name, as REAPI requires) and its blobs, SHA-256. */
export function encodeTree(tree: DirNode): EncodedTree {
  const blobs = new Map<string, { digest: WireDigest; data: Buffer }>();
  const add = (data: Buffer): WireDigest => {
    const digest = sha256(data);
    blobs.set(`${digest.hash}/${digest.sizeBytes}`, { digest, data });
    return digest;
  };
  const encode = (node: DirNode): WireDigest => {
    const names = Object.keys(node.entries).sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
    const directory = Directory.fromPartial({
      // With the image's own mode beside a mode the worker tames, as the farm's expansion writes it.
      nodeProperties:
        node.mode === undefined ? undefined : { properties: imageModeProperty(node.mode), unixMode: node.mode },
    });
    for (const name of names) {
      const entry = node.entries[name] as TreeNode;
      if (entry.kind === "file") {
        const digest = add(entry.content);
        directory.files.push({ name, digest, isExecutable: entry.executable, nodeProperties: undefined });
      } else if (entry.kind === "symlink") {
        directory.symlinks.push({ name, target: entry.target, nodeProperties: undefined });
      } else {
        directory.directories.push({ name, digest: encode(entry) });
      }
    }
    return add(Buffer.from(Directory.encode(directory).finish()));
  };
  const root = encode(tree);
  return { root, blobs: [...blobs.values()] };
}
