import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { ServiceError } from "@grpc/grpc-js";
import { decodeOperation, executeRequest, uploadAction } from "../../test/support/actions.js";
import { EMPTY_SHA256, randomBlob } from "../../test/support/blobs.js";
import { type Clients, connect, startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { collect, unaryCall } from "../../test/support/rpc.js";
import { WorkerHubClient } from "../gen/berth/worker/v1/worker.js";
import type { Operation } from "../gen/google/longrunning/operations.js";
import { Code } from "../status/status.js";
import { clientChannel } from "./client-channel.js";

const TEAM_A = "team-a-token-0123456789abcdefghijklmnop";
const ADMIN = "admin-token-0123456789abcdefghijklmnopqr";
const hex = (token: string) => createHash("sha256").update(token).digest("hex");

/** What a call came back with: OK, or its status code and message. */
async function outcome(call: Promise<unknown>): Promise<{ code: number; message: string }> {
  try {
    await call;
    return { code: Code.OK, message: "" };
  } catch (err) {
    return { code: (err as ServiceError).code, message: (err as ServiceError).details };
  }
}

describe("clients are who they say: bearer tokens per instance name", () => {
  let dir: string;
  let farm: TestFarm;
  let anonymous: Clients;
  let stranger: Clients;
  let teamA: Clients;
  let admin: Clients;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "berth-tokens-"));
    const tokensFile = join(dir, "tokens.yaml");
    await writeFile(
      tokensFile,
      [
        "tokens:",
        `  - { name: team-a, sha256: ${hex(TEAM_A)}, instances: ["team-a"] }`,
        `  - { name: admin, sha256: ${hex(ADMIN)}, instances: ["*"] }`,
      ].join("\n"),
      { mode: 0o600 },
    );
    farm = await startTestFarm({ auth: { tokensFile } }, undefined, { workers: 1 });
    anonymous = farm.clients;
    stranger = connect(farm.address, { token: "a-token-nobody-issued-0123456789" });
    teamA = connect(farm.address, { token: TEAM_A });
    admin = connect(farm.address, { token: ADMIN });
  });
  after(async () => {
    for (const clients of [stranger, teamA, admin]) clients?.close();
    await farm?.close();
    await rm(dir, { recursive: true, force: true });
  });

  const findMissing = (clients: Clients, instanceName: string) =>
    unaryCall(clients.cas.findMissingBlobs.bind(clients.cas), {
      instanceName,
      blobDigests: [EMPTY_SHA256],
      digestFunction: 0,
    });
  const getActionResult = (clients: Clients, instanceName: string) =>
    unaryCall(clients.ac.getActionResult.bind(clients.ac), {
      instanceName,
      actionDigest: EMPTY_SHA256,
      inlineStdout: false,
      inlineStderr: false,
      inlineOutputFiles: [],
      digestFunction: 0,
    });
  const capabilities = (clients: Clients, instanceName: string) =>
    unaryCall(clients.capabilities.getCapabilities.bind(clients.capabilities), { instanceName });
  const byteStreamRead = (clients: Clients, instanceName: string, digest = EMPTY_SHA256) =>
    collect(
      clients.byteStream.read({
        resourceName: `${instanceName ? `${instanceName}/` : ""}blobs/${digest.hash}/${digest.sizeBytes}`,
        readOffset: 0,
        readLimit: 0,
      }),
    );
  const byteStreamWrite = (clients: Clients, instanceName: string) => {
    const blob = randomBlob(1000);
    return new Promise<void>((resolve, reject) => {
      const call = clients.byteStream.write((err) => (err ? reject(err) : resolve()));
      call.write({
        resourceName: `${instanceName}/uploads/${crypto.randomUUID()}/blobs/${blob.digest.hash}/${blob.digest.sizeBytes}`,
        writeOffset: 0,
        finishWrite: true,
        data: blob.data,
      });
      call.end();
    });
  };
  const executeOn = (clients: Clients, instanceName: string, digest: { hash: string; sizeBytes: number }) =>
    collect(clients.execution.execute({ ...executeRequest(digest), instanceName })).then((ops) =>
      decodeOperation(ops.at(-1) as Operation),
    );

  const calls: [string, (clients: Clients, instance: string) => Promise<unknown>][] = [
    ["Capabilities.GetCapabilities", capabilities],
    ["ContentAddressableStorage.FindMissingBlobs", findMissing],
    ["ActionCache.GetActionResult", getActionResult],
    ["ByteStream.Read", byteStreamRead],
    ["ByteStream.Write", byteStreamWrite],
    ["Execution.Execute", (clients, instance) => executeOn(clients, instance, EMPTY_SHA256)],
  ];

  for (const [name, call] of calls) {
    test(`${name}: no token or an unknown one is UNAUTHENTICATED, another instance PERMISSION_DENIED naming it`, async () => {
      const none = await outcome(call(anonymous, "team-a"));
      assert.equal(none.code, Code.UNAUTHENTICATED, none.message);
      assert.match(none.message, /authorization: Bearer/);
      const unknown = await outcome(call(stranger, "team-a"));
      assert.equal(unknown.code, Code.UNAUTHENTICATED, unknown.message);
      const elsewhere = await outcome(call(teamA, "team-b"));
      assert.equal(elsewhere.code, Code.PERMISSION_DENIED, elsewhere.message);
      assert.match(elsewhere.message, /may not use the instance name "team-b"/);
      const defaultInstance = await outcome(call(teamA, ""));
      assert.equal(defaultInstance.code, Code.PERMISSION_DENIED, defaultInstance.message);
      // Its own instance passes the check: what comes back is the method's own answer (NOT_FOUND for
      // GetActionResult of an unknown action), never an authentication status.
      const own = await outcome(call(teamA, "team-a"));
      assert.ok(![Code.UNAUTHENTICATED, Code.PERMISSION_DENIED].includes(own.code as 7 | 16), own.message);
      const all = await outcome(call(admin, "team-b"));
      assert.ok(![Code.UNAUTHENTICATED, Code.PERMISSION_DENIED].includes(all.code as 7 | 16), all.message);
    });
  }

  test("with the right token an action runs end to end (the farm's own worker reads and writes the CAS with its worker token)", async () => {
    // uploadAction writes to the default instance, which team-a may not use; the admin token may.
    const refused = await outcome(uploadAction(teamA, { args: ["true"], salt: `${Math.random()}` }));
    assert.equal(refused.code, Code.PERMISSION_DENIED, refused.message);
    const action = await uploadAction(admin, { args: ["sh", "-c", "echo ran"], salt: `${Math.random()}` });
    const done = await executeOn(admin, "", action);
    assert.equal(done.response?.status?.code ?? 0, Code.OK, done.response?.status?.message);
    assert.equal(done.response?.result?.exitCode, 0);
  });

  test("another instance's operation is NOT_FOUND to GetOperation, WaitExecution and CancelOperation, as if it did not exist", async () => {
    const action = await uploadAction(admin, { args: ["sh", "-c", "sleep 1"], salt: `${Math.random()}` });
    const stream = admin.execution.execute(executeRequest(action));
    const first = await new Promise<Operation>((resolve, reject) => {
      stream.once("data", resolve);
      stream.once("error", reject);
    });
    const name = first.name;
    const get = await outcome(unaryCall(teamA.operations.getOperation.bind(teamA.operations), { name }));
    assert.equal(get.code, Code.NOT_FOUND, get.message);
    assert.equal(get.message, `no operation named "${name}"`);
    const wait = await outcome(collect(teamA.execution.waitExecution({ name })));
    assert.equal(wait.code, Code.NOT_FOUND, wait.message);
    const cancel = await outcome(unaryCall(teamA.operations.cancelOperation.bind(teamA.operations), { name }));
    assert.equal(cancel.code, Code.NOT_FOUND, cancel.message);
    // The owner still sees it, uncancelled, through to its end.
    const own = await outcome(unaryCall(admin.operations.getOperation.bind(admin.operations), { name }));
    assert.equal(own.code, Code.OK, own.message);
    const last = decodeOperation((await collect(stream)).at(-1) as Operation);
    assert.equal(last.response?.result?.exitCode, 0, last.response?.status?.message);
  });

  test("a client token is not a worker token: WorkerHub refuses it", async () => {
    const channel = clientChannel({ address: farm.address, token: ADMIN });
    const client = new WorkerHubClient(channel.target, channel.credentials, channel.options);
    const stream = client.connect();
    const got: unknown[] = [];
    const error = await new Promise<ServiceError>((resolve) => {
      stream.on("data", (m) => got.push(m));
      stream.on("error", resolve);
      stream.write({ hello: { workerName: "admin-as-worker", properties: [], slots: 1 } });
    });
    client.close();
    assert.equal(error.code, Code.UNAUTHENTICATED);
    assert.deepEqual(got, []);
  });
});
