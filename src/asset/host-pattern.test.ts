import assert from "node:assert/strict";
import { test } from "node:test";
import { parseConfig } from "../config/config.js";
import { hostAllowed, parseHostPattern } from "./host-pattern.js";

const allows = (patterns: string[], url: string) => hostAllowed(patterns.map(parseHostPattern), new URL(url));

test("a host without a port allows only its scheme's default port; host:* any; host:port that one", () => {
  assert.equal(allows(["example.com"], "https://example.com/a"), true);
  assert.equal(allows(["example.com"], "http://example.com/a"), true);
  assert.equal(allows(["example.com"], "https://example.com:8443/a"), false);
  assert.equal(allows(["example.com:8443"], "https://example.com:8443/a"), true);
  assert.equal(allows(["example.com:*"], "http://example.com:9/a"), true);
  assert.equal(allows(["127.0.0.1:8080"], "http://127.0.0.1:8081/"), false);
});

test("names below a *. pattern match, the domain itself and look-alikes do not", () => {
  const patterns = ["*.githubusercontent.com"];
  assert.equal(allows(patterns, "https://objects.githubusercontent.com/x"), true);
  assert.equal(allows(patterns, "https://githubusercontent.com/x"), false);
  assert.equal(allows(patterns, "https://evilgithubusercontent.com/x"), false);
  assert.equal(allows(patterns, "https://githubusercontent.com.evil.example/x"), false);
});

test("hosts are compared as URLs canonicalise them: case, IPv4 spellings, IPv6 brackets", () => {
  assert.equal(allows(["Example.COM"], "https://EXAMPLE.com/"), true);
  // 2130706433 and 0x7f.1 are 127.0.0.1: the same address the operator listed, not a way around it.
  assert.equal(allows(["127.0.0.1:80"], "http://2130706433/"), true);
  assert.equal(allows(["127.0.0.1:80"], "http://0x7f.1/"), true);
  assert.equal(allows(["127.0.0.1:80"], "http://localhost/"), false);
  assert.equal(allows(["127.0.0.1:80"], "http://[::1]/"), false);
  assert.equal(allows(["[::1]:8080"], "http://[0:0:0:0:0:0:0:1]:8080/"), true);
});

test("malformed patterns are refused by the configuration, naming the key", () => {
  for (const bad of ["::1", "example.com:0", "*.10.0.0.1", "http://example.com", "a/b", "*"]) {
    assert.throws(
      () => parseConfig({ asset: { fetch: { allowedHosts: [bad] } } }),
      /asset\.fetch\.allowedHosts\.0: /,
      bad,
    );
  }
});
