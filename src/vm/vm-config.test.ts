import assert from "node:assert/strict";
import { homedir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { parseConfig } from "../config/config.js";
import { guestAssetsDir } from "./guest-assets.js";

test("worker.vm: defaults, the guest under the data directory, ~ expanded", () => {
  const config = parseConfig({ dataDir: "/srv/berth" });
  assert.deepEqual(config.worker.vm, {
    qemuPath: "qemu-system-x86_64",
    accelerator: "auto",
    memoryBytes: 512 * 1024 ** 2,
    vcpus: 1,
    scratchDiskBytes: 4 * 1024 ** 3,
    maxMemoryBytes: 4 * 1024 ** 3,
    maxVcpus: 2,
    maxScratchDiskBytes: 32 * 1024 ** 3,
    rootDisksMaxSizeBytes: 16 * 1024 ** 3,
    snapshots: true,
    snapshotsMaxSizeBytes: 8 * 1024 ** 3,
    bootTimeoutSeconds: 60,
    dockerd: { startTimeoutSeconds: 120, registryMirrors: [] },
  });
  assert.equal(guestAssetsDir(config), "/srv/berth/vm");
  const moved = parseConfig({ worker: { vm: { dir: "~/guest", memoryBytes: "1GiB" } } });
  assert.equal(guestAssetsDir(moved), join(homedir(), "guest"));
  assert.equal(moved.worker.vm.memoryBytes, 1024 ** 3);
});

test("worker.vm: a bad value or an unknown key is refused naming it", () => {
  assert.throws(() => parseConfig({ worker: { vm: { accelerator: "hvf" } } }), /worker\.vm\.accelerator/);
  assert.throws(() => parseConfig({ worker: { vm: { vcpus: 0 } } }), /worker\.vm\.vcpus/);
  assert.throws(() => parseConfig({ worker: { vm: { network: true } } }), /worker\.vm: .*network/);
});
