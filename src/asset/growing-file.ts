import { type FileHandle, open } from "node:fs/promises";
import type { CurlTransfer } from "./curl-transfer.js";

/** Bytes read at a time: one read and one hash update per megabyte while curl writes. */
const READ_BYTES = 1024 * 1024;
/**
 * How long to wait for more when the reader has caught up with curl: short while bytes flow (what is left to
 * hash when curl exits is at most a few milliseconds' worth), longer once nothing came for a while (an origin
 * that hangs costs a read every 50 ms, not hundreds a second).
 */
const FIRST_WAIT_MS = 1;
const FLOWING_WAIT_MS = 4;
const IDLE_WAIT_MS = 50;
const IDLE_AFTER_MS = 250;

/**
 * Reads the file curl is writing from its start as it grows, giving every
 * piece to `take` (which must be done with it when it returns: the buffer
 * is reused), until curl has exited and the end of the file is reached.
 * The bytes are read from the page cache right after curl wrote them, so
 * the body is hashed while it downloads. Returns the file's length; throws
 * curl's failure, or the signal's reason once it aborts (the caller kills
 * curl on it).
 */
export async function readGrowingFile(
  path: string,
  transfer: CurlTransfer,
  take: (chunk: Buffer) => void,
  signal: AbortSignal,
): Promise<number> {
  const handle = await openWhenCreated(path, transfer, signal);
  if (!handle) return 0;
  const buffer = Buffer.allocUnsafe(READ_BYTES);
  let position = 0;
  let wait = FIRST_WAIT_MS;
  let lastBytesAt = Date.now();
  try {
    for (;;) {
      if (signal.aborted) throw signal.reason;
      // Checked before the read: once curl has exited, a read that finds nothing more is the end.
      const finished = !transfer.running;
      if (finished) await transfer.done;
      const { bytesRead } = await handle.read(buffer, 0, READ_BYTES, position);
      if (bytesRead > 0) {
        take(buffer.subarray(0, bytesRead));
        position += bytesRead;
        wait = FIRST_WAIT_MS;
        lastBytesAt = Date.now();
        continue;
      }
      if (finished) return position;
      await Promise.race([delay(wait), transfer.done.catch(() => {})]);
      wait = Math.min(wait * 2, Date.now() - lastBytesAt < IDLE_AFTER_MS ? FLOWING_WAIT_MS : IDLE_WAIT_MS);
    }
  } finally {
    await handle.close();
  }
}

/** The file once curl has created it (at the body's first bytes); undefined when curl ended without creating it. */
async function openWhenCreated(
  path: string,
  transfer: CurlTransfer,
  signal: AbortSignal,
): Promise<FileHandle | undefined> {
  let wait = FIRST_WAIT_MS;
  for (;;) {
    if (signal.aborted) throw signal.reason;
    const finished = !transfer.running;
    if (finished) await transfer.done;
    try {
      return await open(path, "r");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    }
    if (finished) return undefined;
    await Promise.race([delay(wait), transfer.done.catch(() => {})]);
    wait = Math.min(wait * 2, IDLE_WAIT_MS);
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
