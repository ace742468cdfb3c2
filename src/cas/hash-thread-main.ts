import { createHash } from "node:crypto";
import { closeSync, openSync, readSync } from "node:fs";
import { parentPort } from "node:worker_threads";

/** The body of HashThread's thread: hashes one file per message, synchronously, and answers. */
const CHUNK_BYTES = 1024 * 1024;
const buffer = Buffer.allocUnsafe(CHUNK_BYTES);

interface Request {
  id: number;
  path: string;
  algorithm: string;
  expected: number;
}

function hashFile({ path, algorithm, expected }: Request): { hash: string; size: number } {
  const hash = createHash(algorithm);
  const fd = openSync(path, "r");
  let size = 0;
  try {
    for (;;) {
      const bytesRead = readSync(fd, buffer, 0, CHUNK_BYTES, size);
      if (bytesRead === 0) break;
      size += bytesRead;
      hash.update(buffer.subarray(0, bytesRead));
      // Past the size the name says: wrong anyway, no need to read it all.
      if (size > expected) break;
    }
  } finally {
    closeSync(fd);
  }
  return { hash: hash.digest("hex"), size };
}

parentPort?.on("message", (request: Request) => {
  try {
    parentPort?.postMessage({ id: request.id, ...hashFile(request) });
  } catch (err) {
    const { code, message } = err as NodeJS.ErrnoException;
    parentPort?.postMessage({ id: request.id, error: message, code });
  }
});
