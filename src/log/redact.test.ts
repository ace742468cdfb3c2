import assert from "node:assert/strict";
import { test } from "node:test";
import { redactCredentials } from "./redact.js";

const DIGEST = `sha256:${"0123456789abcdef".repeat(4)}`;

test("userinfo in URLs and registry references is hidden, with or without a scheme, also when cut short", () => {
  assert.equal(
    redactCredentials('invalid image reference "docker://alice:s3cret@registry.example/img:1"'),
    'invalid image reference "docker://***@registry.example/img:1"',
  );
  assert.equal(
    redactCredentials('reference "alice:s3cret@registry.example/img"'),
    'reference "***@registry.example/img"',
  );
  assert.equal(redactCredentials("fetching https://bob:pa%2Fss@host/file"), "fetching https://***@host/file");
  assert.equal(redactCredentials('"docker://alice:a-very-long-passw…" is invalid'), '"docker://***…" is invalid');
});

test("image references with digests, ports and tags, and URLs without userinfo, are left as they are", () => {
  for (const text of [
    `busybox:1.36@${DIGEST}`,
    `"127.0.0.1:5000/private/busybox:1@${DIGEST}"`,
    `docker://registry.example/img@${DIGEST}`,
    "http://127.0.0.1:8080/path/file.tar.gz",
    "no worker of this farm offers the platform property pool=gpu",
    'the authorization header is not of the form "Bearer TOKEN"',
  ]) {
    assert.equal(redactCredentials(text), text);
  }
});

test("authorization values and the exact secrets given are hidden", () => {
  assert.equal(redactCredentials("sent Authorization: Bearer abcdef0123456789"), "sent Authorization: Bearer ***");
  assert.equal(redactCredentials("Basic YWxpY2U6czNjcmV0"), "Basic ***");
  assert.equal(redactCredentials("token tok-123 and again tok-123", ["tok-123"]), "token *** and again ***");
});
