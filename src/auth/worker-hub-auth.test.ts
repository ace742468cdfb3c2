import assert from "node:assert/strict";
import { chmod, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { ServiceError } from "@grpc/grpc-js";
import { decodeOperation, executeRequest, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { type HubMessage, WorkerHubClient } from "../gen/berth/worker/v1/worker.js";
import type { Operation } from "../gen/google/longrunning/operations.js";
import { Code } from "../status/status.js";
import { clientChannel } from "./client-channel.js";
import { TokenFileError } from "./token-file.js";

/** A worker written by someone else: it says hello and records everything the hub sends, until the stream ends. */
async function joinHub(
  address: string,
  token: string | undefined,
  properties: { name: string; value: string }[],
  until: (messages: HubMessage[]) => boolean,
  waitMs = 3000,
): Promise<{ messages: HubMessage[]; error: ServiceError | undefined; close(): void }> {
  const channel = clientChannel({ address, token });
  const client = new WorkerHubClient(channel.target, channel.credentials, channel.options);
  const stream = client.connect();
  const messages: HubMessage[] = [];
  const error = await new Promise<ServiceError | undefined>((resolve) => {
    const timer = setTimeout(() => resolve(undefined), waitMs);
    stream.on("data", (message: HubMessage) => {
      messages.push(message);
      if (until(messages)) {
        clearTimeout(timer);
        resolve(undefined);
      }
    });
    stream.on("error", (err: ServiceError) => {
      clearTimeout(timer);
      resolve(err);
    });
    stream.write({ hello: { workerName: `rogue-${Math.random()}`, properties, slots: 4 } });
  });
  return {
    messages,
    error,
    close: () => {
      stream.cancel();
      client.close();
    },
  };
}

describe("only the farm's workers are workers", () => {
  let farm: TestFarm;
  const pool = [{ name: "pool", value: "hub-auth" }];
  before(async () => {
    farm = await startTestFarm({}, undefined, { workers: 1, properties: pool });
  });
  after(() => farm?.close());

  test("a WorkerHub client without the token, or with a wrong one, gets UNAUTHENTICATED and no assignment while an action waits; with the token it gets it, and the farm's own worker runs everything", async () => {
    // The farm's only worker is busy with the first action, so the second waits in the queue.
    const busy = await uploadAction(farm.clients, {
      args: ["sh", "-c", "sleep 2; echo first"],
      platform: pool,
      salt: `${Math.random()}`,
    });
    const waiting = await uploadAction(farm.clients, {
      args: ["sh", "-c", "echo second"],
      platform: pool,
      salt: `${Math.random()}`,
    });
    const follow = (digest: typeof busy) =>
      new Promise<Operation[]>((resolve, reject) => {
        const updates: Operation[] = [];
        const stream = farm.clients.execution.execute(executeRequest(digest));
        stream.on("data", (op: Operation) => updates.push(op));
        stream.on("error", reject);
        stream.on("end", () => resolve(updates));
      });
    const first = follow(busy);
    await new Promise((r) => setTimeout(r, 300));
    const second = follow(waiting);
    await new Promise((r) => setTimeout(r, 200));

    const stranger = await joinHub(farm.address, undefined, pool, (m) => m.length > 0);
    stranger.close();
    assert.equal(stranger.error?.code, Code.UNAUTHENTICATED, String(stranger.error));
    assert.deepEqual(stranger.messages, [], "a worker without a token must receive nothing, not even a welcome");

    const guesser = await joinHub(farm.address, "not-the-farm-token", pool, (m) => m.length > 0);
    guesser.close();
    assert.equal(guesser.error?.code, Code.UNAUTHENTICATED, String(guesser.error));
    assert.deepEqual(guesser.messages, []);

    // A client's own header forms do not pass either: a malformed authorization is refused, not ignored.
    const malformed = await joinHub(farm.address, "", pool, (m) => m.length > 0);
    malformed.close();
    assert.equal(malformed.error?.code, Code.UNAUTHENTICATED);

    // The right token: the hub welcomes the worker and hands it the waiting action.
    const holder = await joinHub(farm.address, farm.workerToken, pool, (m) => m.some((x) => x.assignment), 10_000);
    assert.equal(holder.error, undefined, String(holder.error));
    assert.ok(holder.messages[0]?.welcome, "the first message is the welcome");
    const assignment = holder.messages.find((m) => m.assignment)?.assignment;
    assert.deepEqual(assignment?.command?.arguments, ["sh", "-c", "echo second"]);
    // It leaves without answering: the action goes back to the queue, and the farm's own worker runs both.
    holder.close();

    for (const [run, expected] of [
      [first, "first"],
      [second, "second"],
    ] as const) {
      const last = decodeOperation((await run).at(-1) as Operation);
      assert.equal(last.response?.status?.code ?? 0, Code.OK, last.response?.status?.message);
      assert.equal(last.response?.result?.exitCode, 0, `the ${expected} action ran`);
    }
  });
});

describe("the farm's worker token", () => {
  test("is made once in the data directory with mode 0600, and the same secret is used after a restart", async () => {
    let farm = await startTestFarm();
    try {
      const path = join(farm.config.dataDir, "worker-token");
      const info = await stat(path);
      assert.equal(info.mode & 0o777, 0o600);
      assert.equal(info.uid, process.getuid?.());
      assert.equal((await readFile(path, "utf8")).trim(), farm.workerToken);
      assert.ok(farm.workerToken.length >= 43, "32 random bytes");
      const before = farm.workerToken;
      farm = await farm.restart();
      assert.equal(farm.workerToken, before);
      assert.equal((await stat(path)).mode & 0o777, 0o600);
    } finally {
      await farm.close();
    }
  });

  test("a token file others could read is refused at start, naming the file, rather than trusted", async () => {
    const farm = await startTestFarm();
    const path = join(farm.config.dataDir, "worker-token");
    try {
      await chmod(path, 0o644);
      await assert.rejects(farm.restart(), (err: Error) => {
        assert.ok(err instanceof TokenFileError, String(err));
        assert.match(err.message, /worker-token is open to group or others \(mode 644\).*chmod 600 /);
        return true;
      });
    } finally {
      await chmod(path, 0o600);
      await farm.close().catch(() => {});
    }
  });
});
