import { createHash } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { type Header, pack } from "tar-stream";
import { compress } from "zstd-napi";

export type Compression = "none" | "gzip" | "zstd";

/** One tar entry; `content` only for files. Defaults: mode 0644 (0755 for directories), root-owned. */
export interface LayerEntry {
  name: string;
  type?: "file" | "directory" | "symlink" | "link" | "character-device" | "block-device" | "fifo";
  content?: string | Buffer;
  mode?: number;
  uid?: number;
  gid?: number;
  mtime?: Date;
  linkname?: string;
}

export const MEDIA_TYPES: Record<Compression, string> = {
  none: "application/vnd.oci.image.layer.v1.tar",
  gzip: "application/vnd.oci.image.layer.v1.tar+gzip",
  zstd: "application/vnd.oci.image.layer.v1.tar+zstd",
};

/** A tar archive of `entries` in that order, compressed as asked. */
export async function makeLayer(entries: readonly LayerEntry[], compression: Compression = "none"): Promise<Buffer> {
  const tar = pack();
  const chunks: Buffer[] = [];
  const done = (async () => {
    for await (const chunk of tar) chunks.push(chunk as Buffer);
  })();
  for (const entry of entries) {
    const type = entry.type ?? (entry.content === undefined && entry.name.endsWith("/") ? "directory" : "file");
    const headers: Partial<Header> & { name: string } = {
      name: entry.name,
      type,
      mode: entry.mode ?? (type === "directory" ? 0o755 : 0o644),
      uid: entry.uid ?? 0,
      gid: entry.gid ?? 0,
      mtime: entry.mtime ?? new Date(1_600_000_000_000),
      linkname: entry.linkname,
    };
    const body = type === "file" ? Buffer.from(entry.content ?? "") : undefined;
    await new Promise<void>((resolve, reject) => {
      const done = (err?: Error | null) => (err ? reject(err) : resolve());
      if (body) tar.entry(headers, body, done);
      else tar.entry(headers, done);
    });
  }
  tar.finalize();
  await done;
  const raw = Buffer.concat(chunks);
  if (compression === "gzip") return gzipSync(raw);
  if (compression === "zstd") return compress(raw);
  return raw;
}

/** A layer as a registry client would hand it over: a blob file and its descriptor. */
export interface LayerFile {
  path: string;
  descriptor: { digest: string; mediaType: string; size: number };
}

export async function writeLayer(
  dir: string,
  entries: readonly LayerEntry[],
  compression: Compression = "none",
): Promise<LayerFile> {
  const data = await makeLayer(entries, compression);
  const hex = createHash("sha256").update(data).digest("hex");
  const path = join(dir, `${hex}.layer`);
  await writeFile(path, data);
  return { path, descriptor: { digest: `sha256:${hex}`, mediaType: MEDIA_TYPES[compression], size: data.length } };
}
