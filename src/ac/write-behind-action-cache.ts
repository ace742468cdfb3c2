import { type Digest, digestKey } from "../digest/digest.js";
import type { ActionResult } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { ActionCache } from "./action-cache.js";

/**
 * Takes a result at once and writes it to the inner cache in the background.
 * Storing a result costs several file operations, and Execute's caller would
 * otherwise wait for them before hearing that its action completed. Until a
 * write has finished the result is answered from memory, so whoever asks
 * right after the put (GetActionResult, the next Execute) still finds it. A
 * write that fails only loses the entry: the action would run again.
 */
export class WriteBehindActionCache implements ActionCache {
  readonly #pending = new Map<string, { result: ActionResult; written: Promise<void> }>();

  constructor(
    private readonly inner: ActionCache,
    private readonly onWriteFailed?: (actionDigest: Digest, error: Error) => void,
  ) {}

  async get(instanceName: string, actionDigest: Digest): Promise<ActionResult | undefined> {
    const pending = this.#pending.get(key(instanceName, actionDigest));
    return pending ? pending.result : this.inner.get(instanceName, actionDigest);
  }

  async put(instanceName: string, actionDigest: Digest, result: ActionResult): Promise<void> {
    const k = key(instanceName, actionDigest);
    // A later put of the same action waits for the earlier write, so the files end with the latest result.
    const before = this.#pending.get(k)?.written ?? Promise.resolve();
    const written = before
      .then(() => this.inner.put(instanceName, actionDigest, result))
      .catch((err: unknown) => this.onWriteFailed?.(actionDigest, err as Error))
      .finally(() => {
        if (this.#pending.get(k)?.written === written) this.#pending.delete(k);
      });
    this.#pending.set(k, { result, written });
  }

  /** Resolves once every write begun so far has finished. */
  async flush(): Promise<void> {
    while (this.#pending.size > 0) await Promise.all([...this.#pending.values()].map((p) => p.written));
  }
}

function key(instanceName: string, actionDigest: Digest): string {
  return `${instanceName}\0${digestKey(actionDigest)}`;
}
