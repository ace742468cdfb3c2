import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { executeRequest, uploadAction } from "../../test/support/actions.js";
import { type Clients, connect, startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { clientChannel } from "../auth/client-channel.js";
import { type Assignment, type HubMessage, WorkerHubClient } from "../gen/berth/worker/v1/worker.js";

const TEAM_A = "team-a-token-0123456789abcdef0123456789";
const TEAM_B = "team-b-token-0123456789abcdef0123456789";
const hex = (token: string) => createHash("sha256").update(token).digest("hex");
/** Only the capturing worker below offers it, so the farm's actions go to it. */
const POOL = { name: "pool", value: "runner-keys" };

/**
 * A worker that records the assignments the hub sends it (and never
 * completes them): it shows what reaches a worker, as a real one gets it.
 */
function capturingWorker(farm: TestFarm): { assignments: Assignment[]; next(): Promise<Assignment>; close(): void } {
  const channel = clientChannel({ address: farm.address, token: farm.workerToken });
  const client = new WorkerHubClient(channel.target, channel.credentials, channel.options);
  const stream = client.connect();
  const assignments: Assignment[] = [];
  const waiting: ((a: Assignment) => void)[] = [];
  stream.on("data", (message: HubMessage) => {
    if (!message.assignment) return;
    const wake = waiting.shift();
    if (wake) wake(message.assignment);
    else assignments.push(message.assignment);
  });
  stream.on("error", () => {});
  stream.write({ hello: { workerName: "capture", properties: [POOL], slots: 16 } });
  return {
    assignments,
    next: () => {
      const ready = assignments.shift();
      return ready ? Promise.resolve(ready) : new Promise((resolve) => waiting.push(resolve));
    },
    close: () => {
      stream.cancel();
      client.close();
    },
  };
}

describe("runner keys: what a warm runner is kept for", () => {
  let dir: string;
  let farm: TestFarm;
  let teamA: Clients;
  let teamB: Clients;
  let forger: Clients;
  let worker: ReturnType<typeof capturingWorker>;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "berth-runner-keys-"));
    const tokensFile = join(dir, "tokens.yaml");
    await writeFile(
      tokensFile,
      [
        "tokens:",
        `  - { name: team-a, sha256: ${hex(TEAM_A)}, instances: ["*"] }`,
        `  - { name: team-b, sha256: ${hex(TEAM_B)}, instances: ["*"] }`,
      ].join("\n"),
      { mode: 0o600 },
    );
    farm = await startTestFarm({ auth: { tokensFile } });
    teamA = connect(farm.address, { token: TEAM_A });
    teamB = connect(farm.address, { token: TEAM_B });
    // Team B, claiming in a header to be team A.
    forger = connect(farm.address, { token: TEAM_B, headers: [["x-berth-caller", "team-a"]] });
    worker = capturingWorker(farm);
  });
  after(async () => {
    worker?.close();
    for (const clients of [teamA, teamB, forger]) clients?.close();
    await farm?.close();
    await rm(dir, { recursive: true, force: true });
  });

  /** The runner key the worker is given for an action of `clients` with these properties (and `salt`). */
  async function keyOf(clients: Clients, properties: { name: string; value: string }[], salt: string) {
    const action = await uploadAction(clients, {
      args: ["true"],
      platform: [POOL, ...properties],
      salt,
      doNotCache: true,
    });
    clients.execution.execute(executeRequest(action)).on("error", () => {});
    return (await worker.next()).runnerKey;
  }

  test("the same platform from the same client is one key; another client, recycling key or instance of the platform is another; a forged caller header changes nothing", async () => {
    const recycle = [{ name: "recycle-runner", value: "true" }];
    const a1 = await keyOf(teamA, recycle, "1");
    const a2 = await keyOf(teamA, recycle, "2");
    const b = await keyOf(teamB, recycle, "3");
    const forged = await keyOf(forger, recycle, "4");
    const otherKey = await keyOf(teamA, [...recycle, { name: "runner-recycling-key", value: "db" }], "5");
    const none = await keyOf(teamA, [], "6");
    assert.match(a1, /^[0-9a-f]{64}$/);
    assert.equal(a2, a1, "two actions of one client and platform share a key");
    assert.notEqual(b, a1, "another client's runner is never this one's");
    assert.equal(forged, b, "the caller header is set by the access check, not by the caller");
    assert.notEqual(otherKey, a1);
    assert.equal(none, "", "no key without recycle-runner");
  });
});
