import { chmod, lstat, mkdir, readdir } from "node:fs/promises";
import { join } from "node:path";

/**
 * Creates `dir` (and its parents) when absent and makes it reachable by its
 * owner only (0700), whatever its parent allows; a directory an earlier
 * version left open (0755) is closed too, with the directories directly in
 * it. Everything below is then out of reach of other local users and of
 * actions (which see the host's file system as an unprivileged user),
 * whatever the modes further down.
 */
export async function openPrivateDir(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    if (!entry.isDirectory()) continue;
    const path = join(dir, entry.name);
    const { mode } = await lstat(path);
    if ((mode & 0o077) !== 0) await chmod(path, mode & 0o7700);
  }
}

/**
 * The umask of the server process: what it creates (blobs, the log, action
 * results, secrets) is its own user's alone, even outside a private directory.
 */
export const SERVER_UMASK = 0o077;

/**
 * The umask of a worker process. Not 077: image layers, overlay upper
 * directories and mount points are made with modes the action's
 * unprivileged user must traverse, and the action itself inherits it. Its
 * work directory is private (openPrivateDir), which keeps others out of
 * everything below it; the action reaches its inputs through mounts root makes.
 */
export const WORKER_UMASK = 0o022;
