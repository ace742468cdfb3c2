import assert from "node:assert/strict";
import { test } from "node:test";
import { ConfigError, parseConfig } from "../config/config.js";
import { persistentWorkerLimits } from "./configured-limits.js";
import { DEFAULT_FLAGFILE_LIMITS } from "./persistent-action.js";
import { DEFAULT_WORKER_POOL_LIMITS } from "./worker-pool.js";

test("worker.persistentWorkers: the defaults, and the pool's limits from the configured values", () => {
  const defaults = persistentWorkerLimits(parseConfig({}).worker.persistentWorkers);
  assert.deepEqual(defaults, { pool: DEFAULT_WORKER_POOL_LIMITS, flagfiles: DEFAULT_FLAGFILE_LIMITS });
  const section = {
    maxProcessesPerKey: 1,
    maxProcesses: 3,
    idleSeconds: 2.5,
    maxResponseBytes: "1MiB",
    maxFlagfileBytes: 4096,
  };
  assert.deepEqual(
    persistentWorkerLimits(parseConfig({ worker: { persistentWorkers: section } }).worker.persistentWorkers),
    {
      pool: { maxProcessesPerKey: 1, maxProcesses: 3, idleTimeoutMs: 2500, maxResponseBytes: 1024 * 1024 },
      flagfiles: { maxBytes: 4096, maxDepth: DEFAULT_FLAGFILE_LIMITS.maxDepth },
    },
  );
});

test("worker.persistentWorkers: a cap of 0 and an unknown key are refused, naming the key", () => {
  for (const [section, message] of [
    [{ maxProcesses: 0 }, /worker\.persistentWorkers\.maxProcesses/],
    [{ maxProcess: 4 }, /worker\.persistentWorkers: .*maxProcess/],
  ] as const) {
    assert.throws(
      () => parseConfig({ worker: { persistentWorkers: section } }),
      (err: unknown) => err instanceof ConfigError && message.test(err.message),
    );
  }
});
