import { createHash } from "node:crypto";
import type { Digest } from "../src/digest/digest.js";
import { SHA256 } from "../src/digest/functions.js";
import type { Clients } from "../test/support/farm.js";

/** What every benchmark gets. */
export interface BenchContext {
  clients: Clients;
  serverPid: number | undefined;
  /** Scratch directory on the same disk as the server's data directory. */
  scratchDir: string;
  rounds: number;
  log(message: string): void;
  /** Registers work for the end of the run (also after a failure or an interrupt), newest first. */
  defer(cleanup: () => Promise<void>): void;
}

export function sha256Digest(data: Uint8Array): Digest {
  return { fn: SHA256, hash: createHash("sha256").update(data).digest("hex"), sizeBytes: data.byteLength };
}

export function wire(digest: Digest): { hash: string; sizeBytes: number } {
  return { hash: digest.hash, sizeBytes: digest.sizeBytes };
}
