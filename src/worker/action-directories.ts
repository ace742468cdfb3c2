import { randomUUID } from "node:crypto";
import { rmSync } from "node:fs";
import { chown, mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import type { TreeOwner } from "./input-root.js";

/** The action's input root, below its directory. */
export const INPUT_ROOT_NAME = "root";

/**
 * A slot's action directories, each made before the action that gets it
 * arrives: `<parent>/<uuid>` with an empty input root (INPUT_ROOT_NAME) given
 * to the slot's user. Making two directories took a few tenths of a
 * millisecond of every action's path on a file system whose allocation is
 * slow (this machine's ext4 /tmp: 0.2 to 0.4 ms each, against 0.03 ms on
 * another directory of the same disk). Each directory goes to one action
 * only, and is removed with it.
 */
export class ActionDirectories {
  #next: Promise<string> | undefined;
  #closed = false;

  constructor(
    private readonly parent: string,
    private readonly owner: TreeOwner | undefined,
  ) {}

  /** The directory the next action will get (made now if none is ready). */
  next(): Promise<string> {
    this.#next ??= this.#make();
    return this.#next;
  }

  /**
   * A directory for the action at hand, no other's (handed out before any wait, so two takes never share
   * one); the next one is made once `prepareNext` is called.
   */
  take(): Promise<string> {
    const directory = this.next();
    this.#next = undefined;
    return directory;
  }

  /** Makes the next directory, off the path of the action that took the last (called once it is answered). */
  prepareNext(): void {
    if (this.#closed) return;
    const next = this.next();
    next.catch(() => {
      // Made again when taken; the error is the taker's then.
      if (this.#next === next) this.#next = undefined;
    });
  }

  /** Removes the directory made for no action yet. */
  async close(): Promise<void> {
    this.#closed = true;
    const next = this.#next;
    this.#next = undefined;
    const directory = await next?.catch(() => undefined);
    if (directory) rmSync(directory, { recursive: true, force: true });
  }

  /** A new directory (never one that was there: mkdir fails on EEXIST), removed again if it cannot be finished. */
  async #make(): Promise<string> {
    await mkdir(this.parent, { recursive: true });
    const directory = join(this.parent, randomUUID());
    await mkdir(directory, { mode: 0o755 });
    try {
      const inputRoot = join(directory, INPUT_ROOT_NAME);
      await mkdir(inputRoot, { mode: 0o755 });
      if (this.owner) await chown(inputRoot, this.owner.uid, this.owner.gid);
    } catch (err) {
      await rm(directory, { recursive: true, force: true });
      throw err;
    }
    return directory;
  }
}
