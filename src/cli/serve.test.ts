import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { BERTH_BIN, connect, spawnBerth } from "../../test/support/farm.js";
import { unaryCall } from "../../test/support/rpc.js";

const run = promisify(execFile);

for (const signal of ["SIGINT", "SIGTERM"] as const) {
  test(`berth serve logs where it listens, serves, and stops cleanly on ${signal}`, async () => {
    const dir = await mkdtemp(join(tmpdir(), "berth-cli-"));
    try {
      const berth = await spawnBerth(["--data-dir", join(dir, "data")]);
      assert.match(berth.address, /^127\.0\.0\.1:[0-9]+$/);
      const clients = connect(berth.address);
      const caps = await unaryCall(clients.capabilities.getCapabilities.bind(clients.capabilities), {
        instanceName: "",
      });
      assert.equal(caps.lowApiVersion?.major, 2);
      clients.close();
      assert.ok((await stat(join(dir, "data", "cas"))).isDirectory());
      const exited = new Promise<number | null>((resolve) => berth.child.once("exit", resolve));
      berth.child.kill(signal);
      assert.equal(await exited, 0);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
}

test("every command has --help", async () => {
  const top = await run(process.execPath, [BERTH_BIN, "--help"]);
  assert.match(top.stdout, /serve/);
  const commands = [...top.stdout.matchAll(/^ {2}([a-z][a-z-]*)\b/gm)]
    .map((m) => m[1] as string)
    .filter((c) => c !== "help");
  assert.ok(commands.length > 0);
  for (const command of commands) {
    const help = await run(process.execPath, [BERTH_BIN, command, "--help"]);
    assert.match(help.stdout, new RegExp(`Usage: berth ${command}`));
  }
});

test("a bad configuration stops berth serve with a message naming the key", async () => {
  const dir = await mkdtemp(join(tmpdir(), "berth-cli-"));
  try {
    await assert.rejects(
      run(process.execPath, [BERTH_BIN, "serve", "--listen", "nowhere", "--data-dir", dir]),
      (err: { code: number; stderr: string }) => {
        assert.equal(err.code, 2);
        assert.match(err.stderr, /listen: must be HOST:PORT/);
        return true;
      },
    );
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
