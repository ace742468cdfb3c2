import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { ConfigError, loadConfig, parseConfig } from "./config.js";

test("embedded defaults: loopback port 8980 and data under ~/.cache/berth", () => {
  const config = parseConfig({});
  assert.equal(config.listen, "127.0.0.1:8980");
  assert.equal(config.dataDir, join(homedir(), ".cache", "berth"));
  assert.equal(config.cas.maxBatchTotalSizeBytes, 4 * 1024 * 1024 - 64 * 1024);
  assert.deepEqual(config.instanceNames, []);
});

test("sizes accept numbers and units", () => {
  const config = parseConfig({
    cas: { maxSizeBytes: "2GiB", maxBatchTotalSizeBytes: 1000 },
    actionCache: { maxSizeBytes: "1.5 MB" },
  });
  assert.equal(config.cas.maxSizeBytes, 2 * 1024 ** 3);
  assert.equal(config.cas.maxBatchTotalSizeBytes, 1000);
  assert.equal(config.actionCache.maxSizeBytes, 1_500_000);
});

test("errors name the offending key", () => {
  const cases: [unknown, RegExp][] = [
    [{ cas: { maxSizeBytes: "lots" } }, /cas\.maxSizeBytes: "lots" is not a size/],
    [{ listen: "8980" }, /listen: must be HOST:PORT/],
    [{ cas: { maxSizeByte: 5 } }, /cas: .*maxSizeByte/],
    [{ logLevel: "loud" }, /logLevel/],
    [{ instanceNames: "main" }, /instanceNames/],
  ];
  for (const [raw, message] of cases) {
    assert.throws(
      () => parseConfig(raw),
      (err: unknown) => err instanceof ConfigError && message.test(err.message),
    );
  }
});

test("a YAML file is read, and command-line values win over it", async () => {
  const dir = await mkdtemp(join(tmpdir(), "berth-config-"));
  try {
    const file = join(dir, "berth.yaml");
    await writeFile(
      file,
      "listen: 0.0.0.0:9000\ndataDir: /srv/berth\ninstanceNames: [main]\ncas:\n  maxSizeBytes: 1GiB\n",
    );
    const config = await loadConfig(file, { dataDir: "/data/override" });
    assert.equal(config.listen, "0.0.0.0:9000");
    assert.equal(config.dataDir, "/data/override");
    assert.deepEqual(config.instanceNames, ["main"]);
    assert.equal(config.cas.maxSizeBytes, 1024 ** 3);
    await assert.rejects(loadConfig(join(dir, "absent.yaml")), /cannot read config file/);
    await writeFile(file, "listen: [unclosed");
    await assert.rejects(loadConfig(file), /not valid YAML/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
