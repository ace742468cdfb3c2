import { lstat, readdir, readlink } from "node:fs/promises";
import { join } from "node:path";
import { type Digest, digestOf } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { hashFile } from "../worker/outputs.js";
import type { UploadSource } from "../worker/remote-cas.js";

/**
 * The REAPI Merkle tree of a local directory: its root digest and every
 * blob (files and Directory messages) a client must upload for it.
 */
export async function localTree(fn: DigestFunction, dir: string): Promise<{ root: Digest; blobs: UploadSource[] }> {
  const blobs: UploadSource[] = [];
  const visit = async (path: string): Promise<Digest> => {
    const directory = Directory.fromPartial({});
    const entries = (await readdir(path, { withFileTypes: true })).sort((a, b) =>
      Buffer.compare(Buffer.from(a.name), Buffer.from(b.name)),
    );
    for (const entry of entries) {
      const full = join(path, entry.name);
      if (entry.isSymbolicLink()) {
        directory.symlinks.push({ name: entry.name, target: await readlink(full), nodeProperties: undefined });
      } else if (entry.isFile()) {
        const info = await lstat(full);
        const digest = await hashFile(fn, full, info.size);
        blobs.push({ digest, path: full });
        directory.files.push({
          name: entry.name,
          digest: { hash: digest.hash, sizeBytes: digest.sizeBytes },
          isExecutable: (info.mode & 0o111) !== 0,
          nodeProperties: undefined,
        });
      } else if (entry.isDirectory()) {
        const child = await visit(full);
        directory.directories.push({ name: entry.name, digest: { hash: child.hash, sizeBytes: child.sizeBytes } });
      }
    }
    const data = Buffer.from(Directory.encode(directory).finish());
    const digest = await digestOf(fn, data);
    blobs.push({ digest, data });
    return digest;
  };
  return { root: await visit(dir), blobs };
}
