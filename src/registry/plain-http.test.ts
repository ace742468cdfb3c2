import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { parseImageReference } from "../image/reference.js";
import { Authenticator } from "./auth.js";
import { hostname, isLoopback, plainHttpAllowed, registryScheme, urlAllowed } from "./plain-http.js";
import { DEFAULT_RETRY } from "./retry.js";
import { RegistrySession } from "./session.js";
import { Transport } from "./transport.js";

const NONE = new Set<string>();

describe("plain HTTP policy", () => {
  it("uses plain HTTP for loopback only, unless a registry is configured as insecure", () => {
    assert.equal(registryScheme("127.0.0.1:5000", NONE), "http");
    assert.equal(registryScheme("127.8.9.10", NONE), "http");
    assert.equal(registryScheme("localhost:5000", NONE), "http");
    assert.equal(registryScheme("[::1]:5000", NONE), "http");
    assert.equal(registryScheme("registry.example.com", NONE), "https");
    assert.equal(registryScheme("10.0.0.5:5000", NONE), "https");
    assert.equal(registryScheme("128.0.0.1", NONE), "https");
    assert.equal(registryScheme("localhost.example.com", NONE), "https");
    assert.equal(registryScheme("registry.internal:5000", new Set(["registry.internal:5000"])), "http");
    assert.equal(registryScheme("registry.internal:5000", new Set(["registry.internal"])), "http");
    assert.equal(registryScheme("registry.internal:5001", new Set(["registry.internal:5000"])), "https");
  });

  it("judges every URL, redirect targets and token realms included", () => {
    assert.equal(urlAllowed(new URL("https://storage.example.com/x?sig=1"), NONE), true);
    assert.equal(urlAllowed(new URL("http://storage.example.com/x"), NONE), false);
    assert.equal(urlAllowed(new URL("http://127.0.0.1:9/x"), NONE), true);
    assert.equal(urlAllowed(new URL("ftp://127.0.0.1/x"), NONE), false);
    assert.equal(plainHttpAllowed("storage.example.com", new Set(["storage.example.com"])), true);
  });

  it("finds host names and loopback addresses", () => {
    assert.equal(hostname("Host:5000"), "host");
    assert.equal(hostname("[::1]:5000"), "::1");
    assert.equal(hostname("::1"), "::1");
    assert.equal(isLoopback("::1"), true);
    assert.equal(isLoopback("[::1]"), true);
    assert.equal(isLoopback("::2"), false);
    assert.equal(isLoopback("127.0.0.1"), true);
    assert.equal(isLoopback("localhost"), true);
  });

  it("opens remote registries over HTTPS and Docker Hub at its API host", () => {
    const transport = new Transport({ insecureRegistries: NONE, retry: DEFAULT_RETRY, userAgent: "test" });
    const session = (text: string) =>
      new RegistrySession(
        parseImageReference(text),
        transport,
        new Authenticator(transport),
        undefined,
        AbortSignal.abort(),
      );
    assert.equal(session("registry.example.com:5000/a/b:c").base.href, "https://registry.example.com:5000/v2/a/b/");
    assert.equal(session("ubuntu").base.href, "https://registry-1.docker.io/v2/library/ubuntu/");
    assert.equal(session("localhost:5000/a").base.href, "http://localhost:5000/v2/a/");
  });
});
