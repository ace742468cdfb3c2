import { createHash, type Hash } from "node:crypto";
import { closeSync, openSync, readSync } from "node:fs";
import { parentPort } from "node:worker_threads";

/**
 * The body of HashThread's thread: hashes a whole file per message, or
 * follows a file being written, hashing each range once the writer says it
 * is there; synchronously, and answers each message.
 */
const CHUNK_BYTES = 1024 * 1024;
const buffer = Buffer.allocUnsafe(CHUNK_BYTES);

type Request =
  | { op: "file"; id: number; path: string; algorithm: string; expected: number }
  | { op: "follow"; id: number; stream: number; path: string; algorithm: string }
  | { op: "advance"; id: number; stream: number; upTo: number }
  | { op: "finish"; id: number; stream: number }
  | { op: "drop"; id: number; stream: number };

/** Files being followed, by stream id: the open file, its hash, and how far it is hashed. */
const followed = new Map<number, { fd: number; hash: Hash; offset: number }>();

function hashFile(path: string, algorithm: string, expected: number): { hash: string; size: number } {
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

/** Hashes the followed file from where it is up to `upTo`. */
function advance(stream: number, upTo: number): void {
  const file = followed.get(stream);
  if (!file) throw new Error("no such stream");
  while (file.offset < upTo) {
    const bytesRead = readSync(file.fd, buffer, 0, Math.min(CHUNK_BYTES, upTo - file.offset), file.offset);
    if (bytesRead === 0) throw new Error(`the file ends at ${file.offset} bytes, before ${upTo}`);
    file.hash.update(buffer.subarray(0, bytesRead));
    file.offset += bytesRead;
  }
}

function stopFollowing(stream: number): { hash: Hash } | undefined {
  const file = followed.get(stream);
  followed.delete(stream);
  if (file) closeSync(file.fd);
  return file;
}

function handle(request: Request): object {
  switch (request.op) {
    case "file":
      return hashFile(request.path, request.algorithm, request.expected);
    case "follow":
      followed.set(request.stream, { fd: openSync(request.path, "r"), hash: createHash(request.algorithm), offset: 0 });
      return {};
    case "advance":
      advance(request.stream, request.upTo);
      return {};
    case "finish": {
      const file = stopFollowing(request.stream);
      if (!file) throw new Error("no such stream");
      return { hash: file.hash.digest("hex") };
    }
    case "drop":
      stopFollowing(request.stream);
      return {};
  }
}

parentPort?.on("message", (request: Request) => {
  try {
    parentPort?.postMessage({ id: request.id, ...handle(request) });
  } catch (err) {
    const { code, message } = err as NodeJS.ErrnoException;
    parentPort?.postMessage({ id: request.id, error: message, code });
  }
});
