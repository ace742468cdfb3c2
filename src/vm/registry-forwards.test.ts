import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { open, readlink } from "node:fs/promises";
import { createServer } from "node:net";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { promisify } from "node:util";
import { openRegistryForwards, planRelays, registryEndpoint } from "./registry-forwards.js";

const run = promisify(execFile);

test("registries are read as host and port (443 when none), and anything else is no registry", () => {
  assert.deepEqual(registryEndpoint("127.0.0.1:5000"), { host: "127.0.0.1", port: 5000 });
  assert.deepEqual(registryEndpoint("Registry.Example"), { host: "registry.example", port: 443 });
  assert.deepEqual(registryEndpoint("https://mirror.example:8443/v2/"), { host: "mirror.example", port: 8443 });
  for (const bad of ["", "a b:1", "host:0", "host:70000", "[::1]:5000", "host:5000;rm"]) {
    assert.equal(registryEndpoint(bad), undefined, bad);
  }
});

test("each registry gets its own gateway port; names get loopback addresses of their own, duplicates go", () => {
  const relays = planRelays([
    { host: "127.0.0.1", port: 5000 },
    { host: "registry.example", port: 443 },
    { host: "mirror.example", port: 443 },
    { host: "127.0.0.1", port: 5000 },
    { host: "localhost", port: 6000 },
  ]);
  assert.deepEqual(
    relays.map((r) => [r.address, r.port, r.gatewayPort, r.name]),
    [
      ["127.0.0.1", 5000, 40000, undefined],
      ["127.0.1.2", 443, 40001, "registry.example"],
      ["127.0.1.3", 443, 40002, "mirror.example"],
      ["127.0.0.1", 6000, 40003, undefined],
    ],
  );
});

test("in the VM's namespace, a forward's port reaches its registry only, and no other host port answers", async () => {
  // The registry, and another service of the host's that must stay out of reach.
  const received: string[] = [];
  const registry = createServer((socket) => socket.end("registry says hello\n"));
  const other = createServer((socket) => {
    received.push("other");
    socket.destroy();
  });
  await new Promise<void>((resolve) => registry.listen(0, "127.0.0.1", resolve));
  await new Promise<void>((resolve) => other.listen(0, "127.0.0.1", resolve));
  const registryPort = (registry.address() as { port: number }).port;
  const otherPort = (other.address() as { port: number }).port;
  const holder = spawn("unshare", ["--net", "--", "sleep", "infinity"], { stdio: "ignore" });
  const hosts = await readlink("/proc/self/ns/net");
  while ((await readlink(`/proc/${holder.pid}/ns/net`).catch(() => hosts)) === hosts) await sleep(2);
  const held = await open(`/proc/${holder.pid}/ns/net`, "r");
  holder.kill("SIGKILL");
  const namespace = `/proc/${process.pid}/fd/${held.fd}`;
  try {
    await run("nsenter", [`--net=${namespace}`, "--", "ip", "link", "set", "lo", "up"]);
    const [relay] = planRelays([{ host: "127.0.0.1", port: registryPort }]);
    const forwards = await openRegistryForwards(namespace, relay ? [relay] : []);
    try {
      const inside = (port: number) =>
        run("nsenter", [`--net=${namespace}`, "--", "busybox", "nc", "-w", "2", "127.0.0.1", String(port)], {
          timeout: 10_000,
        }).then(
          ({ stdout }) => stdout,
          (error: { stdout?: string }) => `failed: ${error.stdout ?? ""}`,
        );
      assert.equal(await inside(relay?.gatewayPort ?? 0), "registry says hello\n");
      // The host's own ports are not the namespace's: neither the registry's nor another service's answers there.
      assert.match(await inside(registryPort), /^failed/);
      assert.match(await inside(otherPort), /^failed/);
      assert.deepEqual(received, []);
    } finally {
      await forwards.close();
    }
    // Closed: the namespace's port answers no more.
    assert.match(
      await run("nsenter", [`--net=${namespace}`, "--", "busybox", "nc", "-w", "2", "127.0.0.1", "40000"]).then(
        () => "answered",
        () => "failed",
      ),
      /failed/,
    );
  } finally {
    await held.close();
    registry.close();
    other.close();
  }
});
