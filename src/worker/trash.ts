import { randomUUID } from "node:crypto";
import { mkdir, readdir, rename } from "node:fs/promises";
import { join } from "node:path";
import { sharedLauncher } from "../process/launcher.js";

export interface TrashOptions {
  /** How long no action may run before removal starts. */
  idleMs: number;
  /** Past this many directories waiting, removal runs even while actions do. */
  maxPendingDirectories: number;
  /** Past this many bytes waiting (as the callers estimate them), likewise. */
  maxPendingBytes: number;
  /** Directories one `rm -rf` removes; idleness is checked again between batches. */
  batchSize: number;
}

export const DEFAULT_TRASH_OPTIONS: TrashOptions = {
  idleMs: 500,
  maxPendingDirectories: 10_000,
  maxPendingBytes: 1024 ** 3,
  batchSize: 500,
};

/**
 * Where finished actions' directories go to be deleted, and deleted mostly
 * while the worker is idle.
 *
 * Removing a tree from Node.js costs a thread-pool round trip and some
 * JavaScript per entry on the thread that runs the next action; instead each
 * directory is renamed in here (one call) and removed by `rm -rf`, started
 * through the launcher so that this process is not forked for it.
 *
 * Why wait for idleness: deleting thousands of small directories during a
 * build slows the file creations of the build itself. On ext4, every inode
 * freed stays "recently deleted" for a minute or more, and allocating the
 * next inode scans past those (measured here: a mkdir went from about 20 µs
 * to 400 µs while action directories were being removed, and half the
 * worker's CPU time was that scan). Bazel defers its own sandbox deletion for
 * the same reason (--experimental_sandbox_async_tree_delete_idle_threads).
 * The caps bound the disk a long build's backlog may hold.
 */
export class Trash {
  private pending: { path: string; bytes: number }[] = [];
  private pendingBytes = 0;
  private running: Promise<void> | undefined;
  private busy = 0;
  private idleTimer: NodeJS.Timeout | undefined;
  private draining = false;

  private constructor(
    private readonly dir: string,
    private readonly options: TrashOptions,
  ) {}

  /** Opens the trash in `dir`, scheduling whatever an earlier run left there for removal. */
  static async open(dir: string, options: TrashOptions = DEFAULT_TRASH_OPTIONS): Promise<Trash> {
    await mkdir(dir, { recursive: true });
    const trash = new Trash(dir, options);
    const leftovers = await readdir(dir);
    for (const name of leftovers) trash.schedule(join(dir, name), 0);
    return trash;
  }

  /** Directories waiting to be removed. */
  get pendingCount(): number {
    return this.pending.length;
  }

  /** Marks an action as running until the returned function is called; removal waits for none to run. */
  hold(): () => void {
    this.busy++;
    clearTimeout(this.idleTimer);
    this.idleTimer = undefined;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.busy--;
      this.consider();
    };
  }

  /**
   * Moves `path` (on the same file system) out of the way and deletes it
   * later; `bytes` is what it holds beyond hard links (outputs, logs), for
   * the backlog's cap.
   */
  async discard(path: string, bytes = 0): Promise<void> {
    const target = join(this.dir, randomUUID());
    try {
      await rename(path, target);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return;
      throw err;
    }
    this.schedule(target, bytes);
  }

  /** Removes everything discarded so far, busy or not; resolves once it is gone. */
  async drain(): Promise<void> {
    this.draining = true;
    try {
      this.consider();
      while (this.running) await this.running;
    } finally {
      this.draining = false;
    }
  }

  private schedule(path: string, bytes: number): void {
    this.pending.push({ path, bytes });
    this.pendingBytes += bytes;
    this.consider();
  }

  private overCap(): boolean {
    return this.pending.length > this.options.maxPendingDirectories || this.pendingBytes > this.options.maxPendingBytes;
  }

  /** Starts removing now, after the idle delay, or not yet. */
  private consider(): void {
    if (this.running || this.pending.length === 0) return;
    if (this.draining || this.overCap()) {
      this.start();
      return;
    }
    if (this.busy > 0 || this.idleTimer) return;
    this.idleTimer = setTimeout(() => {
      this.idleTimer = undefined;
      if (this.busy === 0) this.start();
    }, this.options.idleMs);
    this.idleTimer.unref();
  }

  private start(): void {
    this.running = this.removeAll().finally(() => {
      this.running = undefined;
      this.consider();
    });
  }

  private async removeAll(): Promise<void> {
    while (this.pending.length > 0 && (this.draining || this.busy === 0 || this.overCap())) {
      const batch = this.pending.splice(0, this.options.batchSize);
      for (const { bytes } of batch) this.pendingBytes -= bytes;
      await sharedLauncher()
        .launch({
          argv: ["rm", "-rf", "--", ...batch.map((entry) => entry.path)],
          env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
          stdoutPath: "/dev/null",
          stderrPath: "/dev/null",
          fd3Path: "/dev/null",
          steps: [],
        })
        .then((removal) => removal.exited)
        // What could not be removed now is removed with the leftovers when the worker next starts.
        .catch(() => {});
    }
  }
}
