import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { inspect } from "node:util";
import { busyboxImage, startRegistry, type TestRegistry } from "../../test/support/registry.js";
import { type ImageReference, parseImageReference } from "../image/reference.js";
import { createRegistryClient } from "./client.js";
import { Credentials, dockerConfigCredentials, staticCredentials } from "./credentials.js";
import { RegistryError, type RegistryErrorKind } from "./errors.js";

const FAST_RETRY = { maxAttempts: 2, initialDelayMs: 10, maxDelayMs: 20 };
const WRONG_PASSWORD = "Wr0ng-secret-value-xyz";

/** Checks the kind and message, and that no form of the error shows a secret. */
async function rejectsWith(
  promise: Promise<unknown>,
  kind: RegistryErrorKind,
  message: RegExp,
  secrets: string[],
): Promise<void> {
  let caught: unknown;
  await assert.rejects(promise, (err: unknown) => {
    caught = err;
    return true;
  });
  assert.ok(caught instanceof RegistryError, String(caught));
  assert.equal(caught.kind, kind, caught.message);
  assert.match(caught.message, message);
  const forms = [
    caught.message,
    String(caught),
    inspect(caught, { depth: 10 }),
    JSON.stringify(caught),
    caught.stack ?? "",
  ];
  for (const secret of secrets) {
    for (const form of forms) {
      assert.ok(!form.includes(secret), `a secret appears in: ${form}`);
      assert.ok(!form.includes(Buffer.from(secret).toString("base64")), `a secret appears base64-encoded in: ${form}`);
    }
  }
}

describe("registry authentication", () => {
  let scratch: string;
  before(async () => {
    scratch = await mkdtemp(join(tmpdir(), "berth-registry-auth-"));
  });
  after(async () => {
    await rm(scratch, { recursive: true, force: true });
  });

  describe("Basic (htpasswd)", () => {
    let registry: TestRegistry;
    let ref: ImageReference;
    before(async () => {
      registry = await startRegistry({ auth: "basic" });
      ref = parseImageReference(await registry.push(await busyboxImage("basic"), "private/busybox", "v1"));
    });
    after(() => registry?.stop());

    it("pulls with the right credentials from Berth's configuration", async () => {
      const client = createRegistryClient({
        retry: FAST_RETRY,
        credentials: staticCredentials({
          [registry.host]: { username: registry.username, password: registry.password },
        }),
      });
      const resolved = await client.resolve(ref);
      const layer = resolved.layers[0];
      assert.ok(layer);
      const dir = join(scratch, "basic");
      await mkdir(dir, { recursive: true });
      await client.fetchBlob(ref, layer, dir);
    });

    it("refuses wrong credentials as unauthorized without showing the password", async () => {
      const client = createRegistryClient({
        retry: FAST_RETRY,
        credentials: staticCredentials({ [registry.host]: { username: registry.username, password: WRONG_PASSWORD } }),
      });
      await rejectsWith(
        client.resolve(ref),
        "unauthorized",
        new RegExp(
          `private/busybox:v1: the credentials for registry ${registry.host} from the Berth configuration were refused`,
        ),
        [WRONG_PASSWORD, `${registry.username}:${WRONG_PASSWORD}`],
      );
    });

    it("asks for credentials when none are configured", async () => {
      const client = createRegistryClient({ retry: FAST_RETRY });
      await rejectsWith(client.resolve(ref), "unauthorized", /requires credentials .* none are configured/, []);
    });

    it("prefers the request's credentials to configured ones", async () => {
      const client = createRegistryClient({
        retry: FAST_RETRY,
        credentials: staticCredentials({
          [registry.host]: { username: registry.username, password: registry.password },
        }),
      });
      const wrong = new Credentials(registry.username, WRONG_PASSWORD);
      await rejectsWith(
        client.resolve(ref, undefined, { credentials: wrong }),
        "unauthorized",
        /from the request's credentials were refused/,
        [WRONG_PASSWORD],
      );
      const right = new Credentials(registry.username, registry.password);
      const unconfigured = createRegistryClient({ retry: FAST_RETRY });
      assert.equal((await unconfigured.resolve(ref, undefined, { credentials: right })).layers.length, 1);
    });

    it("reads credentials from a Docker config.json (auth field, URL key)", async () => {
      const path = join(scratch, "config.json");
      const auth = Buffer.from(`${registry.username}:${registry.password}`).toString("base64");
      await writeFile(path, JSON.stringify({ auths: { [`https://${registry.host}/v1/`]: { auth } } }));
      const client = createRegistryClient({ retry: FAST_RETRY, credentials: await dockerConfigCredentials(path) });
      assert.equal((await client.resolve(ref)).layers.length, 1);

      const wrongAuth = Buffer.from(`${registry.username}:${WRONG_PASSWORD}`).toString("base64");
      await writeFile(path, JSON.stringify({ auths: { [registry.host]: { auth: wrongAuth } } }));
      const wrong = createRegistryClient({ retry: FAST_RETRY, credentials: await dockerConfigCredentials(path) });
      await rejectsWith(wrong.resolve(ref), "unauthorized", new RegExp(`from ${path} were refused`), [WRONG_PASSWORD]);
    });
  });

  describe("Bearer tokens", () => {
    let registry: TestRegistry;
    let ref: ImageReference;
    before(async () => {
      registry = await startRegistry({ auth: "token" });
      ref = parseImageReference(await registry.push(await busyboxImage("token"), "private/busybox", "v1"));
    });
    after(() => registry?.stop());

    it("fetches one token and reuses it for every request of the scope", async () => {
      const client = createRegistryClient({
        retry: FAST_RETRY,
        credentials: staticCredentials({
          [registry.host]: { username: registry.username, password: registry.password },
        }),
      });
      const before = registry.tokenRequests;
      const resolved = await client.resolve(ref);
      const dir = join(scratch, "token");
      await mkdir(dir, { recursive: true });
      for (const layer of resolved.layers) await client.fetchBlob(ref, layer, dir);
      await client.resolve(ref);
      // Manifest, config, layer, manifest again, config again: one token for all.
      assert.equal(registry.tokenRequests - before, 1);
    });

    it("refuses wrong credentials at the token service as unauthorized, without the password", async () => {
      const client = createRegistryClient({
        retry: FAST_RETRY,
        credentials: staticCredentials({ [registry.host]: { username: registry.username, password: WRONG_PASSWORD } }),
      });
      await rejectsWith(
        client.resolve(ref),
        "unauthorized",
        /were refused \(the token service http:\/\/127\.0\.0\.1:\d+ answered HTTP 401\)/,
        [WRONG_PASSWORD],
      );
    });

    it("reports an anonymous token without access as missing credentials", async () => {
      const client = createRegistryClient({ retry: FAST_RETRY });
      await rejectsWith(
        client.resolve(ref),
        "unauthorized",
        /requires credentials for repository:private\/busybox:pull/,
        [],
      );
    });
  });

  describe("plain HTTP", () => {
    let registry: TestRegistry;
    before(async () => {
      // The registry itself never contacts its realm; only a client would.
      registry = await startRegistry({ auth: "token", tokenRealm: "http://auth.berth-test.invalid/token" });
    });
    after(() => registry?.stop());

    it("never sends credentials to a token service over plain HTTP on a non-loopback host", async () => {
      const client = createRegistryClient({
        retry: FAST_RETRY,
        credentials: staticCredentials({ [registry.host]: { username: "u", password: WRONG_PASSWORD } }),
      });
      // A request would fail to resolve the .invalid host (unavailable); refusing it is `invalid`.
      await rejectsWith(
        client.resolve(parseImageReference(`${registry.host}/a/b:c`)),
        "invalid",
        /refusing to contact http:\/\/auth\.berth-test\.invalid over http: plain HTTP is only used for loopback hosts and registries configured as insecure/,
        [WRONG_PASSWORD],
      );
    });
  });
});
