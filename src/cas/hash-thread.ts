import { getHashes } from "node:crypto";
import { Worker } from "node:worker_threads";

/** What hashing one file gave: its hash and size, or that it is gone. */
export type FileHash = { hash: string; size: number } | "ENOENT";

interface Pending {
  resolve: (result: FileHash) => void;
  reject: (err: Error) => void;
}

/**
 * Hashes files on a thread of its own, one after the other in a tight loop
 * of synchronous reads (as `openssl dgst` does): for the background check of
 * blob files found at start, which would otherwise hash on the event loop,
 * between requests. One thread at most, started at first use; it does not
 * keep the process alive.
 */
export class HashThread {
  private worker: Worker | undefined;
  private readonly pending = new Map<number, Pending>();
  private nextId = 0;

  /** Whether the thread can compute `algorithm` (Node's own hashes: not BLAKE3). */
  static supports(algorithm: string): boolean {
    return getHashes().includes(algorithm);
  }

  /** The `algorithm` hash of the file at `path`, reading at most one chunk past `expected` bytes. */
  hashFile(path: string, algorithm: string, expected: number): Promise<FileHash> {
    const worker = this.start();
    const id = this.nextId++;
    return new Promise<FileHash>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.postMessage({ id, path, algorithm, expected });
    });
  }

  /** Stops the thread; files being hashed are reported as failures. */
  async close(): Promise<void> {
    const worker = this.worker;
    this.worker = undefined;
    if (worker) await worker.terminate();
    this.failAll(new Error("the hash thread was stopped"));
  }

  private start(): Worker {
    if (this.worker) return this.worker;
    const worker = new Worker(new URL("./hash-thread-main.js", import.meta.url));
    worker.unref();
    worker.on("message", (message: { id: number; hash?: string; size?: number; error?: string; code?: string }) => {
      const pending = this.pending.get(message.id);
      if (!pending) return;
      this.pending.delete(message.id);
      if (message.code === "ENOENT") pending.resolve("ENOENT");
      else if (message.error !== undefined) pending.reject(new Error(message.error));
      else pending.resolve({ hash: message.hash as string, size: message.size as number });
    });
    worker.on("error", (err) => {
      if (this.worker === worker) this.worker = undefined;
      this.failAll(err);
    });
    worker.on("exit", () => {
      if (this.worker === worker) this.worker = undefined;
      this.failAll(new Error("the hash thread exited"));
    });
    this.worker = worker;
    return worker;
  }

  private failAll(err: Error): void {
    for (const pending of this.pending.values()) pending.reject(err);
    this.pending.clear();
  }
}
