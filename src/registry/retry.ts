import { setTimeout as sleep } from "node:timers/promises";
import { RegistryError } from "./errors.js";

export interface RetryPolicy {
  /** Attempts in all, the first included; 1 disables retries. */
  readonly maxAttempts: number;
  /** Delay before the second attempt; it doubles for each further one. */
  readonly initialDelayMs: number;
  readonly maxDelayMs: number;
}

export const DEFAULT_RETRY: RetryPolicy = { maxAttempts: 4, initialDelayMs: 250, maxDelayMs: 4000 };

/** A failure worth another attempt: a network error, 429 or a 5xx. */
export class TransientFailure extends Error {
  override readonly name = "TransientFailure";
  constructor(
    /** Words for the final error, e.g. "registry 127.0.0.1:5000 answered HTTP 503". */
    readonly description: string,
    /** From `Retry-After`, when the server said how long to wait. */
    readonly retryAfterMs?: number,
    options?: { cause?: unknown },
  ) {
    super(description, options);
  }
}

/**
 * Runs `attempt` until it succeeds, throws something other than a
 * `TransientFailure`, or runs out of attempts (then an `unavailable` error).
 * Waiting stops at once when `signal` aborts.
 */
export async function withRetries<T>(
  policy: RetryPolicy,
  signal: AbortSignal,
  reference: string,
  attempt: () => Promise<T>,
): Promise<T> {
  const attempts = Math.max(1, Math.floor(policy.maxAttempts));
  for (let n = 1; ; n++) {
    try {
      return await attempt();
    } catch (err) {
      if (signal.aborted) throw err instanceof RegistryError ? err : abortedError(signal, reference, err);
      if (!(err instanceof TransientFailure)) throw err;
      if (n >= attempts) {
        const tries = attempts === 1 ? "1 attempt" : `${attempts} attempts`;
        throw new RegistryError("unavailable", reference, `${err.description} (gave up after ${tries})`, {
          cause: err,
        });
      }
      const backoff = Math.min(policy.maxDelayMs, policy.initialDelayMs * 2 ** (n - 1));
      // Jitter keeps many workers pulling the same image from retrying in lockstep.
      const delay = Math.min(policy.maxDelayMs, err.retryAfterMs ?? backoff * (0.5 + Math.random() / 2));
      try {
        await sleep(delay, undefined, { signal });
      } catch (sleepErr) {
        throw abortedError(signal, reference, sleepErr);
      }
    }
  }
}

/** A `Retry-After` header (seconds or an HTTP date) in milliseconds. */
export function parseRetryAfter(value: string | null, now = Date.now()): number | undefined {
  if (value === null || value.trim() === "") return undefined;
  const seconds = Number(value);
  if (Number.isFinite(seconds) && seconds >= 0) return seconds * 1000;
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

/** The pull was cancelled or ran out of time: the caller may try again later. */
export function abortedError(signal: AbortSignal, reference: string, cause: unknown): RegistryError {
  const reason: unknown = signal.reason;
  const words =
    reason instanceof Error && reason.name === "TimeoutError"
      ? reason.message
      : reason instanceof Error && reason.message !== ""
        ? `the pull was cancelled: ${reason.message}`
        : "the pull was cancelled";
  return new RegistryError("unavailable", reference, words, { cause });
}
