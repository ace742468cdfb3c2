import assert from "node:assert/strict";
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { once } from "node:events";
import { chmod, chown, mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { BERTH_BIN, connect, spawnBerth } from "../../test/support/farm.js";
import { waitFor } from "../../test/support/wait.js";
import { Code } from "../status/status.js";
import { newSecret } from "./secrets.js";

/**
 * On the host root an action sees every file its slot's uid may read, so a secret in a file others may read
 * is a secret every action may read: a worker token makes it a worker of a farm it can reach. Berth refuses
 * to start on such a file, naming it, its mode and the fix. Each case runs the real `berth` program.
 */
const exec = promisify(execFile);
const isRoot = process.getuid?.() === 0;
let dir: string;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "berth-private-files-"));
  // A server key and certificate, so that a private key file can also be shown to work.
  await exec(
    "openssl",
    ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
      .concat(["-keyout", "server.key", "-out", "server.pem", "-days", "2", "-subj", "/CN=localhost"])
      .concat(["-addext", "subjectAltName=IP:127.0.0.1"]),
    { cwd: dir },
  );
});
after(() => rm(dir, { recursive: true, force: true }));

interface Outcome {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `berth ARGS…` to its end (never rejects). */
async function berth(args: string[]): Promise<Outcome> {
  try {
    const { stdout, stderr } = await exec(process.execPath, [BERTH_BIN, ...args], {
      timeout: 30_000,
      killSignal: "SIGKILL",
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const failed = err as { code: number | string; stdout: string; stderr: string };
    return { code: typeof failed.code === "number" ? failed.code : -1, stdout: failed.stdout, stderr: failed.stderr };
  }
}

function assertRefused(outcome: Outcome, path: string, reason: RegExp): void {
  assert.equal(outcome.code, 2, `exit code; stderr: ${outcome.stderr}`);
  assert.ok(outcome.stderr.includes(path), `the message names ${path}: ${outcome.stderr}`);
  assert.match(outcome.stderr, reason);
  assert.doesNotMatch(outcome.stderr, /\n\s+at /, "one line, not a stack trace");
}

const GROUP_OR_OTHERS = /is open to group or others \(mode 644\).*chmod 600 /;

async function secretFile(name: string, content: string, mode: number): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, content);
  await chmod(path, mode);
  return path;
}

/** A configuration file, 0644 unless it holds credentials. */
async function configFile(name: string, config: object, mode = 0o644): Promise<string> {
  return secretFile(name, JSON.stringify(config), mode);
}

const serveArgs = (config: string, data: string) => [
  "serve",
  "--listen",
  "127.0.0.1:0",
  "--workers",
  "0",
  "--config",
  config,
  "--data-dir",
  data,
];

describe("berth serve refuses secret files others could read, naming them; 0600 starts", () => {
  const tokens = `tokens:\n  - { name: ci, sha256: ${"a".repeat(64)}, instances: ["*"] }\n`;
  const cases: { name: string; prepare: (mode: number) => Promise<{ config: string; secret: string }> }[] = [
    {
      name: "auth.tokensFile",
      prepare: async (mode) => {
        const secret = await secretFile("tokens.yaml", tokens, mode);
        return { secret, config: await configFile("tokens-config.json", { auth: { tokensFile: secret } }) };
      },
    },
    {
      name: "a file of auth.workerTokenFiles",
      prepare: async (mode) => {
        const secret = await secretFile("extra-worker.token", `${newSecret()}\n`, mode);
        return { secret, config: await configFile("workers-config.json", { auth: { workerTokenFiles: [secret] } }) };
      },
    },
    {
      name: "tls.keyFile",
      prepare: async (mode) => {
        const secret = join(dir, "server.key");
        await chmod(secret, mode);
        const tls = { certFile: join(dir, "server.pem"), keyFile: secret };
        return { secret, config: await configFile("tls-config.json", { tls }) };
      },
    },
    {
      name: "a config file holding images.credentials",
      prepare: async (mode) => {
        const images = { credentials: { "registry.example:5000": { username: "ci", password: "hunter2" } } };
        const secret = await configFile("credentials-config.json", { images }, mode);
        return { secret, config: secret };
      },
    },
    {
      name: "images.dockerConfig",
      prepare: async (mode) => {
        const auths = { auths: { "registry.example:5000": { auth: "Y2k6aHVudGVyMg==" } } };
        const secret = await secretFile("docker-config.json", JSON.stringify(auths), mode);
        return { secret, config: await configFile("docker-config-config.json", { images: { dockerConfig: secret } }) };
      },
    },
  ];

  for (const { name, prepare } of cases) {
    test(name, async () => {
      const data = join(dir, `data-${name.replace(/\W+/g, "-")}`);
      const exposed = await prepare(0o644);
      assertRefused(await berth(serveArgs(exposed.config, data)), exposed.secret, GROUP_OR_OTHERS);

      const kept = await prepare(0o600);
      const farm = await spawnBerth(serveArgs(kept.config, data).slice(3));
      assert.equal(await farm.stop(), 0);
    });
  }

  test("a worker token file that is a symlink, or belongs to another user, is refused too", {
    skip: !isRoot,
  }, async () => {
    const real = await secretFile("real.token", `${newSecret()}\n`, 0o600);
    const link = join(dir, "link.token");
    await symlink(real, link);
    const linked = await configFile("link-config.json", { auth: { workerTokenFiles: [link] } });
    assertRefused(await berth(serveArgs(linked, join(dir, "data-link"))), link, /is a symbolic link/);

    const foreign = await secretFile("foreign.token", `${newSecret()}\n`, 0o600);
    await chown(foreign, 65534, 65534);
    const owned = await configFile("foreign-config.json", { auth: { workerTokenFiles: [foreign] } });
    assertRefused(
      await berth(serveArgs(owned, join(dir, "data-foreign"))),
      foreign,
      /belongs to uid 65534, not to root.*chown 0 .*chmod 600 /,
    );
  });

  test("a 0644 config without credentials is fine: it holds no secret", async () => {
    const config = await configFile("plain-config.json", { execution: { allowNetwork: false } });
    const farm = await spawnBerth(serveArgs(config, join(dir, "data-plain")).slice(3));
    assert.equal(await farm.stop(), 0);
  });
});

describe("berth worker --token-file", { skip: !isRoot }, () => {
  let token: string;
  let farm: Awaited<ReturnType<typeof spawnBerth>>;
  before(async () => {
    // Where an operator keeps it (/etc/berth), in a directory anyone may search, outside the sandbox's own /tmp.
    const etc = await mkdtemp("/var/tmp/berth-etc-");
    await chmod(etc, 0o755);
    token = join(etc, "worker.token");
    await writeFile(token, `${newSecret()}\n`, { mode: 0o600 });
    const config = await configFile("remote-config.json", { auth: { workerTokenFiles: [token] } });
    farm = await spawnBerth(serveArgs(config, join(dir, "data-remote")).slice(3));
  });
  after(async () => {
    await farm.stop();
    await rm(dirname(token), { recursive: true, force: true });
  });

  const workerArgs = () => [
    "worker",
    "--scheduler",
    farm.address,
    "--token-file",
    token,
    "--name",
    "remote",
    "--slots",
    "1",
    "--work-dir",
    join(dir, "remote-work"),
    "--property",
    "pool=remote",
    "--log-level",
    "warn",
  ];

  test("a token file others could read is refused, naming it; at 0600 the worker joins, and its actions find /dev/null in its place", async () => {
    await chmod(token, 0o644);
    assertRefused(await berth(workerArgs()), token, GROUP_OR_OTHERS);

    await chmod(token, 0o600);
    await mkdir(join(dir, "remote-work"), { recursive: true });
    const child: ChildProcess = spawn(process.execPath, [BERTH_BIN, ...workerArgs()], { stdio: "ignore" });
    const clients = connect(farm.address);
    try {
      const action = await uploadAction(clients, {
        args: ["stat", "-c", "%F", token],
        platform: [{ name: "pool", value: "remote" }],
        salt: `${Math.random()}`,
      });
      // Until the worker has joined, no worker offers pool=remote and the action is refused at once.
      const response = await waitFor("the remote worker to join", async () => {
        const { response } = await execute(clients, action);
        return response.status?.code === Code.FAILED_PRECONDITION ? undefined : response;
      });
      assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
      assert.equal(response.result?.executionMetadata?.worker, "remote-0");
      // Masked (a second wall behind its mode): the action finds a device node, which it cannot open.
      assert.equal(await readBlob(clients, response.result?.stdoutDigest), "character special file\n");
    } finally {
      clients.close();
      const exited = once(child, "exit");
      child.kill("SIGTERM");
      await exited;
    }
  });
});

describe("berth run", () => {
  test("a --token-file or --tls-key others could read is refused before anything is sent, naming it", async () => {
    const token = await secretFile("client.token", `${newSecret()}\n`, 0o644);
    const refusedToken = await berth(["run", "--server", "127.0.0.1:1", "--token-file", token, "--", "true"]);
    assertRefused(refusedToken, token, GROUP_OR_OTHERS);

    const key = await secretFile("client.key", "not even a key\n", 0o644);
    const tlsArgs = ["--tls-ca", join(dir, "server.pem"), "--tls-cert", join(dir, "server.pem"), "--tls-key", key];
    const refusedKey = await berth(["run", "--server", "127.0.0.1:1", ...tlsArgs, "--", "true"]);
    assertRefused(refusedKey, key, GROUP_OR_OTHERS);
  });
});
