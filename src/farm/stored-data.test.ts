import assert from "node:assert/strict";
import { mkdtemp, open, readdir, readFile, rm, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { ServiceError } from "@grpc/grpc-js";
import { byteStreamUpload } from "../../test/support/actions.js";
import { randomBlob, type WireDigest } from "../../test/support/blobs.js";
import { type Clients, startTestFarm } from "../../test/support/farm.js";
import { collect, unaryCall } from "../../test/support/rpc.js";
import { ActionResult, Compressor_Value, Digest } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code } from "../status/status.js";

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-stored-data-"));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

type Blob = { data: Buffer; digest: WireDigest };

async function batchUpload(clients: Clients, blobs: Blob[]): Promise<number[]> {
  const response = await unaryCall(clients.cas.batchUpdateBlobs.bind(clients.cas), {
    instanceName: "",
    digestFunction: 0,
    requests: blobs.map((b) => ({ ...b, compressor: Compressor_Value.IDENTITY })),
  });
  return response.responses.map((r) => r.status?.code ?? 0);
}

async function missing(clients: Clients, blobs: Blob[]): Promise<string[]> {
  const response = await unaryCall(clients.cas.findMissingBlobs.bind(clients.cas), {
    instanceName: "",
    blobDigests: blobs.map((b) => b.digest),
    digestFunction: 0,
  });
  return response.missingBlobDigests.map((d) => d.hash);
}

/** The whole blob by ByteStream Read, or the call's status code. */
async function byteStreamRead(clients: Clients, blob: Blob): Promise<Buffer | number> {
  try {
    const read = await collect(
      clients.byteStream.read({
        resourceName: `blobs/${blob.digest.hash}/${blob.digest.sizeBytes}`,
        readOffset: 0,
        readLimit: 0,
      }),
    );
    return Buffer.concat(read.map((r) => r.data));
  } catch (err) {
    return (err as ServiceError).code;
  }
}

async function batchRead(clients: Clients, blob: Blob): Promise<Buffer | number> {
  const response = await unaryCall(clients.cas.batchReadBlobs.bind(clients.cas), {
    instanceName: "",
    digests: [blob.digest],
    acceptableCompressors: [],
    digestFunction: 0,
  });
  const [only] = response.responses;
  return only?.status?.code ? only.status.code : (only?.data ?? Buffer.alloc(0));
}

function blobFile(dataDir: string, blob: Blob): string {
  const { hash, sizeBytes } = blob.digest;
  return join(dataDir, "cas", "files", "sha256", hash.slice(0, 2), `${hash}-${sizeBytes}`);
}

async function flipByte(path: string, at: number): Promise<void> {
  const handle = await open(path, "r+");
  const byte = Buffer.alloc(1);
  await handle.read(byte, 0, 1, at);
  byte[0] = (byte[0] as number) ^ 0xff;
  await handle.write(byte, 0, 1, at);
  await handle.close();
}

test("blob files cut short or damaged while the farm was stopped are missing after a restart, never served, and healed by a new upload", async () => {
  const dataDir = join(root, "files");
  const truncated = randomBlob(300_000);
  const flipped = randomBlob(300_000);
  const intact = randomBlob(300_000);
  const readFirst = randomBlob(200_000);
  let farm = await startTestFarm({}, dataDir);
  try {
    for (const blob of [truncated, flipped, intact, readFirst]) await byteStreamUpload(farm.clients, blob);
    await farm.close();

    // What an unclean shutdown leaves: a file whose data never reached the disk, and one with a bad block.
    await truncate(blobFile(dataDir, truncated), 0);
    await flipByte(blobFile(dataDir, flipped), 150_000);
    await flipByte(blobFile(dataDir, readFirst), 7);
    farm = await startTestFarm({}, dataDir);

    // Read before anything asked FindMissingBlobs about it: the damage is found on the way out.
    assert.equal(await byteStreamRead(farm.clients, readFirst), Code.NOT_FOUND);
    assert.deepEqual(
      (await missing(farm.clients, [truncated, flipped, intact, readFirst])).sort(),
      [truncated.digest.hash, flipped.digest.hash, readFirst.digest.hash].sort(),
    );
    assert.equal(await byteStreamRead(farm.clients, truncated), Code.NOT_FOUND);
    assert.equal(await byteStreamRead(farm.clients, flipped), Code.NOT_FOUND);
    assert.equal(await batchRead(farm.clients, flipped), Code.NOT_FOUND);
    assert.deepEqual(await byteStreamRead(farm.clients, intact), intact.data, "the undamaged blob is served");

    for (const blob of [truncated, flipped, readFirst]) await byteStreamUpload(farm.clients, blob);
    assert.deepEqual(await missing(farm.clients, [truncated, flipped, intact, readFirst]), []);
    for (const blob of [truncated, flipped, readFirst]) {
      assert.deepEqual(await byteStreamRead(farm.clients, blob), blob.data, "uploaded again, it is served again");
    }
  } finally {
    await farm.close();
  }
});

test("a damaged or torn record of the small-blob log is reported missing by FindMissingBlobs and not served", async () => {
  const dataDir = join(root, "log");
  const blobs = Array.from({ length: 5 }, () => randomBlob(1000));
  let farm = await startTestFarm({ cas: { memoryCacheSizeBytes: 0 } }, dataDir);
  try {
    assert.deepEqual(await batchUpload(farm.clients, blobs), [0, 0, 0, 0, 0]);
    await farm.close();

    const logDir = join(dataDir, "cas", "log");
    const [segment] = await readdir(logDir);
    const path = join(logDir, segment as string);
    const bytes = await readFile(path);
    // Damage inside the second record's data, and cut the last record in half.
    const second = bytes.indexOf((blobs[1] as Blob).data);
    const last = bytes.indexOf((blobs[4] as Blob).data);
    assert.ok(second > 0 && last > second);
    await flipByte(path, second + 500);
    await truncate(path, last + 500);
    farm = await startTestFarm({ cas: { memoryCacheSizeBytes: 0 } }, dataDir);

    const damaged = [blobs[1], blobs[4]] as Blob[];
    assert.deepEqual((await missing(farm.clients, blobs)).sort(), damaged.map((b) => b.digest.hash).sort());
    for (const blob of damaged) assert.equal(await batchRead(farm.clients, blob), Code.NOT_FOUND);
    assert.deepEqual(await batchRead(farm.clients, blobs[2] as Blob), (blobs[2] as Blob).data);
    assert.deepEqual(await batchUpload(farm.clients, damaged), [0, 0]);
    assert.deepEqual(await missing(farm.clients, blobs), []);
  } finally {
    await farm.close();
  }
});

test("a damaged action cache entry is a miss, also one cut at a field boundary that still decodes", async () => {
  const dataDir = join(root, "ac");
  const stdout = randomBlob(10);
  const actions = [randomBlob(30).digest, randomBlob(31).digest, randomBlob(32).digest];
  let farm = await startTestFarm({}, dataDir);
  const getResult = (clients: Clients, actionDigest: WireDigest) =>
    unaryCall(clients.ac.getActionResult.bind(clients.ac), {
      instanceName: "",
      actionDigest,
      inlineStdout: false,
      inlineStderr: false,
      inlineOutputFiles: [],
      digestFunction: 0,
    }).then(
      (result) => result.exitCode,
      (err: ServiceError) => `code ${err.code}`,
    );
  try {
    assert.deepEqual(await batchUpload(farm.clients, [stdout]), [0]);
    for (const actionDigest of actions) {
      await unaryCall(farm.clients.ac.updateActionResult.bind(farm.clients.ac), {
        instanceName: "",
        actionDigest,
        actionResult: ActionResult.fromPartial({ stdoutDigest: stdout.digest, exitCode: 7 }),
        resultsCachePolicy: undefined,
        digestFunction: 0,
      });
    }
    await farm.close();

    const entries = (await readdir(join(dataDir, "ac", "files"), { recursive: true, withFileTypes: true }))
      .filter((e) => e.isFile())
      .map((e) => join(e.parentPath, e.name));
    const entryOf = (d: WireDigest) => entries.find((p) => p.endsWith(`${d.hash}-${d.sizeBytes}`)) as string;
    const [flipped, cut] = actions.map(entryOf) as [string, string, string];
    await flipByte(flipped, (await readFile(flipped)).byteLength - 3);
    // The ActionResult without its last field (stdout_digest, a tag, a length and the Digest): a shorter
    // message that still decodes, to a result with the same exit code and no output.
    const whole = await readFile(cut);
    const lastField = 2 + Digest.encode(Digest.fromPartial(stdout.digest)).finish().byteLength;
    assert.deepEqual(ActionResult.decode(whole.subarray(36, whole.byteLength - lastField)).exitCode, 7);
    await writeFile(cut, whole.subarray(0, whole.byteLength - lastField));
    farm = await startTestFarm({}, dataDir);

    assert.equal(await getResult(farm.clients, actions[0] as WireDigest), `code ${Code.NOT_FOUND}`);
    assert.equal(await getResult(farm.clients, actions[1] as WireDigest), `code ${Code.NOT_FOUND}`);
    assert.equal(await getResult(farm.clients, actions[2] as WireDigest), 7);
  } finally {
    await farm.close();
  }
});
