import { createHash } from "node:crypto";
import { once } from "node:events";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { createGzip, gzipSync } from "node:zlib";
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

/**
 * Layers no honest tool makes, each with what Berth must say when it refuses
 * them. `outside` is a directory outside the layer that an escape would
 * reach. Mount mode (unpacking) and expand mode (trees) refuse all alike.
 */
export const MALICIOUS_LAYERS: [string, (outside: string) => LayerEntry[], RegExp][] = [
  ["a parent directory", () => [{ name: "../x", content: "evil" }], /"\.\.\/x": escapes the layer root/],
  [
    "a deeper climb",
    () => [{ name: "a/../../../sentinel/x", content: "evil" }],
    /"a\/\.\.\/\.\.\/\.\.\/sentinel\/x": escapes/,
  ],
  ["an absolute path", (outside) => [{ name: `${outside}/x`, content: "evil" }], /sentinel\/x": is an absolute path/],
  [
    "a write through a symlink",
    (outside) => [
      { name: "l", type: "symlink", linkname: outside },
      { name: "l/evil", content: "evil" },
    ],
    /"l\/evil": its parent "l" is a symlink/,
  ],
  [
    "a directory through a symlink",
    (outside) => [
      { name: "l", type: "symlink", linkname: outside },
      { name: "l/d/", type: "directory" },
    ],
    /"l\/d\/": its parent "l" is a symlink/,
  ],
  [
    "a whiteout through a symlink",
    (outside) => [
      { name: "l", type: "symlink", linkname: outside },
      { name: "l/.wh.x", content: "" },
    ],
    /"l\/\.wh\.x": its parent "l" is a symlink/,
  ],
  [
    "a hard link out by ..",
    () => [{ name: "h", type: "link", linkname: "../../../../../../etc/passwd" }],
    /"h": hard link target "(\.\.\/)+etc\/passwd" escapes the layer root/,
  ],
  [
    "a hard link to an absolute path",
    () => [{ name: "h", type: "link", linkname: "/etc/passwd" }],
    /"h": hard link target "\/etc\/passwd" is an absolute path/,
  ],
  [
    "a hard link through a symlink",
    () => [
      { name: "etc", type: "symlink", linkname: "/etc" },
      { name: "h", type: "link", linkname: "etc/passwd" },
    ],
    /"h": its parent "etc" is a symlink/,
  ],
  ["a hard link to nothing", () => [{ name: "h", type: "link", linkname: "absent" }], /"h": hard link target/],
];

/** Blobs that are not what their media type says: damaged, cut short, or not a tar at all. */
export async function corruptLayerBlobs(): Promise<{ data: Buffer; mediaType: string; message: RegExp }[]> {
  const good = await makeLayer([{ name: "f", content: "x".repeat(5000) }], "gzip");
  const corrupt = Buffer.from(good);
  corrupt.fill(0x55, 20, 60);
  return [
    { data: corrupt, mediaType: MEDIA_TYPES.gzip, message: /not valid gzip data/ },
    {
      data: good.subarray(0, good.length - 20),
      mediaType: MEDIA_TYPES.gzip,
      message: /not valid gzip data|unexpected end/i,
    },
    {
      data: Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd]), Buffer.alloc(64, 7)]),
      mediaType: MEDIA_TYPES.zstd,
      message: /not valid zstd/,
    },
    { data: Buffer.alloc(1024, 0x41), mediaType: MEDIA_TYPES.none, message: /not a valid tar archive/ },
  ];
}

/**
 * A gzip bomb: a tar of `files` files of `fileBytes` zeros each, made as a
 * stream so that a gigabyte of tar never sits in memory. Returns the blob
 * (about a thousandth of the tar) and the digest of the tar (its diff_id).
 */
export async function gzipBombLayer(
  files: number,
  fileBytes: number,
  dir = "zeros",
): Promise<{ blob: Buffer; diffId: string }> {
  const tar = pack();
  const tarHash = createHash("sha256");
  const chunks: Buffer[] = [];
  const gzip = createGzip({ level: 9 });
  const collected = (async () => {
    for await (const chunk of gzip) chunks.push(chunk as Buffer);
  })();
  const fed = (async () => {
    for await (const chunk of tar) {
      tarHash.update(chunk as Buffer);
      if (!gzip.write(chunk)) await once(gzip, "drain");
    }
    gzip.end();
  })();
  const zeros = Buffer.alloc(1024 * 1024);
  for (let i = 0; i < files; i++) {
    await new Promise<void>((resolve, reject) => {
      const entry = tar.entry({ name: `${dir}/${i}`, size: fileBytes, mode: 0o644 }, (err) =>
        err ? reject(err) : resolve(),
      );
      (async () => {
        for (let written = 0; written < fileBytes; written += zeros.length) {
          const part = zeros.subarray(0, Math.min(zeros.length, fileBytes - written));
          if (!entry.write(part)) await once(entry, "drain");
        }
        entry.end(() => {});
      })().catch(reject);
    });
  }
  tar.finalize();
  await fed;
  await collected;
  return { blob: Buffer.concat(chunks), diffId: `sha256:${tarHash.digest("hex")}` };
}
