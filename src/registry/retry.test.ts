import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { RegistryError } from "./errors.js";
import { parseRetryAfter, TransientFailure, withRetries } from "./retry.js";

const POLICY = { maxAttempts: 3, initialDelayMs: 1, maxDelayMs: 5 };

describe("retries", () => {
  it("retries transient failures a bounded number of times, then reports unavailable", async () => {
    let attempts = 0;
    await assert.rejects(
      withRetries(POLICY, new AbortController().signal, "reg/img:1", async () => {
        attempts++;
        throw new TransientFailure("reg answered HTTP 503");
      }),
      (err: unknown) => {
        assert.ok(err instanceof RegistryError);
        assert.equal(err.kind, "unavailable");
        assert.equal(err.message, "image reg/img:1: reg answered HTTP 503 (gave up after 3 attempts)");
        return true;
      },
    );
    assert.equal(attempts, 3);
  });

  it("does not retry other errors, and succeeds once an attempt does", async () => {
    let attempts = 0;
    const permanent = new RegistryError("not-found", "r", "gone");
    await assert.rejects(
      withRetries(POLICY, new AbortController().signal, "r", async () => {
        attempts++;
        throw permanent;
      }),
      (err: unknown) => err === permanent,
    );
    assert.equal(attempts, 1);
    let tries = 0;
    const value = await withRetries(POLICY, new AbortController().signal, "r", async () => {
      if (++tries < 3) throw new TransientFailure("flaky");
      return "ok";
    });
    assert.equal(value, "ok");
  });

  it("reads Retry-After in seconds or as a date", () => {
    assert.equal(parseRetryAfter("2"), 2000);
    assert.equal(parseRetryAfter(new Date(10_000).toUTCString(), 4_000), 6000);
    assert.equal(parseRetryAfter(null), undefined);
    assert.equal(parseRetryAfter("soon"), undefined);
  });
});
