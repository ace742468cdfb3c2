import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { access, constants, mkdtemp, rm, stat, writeFile } from "node:fs/promises";
import { createServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";
import { testGuestAssets } from "../../test/support/guest.js";
import { bootToMarker, probeAccelerator } from "./accelerator.js";
import { AgentConnection } from "./agent-connection.js";
import { encodeFrame, encodeRun, FrameReader, MAX_FRAME_BYTES } from "./agent-protocol.js";
import { ensureGuestAssets, type GuestAssets, loadGuestAssets, qemuAvailable } from "./guest-assets.js";

const run = promisify(execFile);
let dir: string;
let assets: GuestAssets;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "berth-guest-"));
  assets = await testGuestAssets();
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

test("a missing or partial guest is no guest (the VM capability is absent), not a crash", async () => {
  assert.equal(await loadGuestAssets(join(dir, "nothing-here")), undefined);
  await writeFile(join(dir, "guest.json"), JSON.stringify({ kernelRelease: "6.1", kernel: "vmlinux", initramfs: "x" }));
  assert.equal(await loadGuestAssets(dir), undefined);
  await writeFile(join(dir, "guest.json"), "{not json");
  assert.equal(await loadGuestAssets(dir), undefined);
  assert.equal(await qemuAvailable(join(dir, "no-such-qemu")), false);
  assert.equal(await qemuAvailable("qemu-system-x86_64"), true);
});

test("the guest script is idempotent and loads modules after their dependencies", async () => {
  const guestDir = dirname(assets.kernel);
  const before = (await stat(assets.initramfs)).mtimeMs;
  await ensureGuestAssets(guestDir);
  assert.equal((await stat(assets.initramfs)).mtimeMs, before, "a second run rebuilt the initramfs");
  const { stdout } = await run("sh", [
    "-c",
    `cd ${JSON.stringify(dir)} && cpio -i --quiet --to-stdout lib/modules/load-order < ${JSON.stringify(assets.initramfs)}`,
  ]);
  const order = stdout.trim().split("\n");
  const position = (module: string) => {
    const index = order.indexOf(`${module}.ko`);
    assert.notEqual(index, -1, `${module} is not loaded`);
    return index;
  };
  for (const [dependency, module] of [
    ["virtio_ring", "virtio"],
    ["virtio", "virtio_pci"],
    ["virtio", "virtio_blk"],
    ["virtio", "virtio_console"],
    ["jbd2", "ext4"],
    ["mbcache", "ext4"],
    ["libcrc32c", "erofs"],
    ["net_failover", "virtio_net"],
  ] as const) {
    assert.ok(position(dependency) < position(module), `${dependency} is loaded after ${module}`);
  }
  // Modules go in without their signatures, which the guest kernel would check, emulated, at every boot.
  const ext4 = await run("sh", [
    "-c",
    `cd ${JSON.stringify(dir)} && cpio -i --quiet --to-stdout lib/modules/ext4.ko < ${JSON.stringify(assets.initramfs)} | tail -c 28`,
  ]);
  assert.notEqual(ext4.stdout, "~Module signature appended~\n");
  position("overlay");
  position("crc32c_generic");
  await access(assets.kernel, constants.R_OK);
});

test("KVM is chosen only when a real guest boots under it", async () => {
  assert.equal(await probeAccelerator(assets, { kvmDevice: join(dir, "no-kvm") }), "tcg");
  const probed = await probeAccelerator(assets);
  const kvmUsable = await access("/dev/kvm", constants.R_OK | constants.W_OK).then(
    () => true,
    () => false,
  );
  if (probed === "kvm") {
    assert.ok(kvmUsable);
  } else if (kvmUsable) {
    // This host's /dev/kvm exists but does not run the guest (a nested software module here): the probe said
    // so because a KVM boot really fails.
    assert.equal(await bootToMarker(assets, { accelerator: "kvm", timeoutMs: 20_000 }), undefined);
  }
});

test("frames outside 1..MAX_FRAME_BYTES and NULs inside a command are refused", () => {
  const reader = new FrameReader();
  const zero = Buffer.alloc(5);
  assert.throws(() => reader.push(zero), /frame of 0 bytes/);
  const huge = Buffer.alloc(5);
  huge.writeUInt32BE(MAX_FRAME_BYTES + 1, 0);
  assert.throws(() => new FrameReader().push(huge), /frame of 1048577 bytes/);
  const split = new FrameReader();
  const frame = encodeFrame("O", "hello");
  assert.deepEqual(split.push(frame.subarray(0, 3)), []);
  assert.deepEqual(
    split.push(frame.subarray(3)).map((f) => [f.type, f.payload.toString()]),
    [["O", "hello"]],
  );
  const command = { argv: ["sh"], env: {}, workingDirectory: "/", uid: 0, gid: 0 };
  assert.throws(() => encodeRun({ ...command, argv: ["sh", "-c", "true\0; rm -rf /"] }), /NUL/);
  assert.throws(() => encodeRun({ ...command, env: { "A\0B": "x" } }), /NUL/);
  assert.throws(() => encodeRun({ ...command, workingDirectory: "/tmp\0/etc" }), /NUL/);
});

test("a hostile agent (an oversized frame) loses its connection and fails the command, not the worker", async () => {
  const path = join(dir, "hostile.sock");
  const server = createServer((socket) => {
    socket.once("data", () => {
      const header = Buffer.alloc(5);
      header.writeUInt32BE(0xffffffff, 0);
      socket.write(header);
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  const { createConnection } = await import("node:net");
  const socket: Socket = createConnection(path);
  const agent = new AgentConnection(socket);
  await assert.rejects(
    agent.run({ argv: ["true"], env: {}, workingDirectory: "/", uid: 0, gid: 0 }),
    /frame of 4294967295 bytes/,
  );
  await assert.rejects(agent.ping(), /frame of 4294967295 bytes/);
  await new Promise<void>((resolve) => server.close(() => resolve()));
});
