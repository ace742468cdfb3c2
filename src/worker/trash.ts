import { randomUUID } from "node:crypto";
import { mkdir, readdir, rename } from "node:fs/promises";
import { join } from "node:path";
import { sharedLauncher } from "../process/launcher.js";

/**
 * Where finished actions' directories go to be deleted. Removing a tree
 * from Node.js costs a thread-pool round trip and some JavaScript per entry,
 * on the thread that also runs the next action; instead each directory is
 * renamed in here (one call) and batches are removed by one `rm -rf` at a
 * time in the background, started through the launcher so that this
 * process is not forked for it.
 */
export class Trash {
  private pending: string[] = [];
  private running: Promise<void> | undefined;

  private constructor(private readonly dir: string) {}

  /** Opens the trash in `dir`, scheduling whatever an earlier run left there for removal. */
  static async open(dir: string): Promise<Trash> {
    await mkdir(dir, { recursive: true });
    const trash = new Trash(dir);
    const leftovers = await readdir(dir);
    if (leftovers.length > 0) trash.schedule(leftovers.map((name) => join(dir, name)));
    return trash;
  }

  /** Moves `path` (on the same file system) out of the way and deletes it soon. */
  async discard(path: string): Promise<void> {
    const target = join(this.dir, randomUUID());
    try {
      await rename(path, target);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return;
      throw err;
    }
    this.schedule([target]);
  }

  /** Resolves once everything discarded so far is gone. */
  async drain(): Promise<void> {
    while (this.running) await this.running;
  }

  private schedule(paths: string[]): void {
    this.pending.push(...paths);
    if (!this.running) this.running = this.removeAll();
  }

  private async removeAll(): Promise<void> {
    while (this.pending.length > 0) {
      const batch = this.pending;
      this.pending = [];
      await sharedLauncher()
        .launch({
          argv: ["rm", "-rf", "--", ...batch],
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
    this.running = undefined;
  }
}
