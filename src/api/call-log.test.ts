import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { Client, credentials, Metadata, type ServiceError } from "@grpc/grpc-js";
import { decodeOperation, executeRequest, uploadAction } from "../../test/support/actions.js";
import { EMPTY_SHA256, sha256 } from "../../test/support/blobs.js";
import { type Clients, connect, startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { type CapturedLog, captureLog, LEVEL, type LogRecord } from "../../test/support/log-capture.js";
import { collect, unaryCall } from "../../test/support/rpc.js";
import { clientChannel } from "../auth/client-channel.js";
import { WorkerHubClient } from "../gen/berth/worker/v1/worker.js";
import { RequestMetadata } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code } from "../status/status.js";
import { REGISTRY_CREDENTIALS_HEADER } from "./registry-credentials-header.js";
import { REQUEST_METADATA_HEADER } from "./request-metadata.js";

const ADMIN_TOKEN = "admin-token-for-the-call-log-0123456789abc";
const TEAM_TOKEN = "team-token-for-the-call-log-0123456789abcd";
const WRONG_TOKEN = "a-token-nobody-issued-for-the-log-0123456";
const HEADER_PASSWORD = "header-registry-password-7f3a9c";
const URL_PASSWORD = "url-userinfo-password-51be02";
const PLATFORM_PASSWORD = "platform-property-password-c0ffee";
const hex = (token: string) => createHash("sha256").update(token).digest("hex");

const EXECUTE = "/build.bazel.remote.execution.v2.Execution/Execute";
const WAIT_EXECUTION = "/build.bazel.remote.execution.v2.Execution/WaitExecution";

/** What Bazel 4.2.3 sends with a genrule's Execute. */
const BAZEL_METADATA = {
  toolDetails: { toolName: "bazel", toolVersion: "4.2.3" },
  actionId: "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
  toolInvocationId: "5c1c8b0e-94d4-4a6b-8a57-2b2b3d1b0c11",
  correlatedInvocationsId: "9a7e5b2c-1111-4c2d-9e8f-0a1b2c3d4e5f",
  actionMnemonic: "Genrule",
  targetId: "//pkg:scratch",
  configurationId: "k8-fastbuild",
};

function withRequestMetadata(value: Buffer = Buffer.from(RequestMetadata.encode(BAZEL_METADATA).finish())): Metadata {
  const metadata = new Metadata();
  metadata.set(REQUEST_METADATA_HEADER, value);
  return metadata;
}

/** Execute to its end: the final ExecuteResponse, or the call's error status. */
async function executeCall(clients: Clients, request: ReturnType<typeof executeRequest>, metadata = new Metadata()) {
  try {
    const updates = (await collect(clients.execution.execute(request, metadata))).map(decodeOperation);
    const last = updates.at(-1);
    return { operationName: last?.name ?? "", response: last?.response, error: undefined };
  } catch (err) {
    return { operationName: "", response: undefined, error: err as ServiceError };
  }
}

async function waitExecutionCall(clients: Clients, name: string, metadata = new Metadata()) {
  try {
    const updates = (await collect(clients.execution.waitExecution({ name }, metadata))).map(decodeOperation);
    return { response: updates.at(-1)?.response, error: undefined };
  } catch (err) {
    return { response: undefined, error: err as ServiceError };
  }
}

async function statusOf(call: Promise<unknown>): Promise<number> {
  try {
    await call;
    return Code.OK;
  } catch (err) {
    return (err as ServiceError).code;
  }
}

/** A call of a method by its path, with raw bytes, as a client of an API this farm lacks makes it. */
function rawUnaryCall(address: string, path: string, metadata: Metadata): Promise<ServiceError | undefined> {
  const client = new Client(address, credentials.createInsecure());
  return new Promise((resolve) => {
    client.makeUnaryRequest(
      path,
      (message: Buffer) => message,
      (bytes: Buffer) => bytes,
      Buffer.from([0x0a, 0x00]),
      metadata,
      (err) => {
        client.close();
        resolve(err ?? undefined);
      },
    );
  });
}

describe("what an operator sees: every refused call is logged once, with who asked and why", () => {
  let dir: string;
  let farm: TestFarm;
  let captured: CapturedLog;
  let admin: Clients;
  let team: Clients;
  let stranger: Clients;
  let withCredentials: Clients;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "berth-call-log-"));
    const tokensFile = join(dir, "tokens.yaml");
    await writeFile(
      tokensFile,
      [
        "tokens:",
        `  - { name: admin, sha256: ${hex(ADMIN_TOKEN)}, instances: ["*"] }`,
        `  - { name: team, sha256: ${hex(TEAM_TOKEN)}, instances: ["team"] }`,
      ].join("\n"),
      { mode: 0o600 },
    );
    captured = captureLog("trace");
    farm = await startTestFarm(
      {
        auth: { tokensFile },
        logLevel: "trace",
        execution: { allowNetwork: false, maxTimeoutSeconds: 60 },
        images: { allowed: ["registry.example"] },
      },
      undefined,
      { workers: 1, runImages: false, log: captured.log, clientConnection: { token: ADMIN_TOKEN } },
    );
    admin = farm.clients;
    team = connect(farm.address, { token: TEAM_TOKEN });
    stranger = connect(farm.address, { token: WRONG_TOKEN });
    withCredentials = connect(farm.address, {
      token: ADMIN_TOKEN,
      headers: [[REGISTRY_CREDENTIALS_HEADER, `registry.example=alice:${HEADER_PASSWORD}`]],
    });
  });
  after(async () => {
    for (const clients of [team, stranger, withCredentials]) clients?.close();
    await farm?.close();
    await rm(dir, { recursive: true, force: true });
  });

  /** Runs `call` and returns the records at info or above it caused (the farm is otherwise idle). */
  async function recordsOf(call: () => Promise<unknown>): Promise<LogRecord[]> {
    const from = captured.records.length;
    await call();
    return captured.since(from).filter((r) => r.level >= LEVEL.info);
  }

  function assertOneRecord(records: LogRecord[], expected: Record<string, unknown>, level: number): LogRecord {
    assert.equal(records.length, 1, `one record, not: ${JSON.stringify(records, null, 1)}`);
    const [record] = records as [LogRecord];
    assert.equal(record.level, level, `level of ${record.msg}`);
    assert.equal(record.event, "call refused");
    for (const [field, value] of Object.entries(expected)) assert.deepEqual(record[field], value, field);
    return record;
  }

  test("an Execute refused for its platform: one info record with the method, instance, the client's RequestMetadata and the reason", async () => {
    const action = await uploadAction(admin, {
      args: ["true"],
      platform: [{ name: "pool", value: "gpu-large" }],
      salt: `${Math.random()}`,
    });
    let outcome: Awaited<ReturnType<typeof executeCall>> | undefined;
    const records = await recordsOf(async () => {
      outcome = await executeCall(admin, executeRequest(action), withRequestMetadata());
    });
    assert.equal(outcome?.response?.status?.code, Code.FAILED_PRECONDITION, "refused in the ExecuteResponse");
    const record = assertOneRecord(
      records,
      {
        kind: "execution",
        method: EXECUTE,
        instanceName: "",
        code: Code.FAILED_PRECONDITION,
        status: "FAILED_PRECONDITION",
        reason: outcome?.response?.status?.message,
        client: {
          toolName: "bazel",
          toolVersion: "4.2.3",
          actionId: BAZEL_METADATA.actionId,
          toolInvocationId: BAZEL_METADATA.toolInvocationId,
          correlatedInvocationsId: BAZEL_METADATA.correlatedInvocationsId,
          actionMnemonic: "Genrule",
          targetId: "//pkg:scratch",
          configurationId: "k8-fastbuild",
        },
      },
      LEVEL.info,
    );
    assert.match(record.reason as string, /pool=gpu-large/);
    assert.match(record.msg, /Execute .*bazel 4\.2\.3, Genrule \/\/pkg:scratch.*FAILED_PRECONDITION: .*pool=gpu-large/);
  });

  test("every other kind of refused Execute and WaitExecution is one info record: missing blobs, limits, network and image policy, a bad request, an unknown operation", async () => {
    const salt = () => `${Math.random()}`;
    const missing = sha256(Buffer.from(`never uploaded ${salt()}`));
    const tooLong = await uploadAction(admin, { args: ["true"], timeoutSeconds: 3600, salt: salt() });
    const network = await uploadAction(admin, {
      args: ["true"],
      platform: [{ name: "network", value: "external" }],
      salt: salt(),
    });
    const foreignImage = await uploadAction(admin, {
      args: ["true"],
      platform: [{ name: "container-image", value: "docker://127.0.0.1:9/someone/else:1" }],
      salt: salt(),
    });
    const cases: { what: string; request: ReturnType<typeof executeRequest>; code: number; reason: RegExp }[] = [
      { what: "missing action", request: executeRequest(missing), code: Code.FAILED_PRECONDITION, reason: /missing/ },
      { what: "timeout past the limit", request: executeRequest(tooLong), code: Code.INVALID_ARGUMENT, reason: /60 s/ },
      { what: "network", request: executeRequest(network), code: Code.FAILED_PRECONDITION, reason: /network/ },
      { what: "image policy", request: executeRequest(foreignImage), code: Code.PERMISSION_DENIED, reason: /allowed/ },
      {
        what: "a request that does not decode (size_bytes of 2^62)",
        request: { ...executeRequest({ hash: missing.hash, sizeBytes: 2 ** 62 }), instanceName: "unread" },
        code: Code.INVALID_ARGUMENT,
        reason: /not a valid Execute request/,
      },
      {
        what: "reserved instance name",
        request: { ...executeRequest(missing), instanceName: "a/blobs" },
        code: Code.INVALID_ARGUMENT,
        reason: /reserved/,
      },
    ];
    for (const { what, request, code, reason } of cases) {
      let outcome: Awaited<ReturnType<typeof executeCall>> | undefined;
      const records = await recordsOf(async () => {
        outcome = await executeCall(admin, request, withRequestMetadata());
      });
      const answered = outcome?.error?.code ?? outcome?.response?.status?.code;
      assert.equal(answered, code, `${what}: ${outcome?.error?.details ?? outcome?.response?.status?.message}`);
      // A request that does not decode names no instance the log could believe.
      const instanceName = request.instanceName === "unread" ? undefined : request.instanceName;
      const record = assertOneRecord(records, { kind: "execution", method: EXECUTE, instanceName, code }, LEVEL.info);
      assert.match(record.reason as string, reason, what);
      assert.equal((record.client as { targetId?: string }).targetId, "//pkg:scratch", what);
    }

    // WaitExecution of an operation that was refused, and of one that does not exist: one record per call.
    const refused = await executeCall(admin, executeRequest(network));
    assert.ok(refused.operationName.startsWith("operations/"));
    const waitRecords = await recordsOf(() => waitExecutionCall(admin, refused.operationName, withRequestMetadata()));
    assertOneRecord(
      waitRecords,
      { kind: "execution", method: WAIT_EXECUTION, instanceName: "", code: Code.FAILED_PRECONDITION },
      LEVEL.info,
    );
    let unknown: Awaited<ReturnType<typeof waitExecutionCall>> | undefined;
    const unknownRecords = await recordsOf(async () => {
      unknown = await waitExecutionCall(admin, "operations/no-such-operation", withRequestMetadata());
    });
    assert.equal(unknown?.error?.code, Code.NOT_FOUND);
    assertOneRecord(unknownRecords, { kind: "execution", method: WAIT_EXECUTION, code: Code.NOT_FOUND }, LEVEL.info);
  });

  test("a method the farm answers UNIMPLEMENTED, registered or not registered at all, is one info record", async () => {
    const listRecords = await recordsOf(async () => {
      const code = await statusOf(
        unaryCall(
          admin.operations.listOperations.bind(admin.operations),
          { name: "", filter: "", pageSize: 0, pageToken: "", returnPartialSuccess: false },
          withRequestMetadata(),
        ),
      );
      assert.equal(code, Code.UNIMPLEMENTED);
    });
    assertOneRecord(
      listRecords,
      { kind: "unimplemented", method: "/google.longrunning.Operations/ListOperations", code: Code.UNIMPLEMENTED },
      LEVEL.info,
    );

    const splitRecords = await recordsOf(async () => {
      const code = await statusOf(
        unaryCall(
          admin.cas.splitBlob.bind(admin.cas),
          { instanceName: "", blobDigest: EMPTY_SHA256, digestFunction: 0, chunkingFunction: 0 },
          withRequestMetadata(),
        ),
      );
      assert.equal(code, Code.UNIMPLEMENTED);
    });
    assertOneRecord(
      splitRecords,
      {
        kind: "unimplemented",
        method: "/build.bazel.remote.execution.v2.ContentAddressableStorage/SplitBlob",
        instanceName: "",
      },
      LEVEL.info,
    );

    // No service of this farm has this path: grpc-js alone would answer it, before any interceptor.
    const path = "/build.bazel.remote.logstream.v1.LogStream/CreateLogStream";
    let error: ServiceError | undefined;
    const records = await recordsOf(async () => {
      error = await rawUnaryCall(farm.address, path, withRequestMetadata());
    });
    assert.equal(error?.code, Code.UNIMPLEMENTED, error?.details);
    const record = assertOneRecord(
      records,
      { kind: "unimplemented", method: path, code: Code.UNIMPLEMENTED, status: "UNIMPLEMENTED" },
      LEVEL.info,
    );
    assert.equal((record.client as { toolName?: string }).toolName, "bazel");
    assert.match(record.msg, /LogStream\/CreateLogStream/);
  });

  test("authentication and authorization failures are one warn record each: no token, a wrong one, another instance, another instance's operation, a worker without the worker token", async () => {
    const findMissing = (clients: Clients, instanceName: string) =>
      unaryCall(
        clients.cas.findMissingBlobs.bind(clients.cas),
        { instanceName, blobDigests: [EMPTY_SHA256], digestFunction: 0 },
        withRequestMetadata(),
      );
    const anonymous = connect(farm.address);
    try {
      const noToken = await recordsOf(async () => assert.equal(await statusOf(findMissing(anonymous, "")), 16));
      const record = assertOneRecord(
        noToken,
        {
          kind: "authentication",
          method: "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
          code: Code.UNAUTHENTICATED,
          // Refused on its headers: the request of a caller not known is not read.
          instanceName: undefined,
        },
        LEVEL.warn,
      );
      assert.equal((record.client as { toolName?: string }).toolName, "bazel");
      assert.match(String(record.peer), /127\.0\.0\.1/);
    } finally {
      anonymous.close();
    }

    const wrong = await recordsOf(async () => assert.equal(await statusOf(findMissing(stranger, "")), 16));
    assertOneRecord(wrong, { kind: "authentication", code: Code.UNAUTHENTICATED }, LEVEL.warn);

    const otherInstance = await recordsOf(async () =>
      assert.equal(await statusOf(findMissing(team, "not-the-team")), Code.PERMISSION_DENIED),
    );
    const denied = assertOneRecord(
      otherInstance,
      { kind: "authorization", code: Code.PERMISSION_DENIED, instanceName: "not-the-team" },
      LEVEL.warn,
    );
    assert.match(denied.reason as string, /"team" may not use the instance name "not-the-team"/);

    const action = await uploadAction(admin, {
      args: ["true"],
      platform: [{ name: "pool", value: "nowhere" }],
      salt: `${Math.random()}`,
    });
    const adminsOperation = await executeCall(admin, executeRequest(action));
    const hidden = await recordsOf(async () => {
      const outcome = await waitExecutionCall(team, adminsOperation.operationName, withRequestMetadata());
      assert.equal(outcome.error?.code, Code.NOT_FOUND);
    });
    assertOneRecord(
      hidden,
      { kind: "authorization", method: WAIT_EXECUTION, code: Code.NOT_FOUND, instanceName: "" },
      LEVEL.warn,
    );

    const workerRecords = await recordsOf(async () => {
      const channel = clientChannel({ address: farm.address, token: WRONG_TOKEN });
      const hub = new WorkerHubClient(channel.target, channel.credentials, channel.options);
      const code = await new Promise<number>((resolve) => {
        const stream = hub.connect();
        stream.on("data", () => {});
        stream.on("error", (err: ServiceError) => resolve(err.code));
        stream.write({ hello: { workerName: "rogue", properties: [], slots: 1 } });
      });
      hub.close();
      assert.equal(code, Code.UNAUTHENTICATED);
    });
    assertOneRecord(
      workerRecords,
      { kind: "authentication", method: "/berth.worker.v1.WorkerHub/Connect", code: Code.UNAUTHENTICATED },
      LEVEL.warn,
    );
  });

  test("a garbage requestmetadata-bin header is logged as unreadable and breaks no call", async () => {
    const garbage = Buffer.from([0x0a, 0x40, 0xff, 0xfe]); // tool_details, 64 bytes long, of which 2 are there
    // A call that succeeds is not disturbed (nor logged above debug).
    const quiet = await recordsOf(async () => {
      const response = await unaryCall(
        admin.cas.findMissingBlobs.bind(admin.cas),
        { instanceName: "", blobDigests: [EMPTY_SHA256], digestFunction: 0 },
        withRequestMetadata(garbage),
      );
      assert.deepEqual(response.missingBlobDigests, []);
    });
    assert.deepEqual(quiet, []);

    const action = await uploadAction(admin, {
      args: ["true"],
      platform: [{ name: "pool", value: "garbage-header" }],
      salt: `${Math.random()}`,
    });
    let outcome: Awaited<ReturnType<typeof executeCall>> | undefined;
    const records = await recordsOf(async () => {
      outcome = await executeCall(admin, executeRequest(action), withRequestMetadata(garbage));
    });
    assert.equal(outcome?.response?.status?.code, Code.FAILED_PRECONDITION, "the refusal itself, not INTERNAL");
    const record = assertOneRecord(records, { kind: "execution", method: EXECUTE, client: undefined }, LEVEL.info);
    assert.match(String(record.requestMetadataError), /not a RequestMetadata message/);
    assert.match(record.msg, /unreadable RequestMetadata/);
  });

  test("credentials in the call's headers, in the image URL and in platform properties appear in no record at any level", async () => {
    const from = captured.lines.length;
    const salt = () => `${Math.random()}`;
    const urlCredentials = await uploadAction(admin, {
      args: ["true"],
      platform: [{ name: "container-image", value: `docker://alice:${URL_PASSWORD}@registry.example/private/img:1` }],
      salt: salt(),
    });
    const platformCredentials = await uploadAction(admin, {
      args: ["true"],
      platform: [
        { name: "container-image", value: "docker://registry.example/private/img:1" },
        { name: "container-registry-username", value: "alice" },
        { name: "container-registry-password", value: PLATFORM_PASSWORD },
      ],
      salt: salt(),
    });
    const byUrl = await executeCall(withCredentials, executeRequest(urlCredentials), withRequestMetadata());
    // Control: the client is told what it sent (its own password), so the log had it to leave out.
    assert.equal(byUrl.response?.status?.code, Code.INVALID_ARGUMENT);
    assert.ok(byUrl.response?.status?.message.includes(URL_PASSWORD), byUrl.response?.status?.message);
    const byPlatform = await executeCall(withCredentials, executeRequest(platformCredentials), withRequestMetadata());
    assert.equal(byPlatform.response?.status?.code, Code.FAILED_PRECONDITION, byPlatform.response?.status?.message);

    // A wrong token, and a token sent as the wrong kind of authorization header.
    const wrongCall = connect(farm.address, {
      token: WRONG_TOKEN,
      headers: [[REGISTRY_CREDENTIALS_HEADER, `registry.example=alice:${HEADER_PASSWORD}`]],
    });
    const basic = connect(farm.address, { headers: [["authorization", `Basic ${WRONG_TOKEN}`]] });
    try {
      for (const clients of [wrongCall, basic]) {
        const refused = await executeCall(clients, executeRequest(urlCredentials));
        assert.equal(refused.error?.code, Code.UNAUTHENTICATED);
      }
    } finally {
      wrongCall.close();
      basic.close();
    }

    const lines = captured.lines.slice(from);
    const refusals = lines.filter((line) => line.includes('"event":"call refused"'));
    assert.equal(refusals.length, 4, "the scan reads the records of these four refused calls");
    assert.ok(
      refusals.some((line) => line.includes("docker://***@registry.example")),
      `the URL is shown, redacted: ${refusals.join("")}`,
    );
    const secrets = [
      ADMIN_TOKEN,
      WRONG_TOKEN,
      HEADER_PASSWORD,
      URL_PASSWORD,
      PLATFORM_PASSWORD,
      Buffer.from(`alice:${HEADER_PASSWORD}`).toString("base64"),
    ];
    for (const line of lines) {
      for (const secret of secrets) assert.ok(!line.includes(secret), `a record holds a credential: ${line}`);
    }
  });

  test("calls that succeed, a whole execution included, write nothing at info or above", async () => {
    const action = await uploadAction(admin, { args: ["sh", "-c", "echo quiet"], salt: `${Math.random()}` });
    let outcome: Awaited<ReturnType<typeof executeCall>> | undefined;
    const records = await recordsOf(async () => {
      outcome = await executeCall(admin, executeRequest(action, { skipCacheLookup: true }), withRequestMetadata());
      await unaryCall(admin.capabilities.getCapabilities.bind(admin.capabilities), { instanceName: "" });
    });
    assert.equal(outcome?.response?.status?.code ?? Code.OK, Code.OK, outcome?.response?.status?.message);
    assert.equal(outcome?.response?.result?.exitCode, 0);
    assert.deepEqual(
      records.filter((r) => r.event === "call refused" || r.method !== undefined),
      [],
      "no record of a successful call",
    );
  });
});
