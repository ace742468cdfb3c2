import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { parseWwwAuthenticate } from "./www-authenticate.js";

describe("WWW-Authenticate", () => {
  it("parses a Bearer challenge as registries send it", () => {
    const header =
      'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull"';
    assert.deepEqual(parseWwwAuthenticate(header), [
      {
        scheme: "bearer",
        params: {
          realm: "https://auth.docker.io/token",
          service: "registry.docker.io",
          scope: "repository:library/ubuntu:pull",
        },
      },
    ]);
  });

  it("parses Basic, unquoted values, escapes and several challenges in one header", () => {
    assert.deepEqual(parseWwwAuthenticate('Basic realm="basic-realm"'), [
      { scheme: "basic", params: { realm: "basic-realm" } },
    ]);
    assert.deepEqual(parseWwwAuthenticate('Basic realm=x, Bearer realm="a\\"b", error=insufficient_scope'), [
      { scheme: "basic", params: { realm: "x" } },
      { scheme: "bearer", params: { realm: 'a"b', error: "insufficient_scope" } },
    ]);
    assert.deepEqual(parseWwwAuthenticate(""), []);
  });
});
