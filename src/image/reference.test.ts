import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { apiHost, ImageReferenceError, isNoImage, makeReference, parseImageReference } from "./reference.js";

const SHA256 = `sha256:${"a".repeat(64)}`;
const SHA512 = `sha512:${"b".repeat(128)}`;

describe("image references", () => {
  it("normalizes like Docker", () => {
    const table: [string, string, string, string | undefined, string | undefined][] = [
      // input, registry, repository, tag, digest
      ["ubuntu", "docker.io", "library/ubuntu", "latest", undefined],
      ["docker://ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", undefined],
      ["bitnami/redis", "docker.io", "bitnami/redis", "latest", undefined],
      ["docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", undefined],
      ["index.docker.io/library/ubuntu:x", "docker.io", "library/ubuntu", "x", undefined],
      ["host:5000/a/b:tag", "host:5000", "a/b", "tag", undefined],
      ["localhost/a", "localhost", "a", "latest", undefined],
      ["localhost:5000", "docker.io", "library/localhost", "5000", undefined],
      ["registry.example.com/a", "registry.example.com", "a", "latest", undefined],
      ["Registry/a", "Registry", "a", "latest", undefined],
      ["[::1]:5000/a/b", "[::1]:5000", "a/b", "latest", undefined],
      [`host.example/a@${SHA256}`, "host.example", "a", undefined, SHA256],
      // Without '.', ':' or "localhost" the first component is a Docker Hub namespace.
      [`host/a@${SHA256}`, "docker.io", "host/a", undefined, SHA256],
      [`a/b:tag@${SHA256}`, "docker.io", "a/b", "tag", SHA256],
      [`127.0.0.1:5000/x__y.z-w/q---r@${SHA512}`, "127.0.0.1:5000", "x__y.z-w/q---r", undefined, SHA512],
    ];
    for (const [input, registry, repository, tag, digest] of table) {
      const ref = parseImageReference(input);
      assert.deepEqual([ref.registry, ref.repository, ref.tag, ref.digest], [registry, repository, tag, digest], input);
    }
  });

  it("prints the canonical form", () => {
    assert.equal(String(parseImageReference("ubuntu")), "docker.io/library/ubuntu:latest");
    assert.equal(String(parseImageReference(`a/b:t@${SHA256}`)), `docker.io/a/b:t@${SHA256}`);
    assert.equal(`${parseImageReference(`host:1/a@${SHA256}`)}`, `host:1/a@${SHA256}`);
    assert.equal(String(makeReference("h", "r", undefined, SHA256)), `h/r@${SHA256}`);
  });

  it("refuses malformed references with the reason", () => {
    const table: [string, RegExp][] = [
      ["", /is empty/],
      ["docker://", /is empty/],
      ["Ubuntu", /must be lowercase/],
      ["host/A/b", /must be lowercase/],
      ["a//b", /empty path component/],
      ["a/", /empty path component/],
      ["a:", /tag after ':' is empty/],
      ["a:-x", /tag "-x" is invalid/],
      [`a:${"t".repeat(129)}`, /tag .* is invalid/],
      ["a-/b", /path component "a-" is invalid/],
      ["a b", /white space/],
      ["a@sha256", /algorithm:hex/],
      ["a@md5:0123456789abcdef0123456789abcdef", /"md5" is not supported/],
      ["a@sha256:abc", /64 lowercase hexadecimal digits; "abc" has 3/],
      [`a@sha256:${"A".repeat(64)}`, /64 lowercase hexadecimal/],
      [`a@sha512:${"a".repeat(64)}`, /sha512 digest has 128/],
      ["host:x/a", /invalid port "x"/],
      ["-bad.host/a", /registry host "-bad.host"/],
      ["a".repeat(64), /64-character hexadecimal/],
      [`a/${"b".repeat(300)}`, /longer than 255/],
    ];
    for (const [input, reason] of table) {
      assert.throws(
        () => parseImageReference(input),
        (err: unknown) => {
          assert.ok(err instanceof ImageReferenceError, input);
          assert.equal(err.reference, input);
          assert.match(err.message, reason, input);
          assert.ok(err.message.startsWith(`invalid image reference "${input.slice(0, 300)}`), err.message);
          return true;
        },
      );
    }
  });

  it("recognizes values that ask for no image", () => {
    for (const v of ["", "none", "docker://none", " none "]) assert.equal(isNoImage(v), true, v);
    for (const v of ["nonex", "busybox", "docker://busybox"]) assert.equal(isNoImage(v), false, v);
  });

  it("maps Docker Hub to its API host", () => {
    assert.equal(apiHost("docker.io"), "registry-1.docker.io");
    assert.equal(apiHost("127.0.0.1:5000"), "127.0.0.1:5000");
  });
});
