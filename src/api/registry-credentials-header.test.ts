import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { Writable } from "node:stream";
import { after, before, describe, test } from "node:test";
import { pino } from "pino";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { type Clients, connect, startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { busyboxImage, MARKER_PATH, startRegistry, type TestRegistry } from "../../test/support/registry.js";
import { Code } from "../status/status.js";
import { REGISTRY_CREDENTIALS_HEADER } from "./registry-credentials-header.js";

/** Every file below `dir` (the farm's whole data directory: CAS, action cache, logs, worker files). */
async function filesBelow(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { withFileTypes: true, recursive: true });
  return entries.filter((e) => e.isFile()).map((e) => join(e.parentPath, e.name));
}

let registry: TestRegistry;
let image: string;
before(async () => {
  registry = await startRegistry({ auth: "basic" });
  image = await registry.push(await busyboxImage("private image"), "private/busybox", "1");
});
after(() => registry?.stop());

for (const mode of ["mount", "expand"] as const) {
  describe(`registry credentials in a request header (${mode} mode)`, () => {
    let farm: TestFarm;
    let withHeader: Clients;
    let wrongHeader: Clients;
    const logs: string[] = [];
    before(async () => {
      const sink = new Writable({
        write(chunk, _encoding, done) {
          logs.push(String(chunk));
          done();
        },
      });
      farm = await startTestFarm({ images: { mode }, logLevel: "trace" }, undefined, {
        workers: 1,
        log: pino({ level: "trace" }, sink),
      });
      const header = `${registry.host}=${registry.username}:${registry.password}`;
      withHeader = connect(farm.address, { headers: [[REGISTRY_CREDENTIALS_HEADER, header]] });
      wrongHeader = connect(farm.address, {
        headers: [[REGISTRY_CREDENTIALS_HEADER, `${registry.host}=${registry.username}:not-the-password`]],
      });
    });
    after(async () => {
      withHeader?.close();
      wrongHeader?.close();
      await farm?.close();
    });

    const runInPrivateImage = async (clients: Clients) => {
      const action = await uploadAction(clients, {
        args: ["sh", "-c", `cat /${MARKER_PATH}`],
        platform: [{ name: "container-image", value: `docker://${image}` }],
        salt: `${Math.random()}`,
      });
      return execute(clients, action, { skipCacheLookup: true });
    };

    test("the private image runs with the header's credentials, and is refused without them or with a wrong password", async () => {
      const anonymous = (await runInPrivateImage(farm.clients)).response;
      assert.notEqual(anonymous.status?.code ?? 0, Code.OK, "the registry needs credentials");
      const wrong = (await runInPrivateImage(wrongHeader)).response;
      assert.notEqual(wrong.status?.code ?? 0, Code.OK, "a wrong password is refused by the registry");

      const { response, updates } = await runInPrivateImage(withHeader);
      assert.equal(response.status?.code ?? 0, Code.OK, response.status?.message);
      assert.equal(response.result?.exitCode, 0);
      assert.equal(await readBlob(farm.clients, response.result?.stdoutDigest), "private image\n");
      // Nor in what the client is told about the operation.
      assert.ok(!JSON.stringify(updates).includes(registry.password));
    });

    test("the password is in no file of the data directory (CAS, action cache, worker) and in no log line", async () => {
      const secrets = [
        Buffer.from(registry.password),
        Buffer.from(`${registry.username}:${registry.password}`).toString("base64"),
      ].map((s) => Buffer.from(s));
      const files = await filesBelow(farm.config.dataDir);
      assert.ok(files.length > 10, "the scan reads the real data directory");
      for (const file of files) {
        const data = await readFile(file).catch(() => Buffer.alloc(0));
        for (const secret of secrets) assert.equal(data.indexOf(secret), -1, `${file} holds the registry password`);
      }
      const text = logs.join("");
      assert.match(text, /worker test-0 joined/, "the scan reads the farm's real log");
      for (const secret of secrets) assert.ok(!text.includes(secret.toString()), "a log line holds the password");
    });

    test("control: sent as platform properties instead, the password does land in the CAS (inside the Command blob)", async () => {
      const action = await uploadAction(farm.clients, {
        args: ["sh", "-c", `cat /${MARKER_PATH}`],
        platform: [
          { name: "container-image", value: `docker://${image}` },
          { name: "container-registry-username", value: registry.username },
          { name: "container-registry-password", value: registry.password },
        ],
        salt: `${Math.random()}`,
      });
      const { response } = await execute(farm.clients, action);
      assert.equal(response.result?.exitCode, 0, response.status?.message);
      const password = Buffer.from(registry.password);
      let found = false;
      for (const file of await filesBelow(farm.config.dataDir)) {
        if ((await readFile(file).catch(() => Buffer.alloc(0))).includes(password)) found = true;
      }
      assert.ok(found, "the scan above would have seen a password that was stored");
    });
  });
}
