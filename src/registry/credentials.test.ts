import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { inspect } from "node:util";
import {
  Credentials,
  composeCredentials,
  normalizeRegistryKey,
  parseDockerConfig,
  staticCredentials,
} from "./credentials.js";

const SECRET = "s3cret-pa55word";

describe("credentials", () => {
  it("never print their password", () => {
    const c = new Credentials("alice", SECRET);
    for (const form of [String(c), `${c}`, JSON.stringify({ c }), inspect(c), inspect({ nested: [c] })]) {
      assert.ok(!form.includes(SECRET), form);
    }
    assert.equal(c.password, SECRET);
    assert.equal(c.basicAuthorization(), `Basic ${Buffer.from(`alice:${SECRET}`).toString("base64")}`);
    assert.notEqual(c.fingerprint(), new Credentials("alice", "other").fingerprint());
  });

  it("read Docker config.json entries under every key form Docker writes", async () => {
    const auth = (user: string) => Buffer.from(`${user}:${SECRET}:with-colon`).toString("base64");
    const source = parseDockerConfig(
      JSON.stringify({
        auths: {
          "https://index.docker.io/v1/": { auth: auth("hub") },
          "https://registry.example.com": { auth: auth("https-key") },
          "plain.example:5000": { username: "fields", password: SECRET },
          "broken.example": { auth: "bm9jb2xvbg==" },
        },
        credsStore: "desktop",
      }),
      "/home/x/.docker/config.json",
    );
    const hub = await source.lookup("docker.io");
    assert.equal(hub?.credentials.username, "hub");
    assert.equal(hub?.credentials.password, `${SECRET}:with-colon`);
    assert.equal(hub?.origin, "/home/x/.docker/config.json");
    assert.equal((await source.lookup("registry.example.com"))?.credentials.username, "https-key");
    assert.equal((await source.lookup("plain.example:5000"))?.credentials.username, "fields");
    assert.equal(await source.lookup("broken.example"), undefined);
    assert.equal(await source.lookup("other.example"), undefined);
  });

  it("refuse a malformed config.json without quoting it", () => {
    assert.throws(
      () => parseDockerConfig(`{"auths": ${SECRET}`, "/c.json"),
      (err: Error) => {
        assert.equal(err.message, "/c.json is not valid JSON");
        return true;
      },
    );
  });

  it("take the first source that knows the registry", async () => {
    const first = staticCredentials({ "a.example": { username: "first", password: "p" } }, "first");
    const second = staticCredentials(
      { "A.example": { username: "second", password: "p" }, "b.example": { username: "b", password: "p" } },
      "second",
    );
    const composed = composeCredentials(undefined, first, second);
    assert.equal((await composed.lookup("a.example"))?.origin, "first");
    assert.equal((await composed.lookup("b.example"))?.origin, "second");
    assert.equal(await composed.lookup("c.example"), undefined);
  });

  it("normalize registry keys", () => {
    assert.equal(normalizeRegistryKey("https://index.docker.io/v1/"), "docker.io");
    assert.equal(normalizeRegistryKey("registry-1.docker.io"), "docker.io");
    assert.equal(normalizeRegistryKey("http://Host:5000/v2/"), "host:5000");
  });
});
