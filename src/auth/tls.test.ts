import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import type { ServiceError } from "@grpc/grpc-js";
import { execute, uploadAction } from "../../test/support/actions.js";
import { sha256 } from "../../test/support/blobs.js";
import { makeCertificates } from "../../test/support/certificates.js";
import { BERTH_BIN, startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { type HubMessage, WorkerHubClient } from "../gen/berth/worker/v1/worker.js";
import {
  FindMissingBlobsRequest,
  FindMissingBlobsResponse,
  ServerCapabilities,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code } from "../status/status.js";
import { clientChannel } from "./client-channel.js";

const run = promisify(execFile);

/** `berth run` as a user types it; resolves with its exit code and output (never rejects). */
async function berthRun(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [BERTH_BIN, "run", ...args], { timeout: 60_000 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === "number" ? e.code : -1, stdout: e.stdout ?? "", stderr: e.stderr ?? "" };
  }
}

/**
 * A second client in another language: Python's grpcio (Debian's python3-grpcio), calling two REAPI methods
 * with raw serialized messages over TLS, with or without a client certificate. Prints each response in hex.
 */
const PYTHON_CLIENT = `
import sys, grpc
target, ca, cert, key, find_missing = sys.argv[1:6]
root = open(ca, "rb").read()
creds = grpc.ssl_channel_credentials(root, open(key, "rb").read(), open(cert, "rb").read()) if cert else grpc.ssl_channel_credentials(root)
channel = grpc.secure_channel(target, creds)
try:
    caps = channel.unary_unary("/build.bazel.remote.execution.v2.Capabilities/GetCapabilities")(b"", timeout=20)
    missing = channel.unary_unary("/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs")(bytes.fromhex(find_missing), timeout=20)
    print(caps.hex())
    print(missing.hex())
except grpc.RpcError as e:
    print("error", e.code().name, file=sys.stderr)
    sys.exit(3)
`;

async function pythonClient(address: string, dir: string, withCert: boolean) {
  const absent = sha256(`never stored ${Math.random()}`);
  const request = FindMissingBlobsRequest.encode({
    instanceName: "",
    blobDigests: [absent],
    digestFunction: 0,
  }).finish();
  const args = [
    "-c",
    PYTHON_CLIENT,
    address,
    join(dir, "ca.pem"),
    withCert ? join(dir, "client.pem") : "",
    withCert ? join(dir, "client.key") : "",
    Buffer.from(request).toString("hex"),
  ];
  try {
    const { stdout } = await run("/usr/bin/python3", args, { timeout: 60_000 });
    const [caps, missing] = stdout.trim().split("\n");
    return {
      ok: true as const,
      capabilities: ServerCapabilities.decode(Buffer.from(caps ?? "", "hex")),
      missing: FindMissingBlobsResponse.decode(Buffer.from(missing ?? "", "hex")),
      absent,
    };
  } catch (err) {
    return { ok: false as const, stderr: String((err as { stderr?: string }).stderr) };
  }
}

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "berth-tls-"));
  await makeCertificates(dir);
});
after(() => rm(dir, { recursive: true, force: true }));

describe("mTLS on the gRPC port (tls.requireClientCert)", () => {
  let farm: TestFarm;
  before(async () => {
    const tls = {
      certFile: join(dir, "server.pem"),
      keyFile: join(dir, "server.key"),
      clientCaFile: join(dir, "ca.pem"),
      requireClientCert: true,
    };
    const pem = (name: string) => readFile(join(dir, name));
    farm = await startTestFarm({ tls }, undefined, {
      // The farm's own workers come in through the data directory's socket, with their token and no certificate.
      workers: 1,
      clientConnection: {
        tls: { ca: await pem("ca.pem"), cert: await pem("client.pem"), key: await pem("client.key") },
      },
    });
  });
  after(() => farm?.close());

  const tlsFlags = (cert: string | undefined) => [
    "--tls-ca",
    join(dir, "ca.pem"),
    ...(cert ? ["--tls-cert", join(dir, `${cert}.pem`), "--tls-key", join(dir, `${cert}.key`)] : []),
  ];

  test("the farm's own workers connect through a Unix socket in the data directory that only root may open", async () => {
    const socket = await stat(join(farm.config.dataDir, "worker.sock"));
    assert.ok(socket.isSocket());
    assert.equal(socket.mode & 0o777, 0o600);
  });

  test("berth run with the CA and a client certificate runs its command over grpcs://", async () => {
    const result = await berthRun([
      "--server",
      `grpcs://${farm.address}`,
      ...tlsFlags("client"),
      "--",
      "sh",
      "-c",
      "echo over mTLS",
    ]);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout, "over mTLS\n");
  });

  test("berth run without a client certificate, with one from another CA, or in plain text, fails and runs nothing", async () => {
    for (const [what, args] of [
      ["no client certificate", ["--server", `grpcs://${farm.address}`, ...tlsFlags(undefined)]],
      ["a certificate from an untrusted CA", ["--server", `grpcs://${farm.address}`, ...tlsFlags("rogue-client")]],
      ["plain HTTP/2", ["--server", farm.address]],
    ] as const) {
      const result = await berthRun([...args, "--", "sh", "-c", "echo should not run"]);
      assert.notEqual(result.code, 0, `${what}: ${result.stdout}`);
      assert.equal(result.stdout, "", what);
      assert.match(
        result.stderr,
        /UNAVAILABLE|handshake|certificate|Connection dropped|ECONNRESET|failed to connect/i,
        what,
      );
    }
  });

  test("a second client, Python's grpcio, calls GetCapabilities and FindMissingBlobs over mTLS; without a certificate it cannot", async () => {
    const answer = await pythonClient(farm.address, dir, true);
    assert.ok(answer.ok, answer.ok ? "" : answer.stderr);
    assert.equal(answer.capabilities.executionCapabilities?.execEnabled, true);
    assert.deepEqual(answer.missing.missingBlobDigests, [answer.absent]);
    const refused = await pythonClient(farm.address, dir, false);
    assert.equal(refused.ok, false);
    if (!refused.ok) assert.match(refused.stderr, /error UNAVAILABLE/);
  });
});

describe("TLS without client certificates", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm(
      { tls: { certFile: join(dir, "server.pem"), keyFile: join(dir, "server.key") } },
      undefined,
      {
        workers: 1,
        clientConnection: { tls: { ca: await readFile(join(dir, "ca.pem")) } },
      },
    );
  });
  after(() => farm?.close());

  test("berth run trusting the farm's CA runs its command; trusting only the system's roots it fails", async () => {
    const ok = await berthRun([
      "--server",
      `grpcs://${farm.address}`,
      "--tls-ca",
      join(dir, "ca.pem"),
      "--",
      "echo",
      "over TLS",
    ]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal(ok.stdout, "over TLS\n");
    const untrusted = await berthRun(["--server", `grpcs://${farm.address}`, "--", "echo", "no"]);
    assert.notEqual(untrusted.code, 0);
    assert.equal(untrusted.stdout, "");
  });

  test("Python's grpcio with the CA only", async () => {
    const answer = await pythonClient(farm.address, dir, false);
    assert.ok(answer.ok, answer.ok ? "" : answer.stderr);
    assert.deepEqual(answer.missing.missingBlobDigests, [answer.absent]);
  });
});

describe("workers known by their certificate (auth.workerCertificateNames)", () => {
  let farm: TestFarm;
  const pool = [{ name: "pool", value: "certified" }];
  before(async () => {
    const tls = {
      certFile: join(dir, "server.pem"),
      keyFile: join(dir, "server.key"),
      clientCaFile: join(dir, "ca.pem"),
      requireClientCert: true,
    };
    farm = await startTestFarm({ tls, auth: { workerCertificateNames: ["worker-1"] } }, undefined, {
      clientConnection: { tls: await pemSet("client") },
    });
  });
  after(() => farm?.close());

  const pemSet = async (name: string) => ({
    ca: await readFile(join(dir, "ca.pem")),
    cert: await readFile(join(dir, `${name}.pem`)),
    key: await readFile(join(dir, `${name}.key`)),
  });

  /** Says hello on the hub with a certificate and no token; resolves with the first message or the error. */
  const helloWith = async (certificate: string) => {
    const channel = clientChannel({ address: farm.address, tls: await pemSet(certificate) });
    const client = new WorkerHubClient(channel.target, channel.credentials, channel.options);
    const stream = client.connect();
    const outcome = await new Promise<{ message?: HubMessage; error?: ServiceError }>((resolve) => {
      stream.on("data", (message: HubMessage) => resolve({ message }));
      stream.on("error", (error: ServiceError) => resolve({ error }));
      stream.write({ hello: { workerName: `by-cert-${Math.random()}`, properties: pool, slots: 1 } });
    });
    stream.cancel();
    client.close();
    return outcome;
  };

  test("a client certificate with a worker's name opens the hub without a token; another client certificate does not", async () => {
    const worker = await helloWith("worker-1");
    assert.ok(worker.message?.welcome, String(worker.error));
    const client = await helloWith("client");
    assert.equal(client.error?.code, Code.UNAUTHENTICATED, String(client.message));
  });

  test("berth worker with only --tls-cert joins over grpcs:// and runs an action", async () => {
    const workDir = join(dir, "cert-worker");
    const child = spawn(
      process.execPath,
      [
        BERTH_BIN,
        "worker",
        "--scheduler",
        `grpcs://${farm.address}`,
        "--name",
        "certified",
        "--slots",
        "1",
        "--work-dir",
        workDir,
        "--property",
        "pool=certified",
        "--log-level",
        "warn",
        "--tls-ca",
        join(dir, "ca.pem"),
        "--tls-cert",
        join(dir, "worker-1.pem"),
        "--tls-key",
        join(dir, "worker-1.key"),
      ],
      { stdio: ["ignore", "inherit", "inherit"] },
    );
    try {
      const action = await uploadAction(farm.clients, {
        args: ["echo", "certified"],
        platform: pool,
        salt: `${Math.random()}`,
      });
      const { response } = await execute(farm.clients, action);
      assert.equal(response.status?.code ?? 0, Code.OK, response.status?.message);
      assert.equal(response.result?.exitCode, 0);
      assert.equal(response.result?.executionMetadata?.worker, "certified-0");
    } finally {
      const exited = once(child, "exit");
      child.kill("SIGTERM");
      await exited;
    }
  });
});
