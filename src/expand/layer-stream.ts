import { createReadStream } from "node:fs";
import { pipeline, type Readable, Transform, type TransformCallback } from "node:stream";
import { createGunzip } from "node:zlib";
import { DecompressStream } from "zstd-napi";
import type { LayerCompression } from "../image/layer-source.js";
import { Code, StatusError } from "../status/status.js";

const CHUNK = 256 * 1024;

/**
 * The decompressed tar stream of a layer blob, as `openTarStream` of
 * src/image/layer-source.ts makes it (same cap, same errors), and also
 * reporting how many bytes of the blob file have been read: that function
 * keeps its file stream to itself, and a progress bar needs the count.
 */
export function openCountedTarStream(
  path: string,
  compression: LayerCompression,
  maxBytes: number,
  onError: (err: Error) => void,
  onRead: ((bytesRead: number) => void) | undefined,
): Readable {
  const file = createReadStream(path, { highWaterMark: CHUNK });
  if (onRead) {
    let read = 0;
    file.on("data", (chunk: string | Buffer) => {
      read += chunk.length;
      onRead(read);
    });
  }
  const limit = new DecompressedByteLimit(maxBytes);
  const fail = (err: Error | null) => {
    if (err) onError(describe(err, compression));
  };
  if (compression === "gzip") return pipeline(file, createGunzip({ chunkSize: CHUNK }), limit, fail);
  if (compression === "zstd") return pipeline(file, new DecompressStream(), limit, fail);
  return pipeline(file, limit, fail);
}

/** Stops a compression bomb early, whatever its tar headers claim. */
class DecompressedByteLimit extends Transform {
  private seen = 0;

  constructor(private readonly maxBytes: number) {
    super();
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.seen += chunk.byteLength;
    if (this.seen > this.maxBytes) {
      callback(
        new StatusError(
          Code.RESOURCE_EXHAUSTED,
          `layer decompresses to more than ${this.maxBytes} bytes of tar, past the unpack limit`,
        ),
      );
      return;
    }
    callback(null, chunk);
  }
}

function describe(err: Error, compression: LayerCompression): Error {
  if (err instanceof StatusError) return err;
  const e = err as NodeJS.ErrnoException;
  // Failures of the file itself (EIO, ENOENT…) carry a syscall; the decompressors' never do.
  if (e.syscall !== undefined || e.code === "ERR_STREAM_PREMATURE_CLOSE") return err;
  return new StatusError(Code.INVALID_ARGUMENT, `layer blob is not valid ${compression} data: ${err.message}`);
}
