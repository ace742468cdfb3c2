import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { unaryCall } from "../../test/support/rpc.js";
import {
  Compressor_Value,
  DigestFunction_Value,
  SymlinkAbsolutePathStrategy_Value,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";

let farm: TestFarm;
before(async () => {
  farm = await startTestFarm({ cas: { maxBatchTotalSizeBytes: "1MiB" } });
});
after(() => farm.close());

test("capabilities satisfy REAPI 2.0 clients (Bazel 4) and announce what the CAS supports", async () => {
  const caps = await unaryCall(farm.clients.capabilities.getCapabilities.bind(farm.clients.capabilities), {
    instanceName: "",
  });
  assert.deepEqual(caps.deprecatedApiVersion, { major: 2, minor: 0, patch: 0, prerelease: "" });
  assert.deepEqual(caps.lowApiVersion, { major: 2, minor: 0, patch: 0, prerelease: "" });
  assert.ok((caps.highApiVersion?.major ?? 0) === 2 && (caps.highApiVersion?.minor ?? 0) >= 3);

  const cache = caps.cacheCapabilities;
  assert.ok(cache);
  for (const fn of ["SHA256", "SHA1", "SHA384", "SHA512", "BLAKE3"] as const) {
    assert.ok(cache.digestFunctions.includes(DigestFunction_Value[fn]), fn);
  }
  assert.equal(cache.digestFunctions[0], DigestFunction_Value.SHA256);
  assert.deepEqual(cache.supportedCompressors, [Compressor_Value.ZSTD]);
  assert.deepEqual(cache.supportedBatchUpdateCompressors, [Compressor_Value.ZSTD]);
  assert.equal(cache.maxBatchTotalSizeBytes, 1024 * 1024);
  assert.equal(cache.symlinkAbsolutePathStrategy, SymlinkAbsolutePathStrategy_Value.ALLOWED);
  assert.equal(cache.actionCacheUpdateCapabilities?.updateEnabled, true);

  // Bazel 4.2.3 refuses a server without the legacy single digest function.
  assert.equal(caps.executionCapabilities?.digestFunction, DigestFunction_Value.SHA256);
});
