import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { Code } from "../status/status.js";

/**
 * Hostile actions against a real farm with two worker slots and small bounds: each one must stop at its own
 * limit, with a result that names it, and leave its neighbour alone.
 */
const LIMITS = {
  maxProcesses: 64,
  maxMemoryBytes: 96 * 1024 ** 2,
  tmpSizeBytes: 4 * 1024 ** 2,
  shmSizeBytes: 2 * 1024 ** 2,
  maxFileSizeBytes: 8 * 1024 ** 2,
};
const isRoot = process.getuid?.() === 0;
let farm: TestFarm;

before(async () => {
  farm = await startTestFarm({ worker: { limits: LIMITS } }, undefined, { workers: 2, runImages: false });
});
after(() => farm.close());

async function runScript(script: string, options: { salt: string; network?: boolean; timeoutSeconds?: number }) {
  const digest = await uploadAction(farm.clients, {
    args: ["/bin/bash", "-c", script],
    salt: options.salt,
    timeoutSeconds: options.timeoutSeconds,
    platform: options.network ? [{ name: "network", value: "external" }] : [],
  });
  const { response } = await execute(farm.clients, digest, { skipCacheLookup: true });
  return {
    code: response.status?.code ?? Code.OK,
    message: response.status?.message ?? "",
    exitCode: response.result?.exitCode,
    stdout: await readBlob(farm.clients, response.result?.stdoutDigest),
    stderr: await readBlob(farm.clients, response.result?.stderrDigest),
  };
}

test("a process bomb stops at the process limit, named in its result, while the action beside it runs", {
  skip: !isRoot,
}, async () => {
  // Every slot used to run as uid 65534: the bomb took every process the uid could have, and the neighbour
  // failed in `bwrap: Can't fork`.
  // The classic bomb, then a loop of background jobs: dash gives up ("Cannot fork") when a fork fails.
  const bomb = runScript("timeout 8 sh -c 'b(){ b|b& }; b; while :; do sleep 5 & done'", {
    salt: "bomb",
    timeoutSeconds: 60,
  });
  await new Promise((resolve) => setTimeout(resolve, 1500));
  const neighbour = await runScript("for i in $(seq 50); do /bin/true; done; echo fine", { salt: "neighbour" });
  assert.deepEqual([neighbour.code, neighbour.exitCode, neighbour.stdout], [Code.OK, 0, "fine\n"], neighbour.stderr);
  const bombed = await bomb;
  assert.equal(bombed.code, Code.RESOURCE_EXHAUSTED, bombed.message);
  assert.match(bombed.message, /process limit of 64 .*worker\.limits\.maxProcesses/);
  assert.notEqual(bombed.exitCode, 0);
});

test("a memory hog is killed at the memory limit, named in its result, with its output kept", {
  skip: !isRoot,
}, async () => {
  const hog = await runScript(`echo before; perl -e '$x = "a" x (400 * 1024 * 1024); print length $x'`, {
    salt: "hog",
  });
  assert.equal(hog.code, Code.RESOURCE_EXHAUSTED, hog.message);
  assert.match(hog.message, /memory limit of 100663296 bytes \(worker\.limits\.maxMemoryBytes\)/);
  assert.equal(hog.stdout, "before\n");
  assert.notEqual(hog.exitCode, 0);
});

test("/tmp and /dev/shm fill up at their sizes, and the result names them", async () => {
  for (const [dir, size] of [
    ["/tmp", LIMITS.tmpSizeBytes],
    ["/dev/shm", LIMITS.shmSizeBytes],
  ] as const) {
    const filled = await runScript(
      `dd if=/dev/zero of=${dir}/fill bs=64k count=100; status=$?; stat -c %s ${dir}/fill; exit $status`,
      { salt: `fill ${dir}` },
    );
    assert.equal(filled.code, Code.RESOURCE_EXHAUSTED, filled.message);
    assert.match(filled.stderr, /No space left on device/);
    const written = Number(filled.stdout.trim());
    assert.ok(written > 0 && written <= size, `${dir} took ${written} bytes, more than ${size}`);
    assert.match(filled.message, /worker\.limits\.tmpSizeBytes.*worker\.limits\.shmSizeBytes/);
  }
});

test("a file past the file size limit is cut off, and the result names the limit", async () => {
  // dd is killed by SIGXFSZ at the limit (exit code 128 + 25).
  const big = await runScript("dd if=/dev/zero of=big bs=64k count=200 && echo never", { salt: "big file" });
  assert.equal(big.code, Code.RESOURCE_EXHAUSTED, big.message);
  assert.match(big.message, /file size limit of 8388608 bytes \(worker\.limits\.maxFileSizeBytes\)/);
  assert.equal(big.exitCode, 153);
  assert.equal(big.stdout, "");
});

test("an action with network=external cannot reach the farm's own gRPC port", { skip: !isRoot }, async () => {
  const port = farm.address.split(":").at(-1);
  // Through its own loopback, and through slirp4netns's address for the host (refused by --disable-host-loopback).
  const attempts = ["127.0.0.1", "10.0.2.2"]
    .map((host) => `(exec 3<>/dev/tcp/${host}/${port}) 2>/dev/null && echo "reached ${host}"`)
    .join("; ");
  const probe = await runScript(`${attempts}; grep -c tap0 /proc/net/dev`, { salt: "probe", network: true });
  assert.equal(probe.code, Code.OK, probe.message);
  // It has a network (slirp4netns's tap0), just not the farm.
  assert.equal(probe.stdout, "1\n");
  // Its stderr (cached with the result) is its own: slirp4netns's "sent tapfd=… for tap0" went to /dev/null.
  assert.equal(probe.stderr, "");
});

test("a command of 20,000 arguments (1 MB) runs", async () => {
  const many = Array.from({ length: 20_000 }, (_, i) => `argument-${String(i).padStart(40, "0")}`);
  const digest = await uploadAction(farm.clients, {
    // The shell's last argument: dash has no ${20000}.
    args: ["/bin/sh", "-c", 'for last; do :; done; echo "$# $1 $last"', "sh", ...many],
    salt: "many",
  });
  const { response } = await execute(farm.clients, digest, { skipCacheLookup: true });
  assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
  assert.equal(response.result?.exitCode, 0);
  assert.equal(await readBlob(farm.clients, response.result?.stdoutDigest), `20000 ${many[0]} ${many[19_999]}\n`);
});
