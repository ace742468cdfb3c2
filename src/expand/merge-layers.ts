import type { BlobStore } from "../cas/blob-store.js";
import { type Digest, digestKey } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type {
  Directory,
  FileNode,
  NodeProperties,
  SymlinkNode,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { childDigest, encodeDirectory, OPAQUE_MARKER, readDirectory, WHITEOUT_PREFIX, wire } from "./directories.js";
import { MissingBlobUploader } from "./missing-blob-uploader.js";

/** A directory of the result that no layer above changed: it is stored already, under this digest. */
interface StoredDirectory {
  kind: "stored";
  digest: Digest;
}

/** A directory some layer changed; encoded once, after the last layer. Never mutated once built. */
interface ChangedDirectory {
  kind: "changed";
  nodeProperties: NodeProperties | undefined;
  children: Map<string, MergedNode>;
}

type MergedDirectory = StoredDirectory | ChangedDirectory;
type MergedNode = MergedDirectory | { kind: "file"; node: FileNode } | { kind: "symlink"; node: SymlinkNode };

/**
 * Applies layer trees (from layerToTree) bottom to top, as the OCI image
 * spec applies changesets, and returns the image's root Directory digest,
 * stored in `cas`. A layer Directory missing from the CAS is NOT_FOUND.
 */
export async function mergeLayerTrees(fn: DigestFunction, cas: BlobStore, layers: readonly Digest[]): Promise<Digest> {
  const merger = new LayerMerger(fn, cas);
  let image: MergedDirectory | undefined;
  for (const layer of layers) image = await merger.apply(image, layer);
  if (image === undefined) image = { kind: "changed", nodeProperties: undefined, children: new Map() };
  const uploader = new MissingBlobUploader(cas);
  try {
    const root = await merger.encode(image, uploader);
    await uploader.finish();
    return root;
  } catch (err) {
    await uploader.abort();
    throw err;
  }
}

class LayerMerger {
  /** Layer directories known to hold no whiteout at any depth: with nothing below, they are their own result. */
  private readonly whiteoutFree = new Set<string>();

  constructor(
    private readonly fn: DigestFunction,
    private readonly cas: BlobStore,
  ) {}

  /** The result of putting the layer directory `upper` over `lower`. */
  async apply(lower: MergedNode | undefined, upper: Digest): Promise<MergedDirectory> {
    const layerDir = await readDirectory(this.cas, upper, "layer tree directory");
    if (lower === undefined || lower.kind === "file" || lower.kind === "symlink") return this.alone(upper, layerDir);
    const below = lower.kind === "stored" ? await this.open(lower.digest) : lower;
    const opaque = layerDir.files.some((f) => f.name === OPAQUE_MARKER);
    const children = opaque ? new Map<string, MergedNode>() : new Map(below.children);
    // Whiteouts first: they delete from the layers below, never an entry of their own layer.
    for (const file of layerDir.files) {
      const hidden = hiddenName(file.name);
      if (hidden !== undefined) children.delete(hidden);
    }
    for (const file of layerDir.files) {
      if (!file.name.startsWith(WHITEOUT_PREFIX)) children.set(file.name, { kind: "file", node: file });
    }
    for (const symlink of layerDir.symlinks) children.set(symlink.name, { kind: "symlink", node: symlink });
    for (const dir of layerDir.directories) {
      const digest = childDigest(this.fn, dir.digest, upper, dir.name);
      children.set(dir.name, await this.apply(children.get(dir.name), digest));
    }
    return { kind: "changed", nodeProperties: layerDir.nodeProperties ?? below.nodeProperties, children };
  }

  /** A layer directory with nothing below it: itself, less its whiteouts (which have nothing to delete). */
  private async alone(digest: Digest, layerDir: Directory): Promise<MergedDirectory> {
    const key = digestKey(digest);
    if (this.whiteoutFree.has(key)) return { kind: "stored", digest };
    const children = new Map<string, MergedNode>();
    let changed = false;
    for (const file of layerDir.files) {
      if (file.name.startsWith(WHITEOUT_PREFIX)) changed = true;
      else children.set(file.name, { kind: "file", node: file });
    }
    for (const symlink of layerDir.symlinks) children.set(symlink.name, { kind: "symlink", node: symlink });
    for (const dir of layerDir.directories) {
      const child = childDigest(this.fn, dir.digest, digest, dir.name);
      const result = await this.alone(child, await readDirectory(this.cas, child, "layer tree directory"));
      if (result.kind !== "stored") changed = true;
      children.set(dir.name, result);
    }
    if (!changed) {
      this.whiteoutFree.add(key);
      return { kind: "stored", digest };
    }
    return { kind: "changed", nodeProperties: layerDir.nodeProperties, children };
  }

  /** A stored directory of the result, as a changed one a layer can be applied to. */
  private async open(digest: Digest): Promise<ChangedDirectory> {
    const directory = await readDirectory(this.cas, digest, "layer tree directory");
    const children = new Map<string, MergedNode>();
    for (const file of directory.files) children.set(file.name, { kind: "file", node: file });
    for (const symlink of directory.symlinks) children.set(symlink.name, { kind: "symlink", node: symlink });
    for (const dir of directory.directories) {
      children.set(dir.name, { kind: "stored", digest: childDigest(this.fn, dir.digest, digest, dir.name) });
    }
    return { kind: "changed", nodeProperties: directory.nodeProperties, children };
  }

  /** Encodes the changed directories, deepest first, queueing them for the CAS. */
  async encode(node: MergedDirectory, uploader: MissingBlobUploader): Promise<Digest> {
    if (node.kind === "stored") return node.digest;
    const message: Directory = { files: [], directories: [], symlinks: [], nodeProperties: node.nodeProperties };
    for (const [name, child] of node.children) {
      if (child.kind === "file") message.files.push(child.node);
      else if (child.kind === "symlink") message.symlinks.push(child.node);
      else message.directories.push({ name, digest: wire(await this.encode(child, uploader)) });
    }
    const blob = await encodeDirectory(this.fn, message);
    await uploader.add(blob);
    return blob.digest;
  }
}

/** NAME for a `.wh.NAME` whiteout; undefined for other names, the opaque marker and AUFS metadata. */
function hiddenName(name: string): string | undefined {
  if (!name.startsWith(WHITEOUT_PREFIX)) return undefined;
  const hidden = name.slice(WHITEOUT_PREFIX.length);
  return hidden.startsWith(WHITEOUT_PREFIX) ? undefined : hidden;
}
