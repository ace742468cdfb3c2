import { CompressStream, compress, DecompressStream } from "zstd-napi";
import { Code, StatusError } from "../status/status.js";

/** Level 1: blobs are compressed on the fly per request, so speed beats ratio. */
const LEVEL = 1;

export function zstdCompress(data: Uint8Array): Buffer {
  return compress(data, { compressionLevel: LEVEL });
}

export function zstdCompressStream(): CompressStream {
  return new CompressStream({ compressionLevel: LEVEL });
}

export function zstdDecompressStream(): DecompressStream {
  return new DecompressStream();
}

/**
 * Decompresses data a client sent, refusing to produce more than
 * `expectedSize` bytes: the frame's own size field is not trusted.
 */
export async function zstdDecompressBounded(data: Uint8Array, expectedSize: number, field: string): Promise<Buffer> {
  const stream = new DecompressStream();
  const chunks: Buffer[] = [];
  let total = 0;
  const done = new Promise<void>((resolve, reject) => {
    stream.on("data", (chunk: Buffer) => {
      total += chunk.byteLength;
      if (total > expectedSize) {
        stream.destroy(tooLarge(field, expectedSize));
        return;
      }
      chunks.push(chunk);
    });
    stream.on("end", resolve);
    stream.on("error", (err) =>
      reject(
        err instanceof StatusError
          ? err
          : new StatusError(Code.INVALID_ARGUMENT, `${field}: not valid zstd data: ${err.message}`),
      ),
    );
  });
  stream.end(data);
  await done;
  return Buffer.concat(chunks, total);
}

function tooLarge(field: string, expectedSize: number): StatusError {
  return new StatusError(
    Code.INVALID_ARGUMENT,
    `${field}: decompresses to more than the ${expectedSize} bytes its digest names`,
  );
}
