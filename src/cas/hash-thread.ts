import { getHashes } from "node:crypto";
import { Worker } from "node:worker_threads";

/** What hashing one file gave: its hash and size, or that it is gone. */
export type FileHash = { hash: string; size: number } | "ENOENT";

interface Answer {
  id: number;
  hash?: string;
  size?: number;
  error?: string;
  code?: string;
}

interface Pending {
  resolve: (answer: Answer) => void;
  reject: (err: Error) => void;
}

/**
 * The hash of a file being written, computed on the thread: it reads each
 * range from the file (the page cache, just written) once `advance` says the
 * writes up to there are done, so the event loop that receives the bytes
 * neither hashes nor copies them.
 */
export interface FollowedFileHash {
  /** The file's bytes before `upTo` are written (and stay as they are). */
  advance(upTo: number): void;
  /** Lowercase hex of the file's first `size` bytes; the hash is not used afterwards. */
  digestHex(size: number): Promise<string>;
  /** Forgets the hash and closes the thread's descriptor (an upload given up). */
  drop(): void;
}

/**
 * Hashes files on a thread of its own, in a tight loop of synchronous reads
 * (as `openssl dgst` does), off the event loop: whole files one after the
 * other, for the background check of blob files found at start; and files
 * being written, range by range, for large uploads and downloads. One thread
 * at most, started at first use; it does not keep the process alive.
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
  async hashFile(path: string, algorithm: string, expected: number): Promise<FileHash> {
    try {
      const answer = await this.call({ op: "file", path, algorithm, expected });
      return { hash: answer.hash as string, size: answer.size as number };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return "ENOENT";
      throw err;
    }
  }

  /** A hash (of an `algorithm` HashThread.supports) of the file at `path`, which is being written. */
  followFile(path: string, algorithm: string): FollowedFileHash {
    const stream = this.nextId++;
    // One thread gets its messages in order, so nothing waits for an answer before the digest; the first
    // failure is kept and thrown by digestHex.
    let failure: unknown;
    const send = (message: Record<string, unknown>) => {
      this.call({ ...message, stream }).catch((err: unknown) => {
        failure ??= err;
      });
    };
    let advancedTo = 0;
    send({ op: "follow", path, algorithm });
    return {
      advance: (upTo) => {
        if (upTo <= advancedTo) return;
        advancedTo = upTo;
        send({ op: "advance", upTo });
      },
      digestHex: async (size) => {
        if (size > advancedTo) send({ op: "advance", upTo: size });
        const answer = await this.call({ op: "finish", stream });
        if (failure !== undefined) throw failure;
        return answer.hash as string;
      },
      drop: () => send({ op: "drop" }),
    };
  }

  private call(message: Record<string, unknown>): Promise<Answer> {
    const worker = this.start();
    const id = this.nextId++;
    return new Promise<Answer>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.postMessage({ ...message, id });
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
    worker.on("message", (answer: Answer) => {
      const pending = this.pending.get(answer.id);
      if (!pending) return;
      this.pending.delete(answer.id);
      if (answer.error === undefined) pending.resolve(answer);
      else pending.reject(Object.assign(new Error(answer.error), { code: answer.code }));
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
