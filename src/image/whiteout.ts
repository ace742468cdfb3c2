import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { link, lstat, rename, rm } from "node:fs/promises";
import { promisify } from "node:util";
import { Code, StatusError } from "../status/status.js";

const run = promisify(execFile);

/** Paths per setfattr run: far below ARG_MAX even for long paths. */
const SETFATTR_BATCH = 256;

/**
 * Writes overlayfs whiteouts (character devices 0/0). Node has no mknod, and
 * running mknod(1) per whiteout costs a process each; instead one device is
 * made per store and every whiteout is a hard link to it, which overlayfs
 * treats the same (it shares one whiteout inode this way itself). The
 * template must be on the same filesystem as the layers.
 */
export class WhiteoutMaker {
  private ready: Promise<void> | undefined;

  constructor(readonly templatePath: string) {}

  async create(path: string): Promise<void> {
    this.ready ??= this.makeTemplate(false);
    await this.ready;
    try {
      await link(this.templatePath, path);
    } catch (err) {
      // ext4 allows 65000 links per inode: start a new template when one is full.
      if ((err as NodeJS.ErrnoException).code !== "EMLINK") throw err;
      this.ready = this.makeTemplate(true);
      await this.ready;
      await link(this.templatePath, path);
    }
  }

  private async makeTemplate(replace: boolean): Promise<void> {
    if (!replace) {
      const info = await lstat(this.templatePath).catch(() => undefined);
      if (info?.isCharacterDevice() && info.rdev === 0) return;
    }
    const temp = `${this.templatePath}.${randomBytes(6).toString("hex")}`;
    try {
      await run("mknod", ["-m", "0", temp, "c", "0", "0"]);
      await rename(temp, this.templatePath);
    } catch (err) {
      await rm(temp, { force: true });
      this.ready = undefined;
      throw new StatusError(Code.INTERNAL, `cannot create the whiteout device ${temp}: ${(err as Error).message}`);
    }
  }
}

/**
 * Marks directories opaque for overlayfs (xattr trusted.overlay.opaque=y).
 * Node cannot set xattrs, so this runs setfattr (Debian package `attr`),
 * once per batch of directories. `-h` keeps it from following a symlink;
 * callers pass only paths they checked are directories.
 */
export async function markOpaque(dirs: readonly string[]): Promise<void> {
  for (let i = 0; i < dirs.length; i += SETFATTR_BATCH) {
    const batch = dirs.slice(i, i + SETFATTR_BATCH);
    try {
      await run("setfattr", ["-h", "-n", "trusted.overlay.opaque", "-v", "y", "--", ...batch]);
    } catch (err) {
      const e = err as NodeJS.ErrnoException & { stderr?: string };
      const why = e.code === "ENOENT" ? "setfattr is not installed (Debian package attr)" : (e.stderr ?? e.message);
      throw new StatusError(Code.INTERNAL, `cannot mark opaque directories: ${why.trim()}`);
    }
  }
}
