import { utimes } from "node:fs/promises";

/** How long a use may go unrecorded on disk; the in-memory order is always exact. */
const MTIME_RESOLUTION_MS = 60_000;

/**
 * Records a use of an on-disk entry in the mtime of `path`, which orders the
 * entries again after a restart (PinnedLru.restore): at most once a minute
 * per entry, since a utimes per read would cost more than the read.
 * `stamp.usedAt` is the time last written (ms since the epoch).
 */
export function stampUse(stamp: { usedAt: number }, path: string, onFailure: () => void = () => {}): void {
  const now = Date.now();
  if (now - stamp.usedAt <= MTIME_RESOLUTION_MS) return;
  stamp.usedAt = now;
  const at = new Date(now);
  utimes(path, at, at).catch(onFailure);
}
