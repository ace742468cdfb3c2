import { createReadStream } from "node:fs";
import { open } from "node:fs/promises";
import { pipeline, type Readable, Transform, type TransformCallback } from "node:stream";
import { createGunzip } from "node:zlib";
import { extract, type Header } from "tar-stream";
import { DecompressStream } from "zstd-napi";
import { Code, StatusError } from "../status/status.js";

export type LayerCompression = "none" | "gzip" | "zstd";

const GZIP_MAGIC = Buffer.from([0x1f, 0x8b]);
const ZSTD_MAGIC = Buffer.from([0x28, 0xb5, 0x2f, 0xfd]);
const CHUNK = 256 * 1024;
/** Room for tar headers and padding on top of file data when capping the decompressed stream. */
const TAR_OVERHEAD_PER_ENTRY = 2048;
/**
 * Tar entries resolve as microtasks, so a run of small files handled
 * synchronously would hold the event loop (measured: 40 ms stretches) without this.
 */
const YIELD_EVERY_MS = 5;

/**
 * The compression a layer media type announces (OCI and Docker types,
 * distributable or not), or an error for types that are not tar layers.
 */
export function layerCompression(mediaType: string): LayerCompression {
  const type = mediaType.split(";")[0]?.trim() ?? "";
  if (/^application\/vnd\.oci\.image\.layer\.(nondistributable\.)?v1\.tar$/.test(type)) return "none";
  if (/^application\/vnd\.oci\.image\.layer\.(nondistributable\.)?v1\.tar\+gzip$/.test(type)) return "gzip";
  if (/^application\/vnd\.oci\.image\.layer\.(nondistributable\.)?v1\.tar\+zstd$/.test(type)) return "zstd";
  if (/^application\/vnd\.docker\.image\.rootfs\.(foreign\.)?diff\.tar\.gzip$/.test(type)) return "gzip";
  if (type === "application/vnd.docker.image.rootfs.diff.tar") return "none";
  throw new StatusError(Code.INVALID_ARGUMENT, `unsupported layer media type ${JSON.stringify(mediaType)}`);
}

/**
 * The compression the blob's first bytes show. Some tools label plain tar
 * layers as gzip (and the reverse happens), so the bytes win over the label,
 * as in Docker: a tar starts with a file name, never with these bytes.
 */
export async function sniffCompression(path: string): Promise<LayerCompression> {
  const handle = await open(path, "r");
  try {
    const head = Buffer.alloc(4);
    const { bytesRead } = await handle.read(head, 0, 4, 0);
    if (bytesRead >= 2 && head.subarray(0, 2).equals(GZIP_MAGIC)) return "gzip";
    if (bytesRead >= 4 && head.equals(ZSTD_MAGIC)) return "zstd";
    return "none";
  } finally {
    await handle.close();
  }
}

/**
 * The decompressed tar stream of a layer blob, which fails past `maxBytes`
 * so that a compression bomb stops early whatever its tar headers claim.
 * `onError` receives failures of reading or decompressing, already
 * translated into StatusErrors when the data is at fault; `onRead` hears
 * how much of the blob file has been read.
 */
export function openTarStream(
  path: string,
  compression: LayerCompression,
  maxBytes: number,
  onError: (err: Error) => void,
  onRead?: (bytesRead: number) => void,
  overflow?: (maxBytes: number) => Error,
): Readable {
  const file = createReadStream(path, { highWaterMark: CHUNK });
  if (onRead) {
    // For progress bars: bytes of the blob file, not of the tar it decompresses to.
    let read = 0;
    file.on("data", (chunk: string | Buffer) => {
      read += chunk.length;
      onRead(read);
    });
  }
  const limit = new ByteLimit(maxBytes, overflow);
  const fail = (err: Error | null) => {
    if (err) onError(describe(err, compression));
  };
  if (compression === "gzip") return pipeline(file, createGunzip({ chunkSize: CHUNK }), limit, fail);
  if (compression === "zstd") return pipeline(file, new DecompressStream(), limit, fail);
  return pipeline(file, limit, fail);
}

class ByteLimit extends Transform {
  private seen = 0;

  constructor(
    private readonly maxBytes: number,
    private readonly overflow: (maxBytes: number) => Error = tarOverflow,
  ) {
    super();
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.seen += chunk.byteLength;
    if (this.seen > this.maxBytes) {
      callback(this.overflow(this.maxBytes));
      return;
    }
    callback(null, chunk);
  }
}

function tarOverflow(maxBytes: number): Error {
  return new StatusError(
    Code.FAILED_PRECONDITION,
    `layer decompresses to more than ${maxBytes} bytes of tar, past images.maxLayerBytes (with room for the headers of images.maxLayerEntries entries)`,
  );
}

function describe(err: Error, compression: LayerCompression): Error {
  if (err instanceof StatusError) return err;
  const e = err as NodeJS.ErrnoException;
  // Errors from the file itself (EIO, ENOENT…) carry a syscall; decompressors' do not.
  if (e.syscall !== undefined || e.code === "ERR_STREAM_PREMATURE_CLOSE") return err;
  return new StatusError(Code.INVALID_ARGUMENT, `layer blob is not valid ${compression} data: ${err.message}`);
}

/**
 * Hands every entry of a layer blob's tar to `onEntry`, in order, with its
 * data stream (drained afterwards if `onEntry` left it). The decompressed
 * stream is capped from `limits`; a damaged blob or tar is INVALID_ARGUMENT.
 * Both unpacking (mount mode) and expansion (expand mode) read layers here.
 */
export async function forEachTarEntry(
  blobPath: string,
  limits: { maxBytes: number; maxEntries: number; overflow?: (tarBytes: number) => Error },
  onEntry: (header: Header, data: AsyncIterable<unknown>) => Promise<void>,
  onRead?: (bytesRead: number) => void,
): Promise<void> {
  const compression = await sniffCompression(blobPath);
  let sourceError: Error | undefined;
  const tar = extract();
  const source = openTarStream(
    blobPath,
    compression,
    limits.maxBytes + limits.maxEntries * TAR_OVERHEAD_PER_ENTRY,
    (err) => {
      sourceError = err;
      tar.destroy(err);
    },
    onRead,
    limits.overflow,
  );
  source.pipe(tar);
  try {
    const entries = tar[Symbol.asyncIterator]();
    let yieldedAt = performance.now();
    for (;;) {
      const next = await entries.next().catch((err: Error) => {
        if (sourceError) throw sourceError;
        if (err instanceof StatusError) throw err;
        throw new StatusError(Code.INVALID_ARGUMENT, `layer blob is not a valid tar archive: ${err.message}`);
      });
      if (next.done) break;
      await onEntry(next.value.header, next.value);
      next.value.resume();
      if (performance.now() - yieldedAt > YIELD_EVERY_MS) {
        await new Promise(setImmediate);
        yieldedAt = performance.now();
      }
    }
  } finally {
    source.destroy();
    tar.destroy();
  }
}
