import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { after, before, describe, test } from "node:test";
import type { ServiceError } from "@grpc/grpc-js";
import {
  failsWith,
  fetchBlob,
  fetchDirectory,
  pushBlob,
  pushDirectory,
  readBlob,
  sri,
  upload,
} from "../../test/support/assets.js";
import { sha256 } from "../../test/support/blobs.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { type HttpOrigin, startHttpOrigin } from "../../test/support/http-origin.js";
import { statusDetails } from "../../test/support/rpc.js";
import { Code } from "../status/status.js";

describe("FetchBlob from an allowed origin", () => {
  let origin: HttpOrigin;
  let farm: TestFarm;
  before(async () => {
    origin = await startHttpOrigin();
    farm = await startTestFarm({
      instanceNames: ["", "a", "b"],
      asset: { fetch: { allowedHosts: [`127.0.0.1:${origin.port}`], defaultTimeoutSeconds: 20 } },
    });
  });
  after(async () => {
    await farm.close();
    await origin.close();
  });

  test("downloads into the CAS, checks checksum.sri and answers later calls without the origin", async () => {
    const body = randomBytes(3 * 1024 * 1024 + 17);
    origin.routes.set("/pkg-1.0.tar.gz", { kind: "file", body });
    const uri = `${origin.url}/pkg-1.0.tar.gz`;
    const qualifiers = [sri(body), { name: "bazel.canonical_id", value: uri }];
    const first = await fetchBlob(farm, { uris: [uri], qualifiers });
    assert.equal(first.status?.code, Code.OK);
    assert.deepEqual(first.blobDigest, sha256(body));
    assert.equal(first.uri, uri);
    assert.equal(first.digestFunction, 1);
    assert.deepEqual(await readBlob(farm, sha256(body)), body);
    assert.equal(origin.hits("/pkg-1.0.tar.gz"), 1);

    origin.routes.delete("/pkg-1.0.tar.gz");
    const again = await fetchBlob(farm, { uris: [uri], qualifiers });
    assert.deepEqual(again.blobDigest, sha256(body));
    assert.equal(origin.hits("/pkg-1.0.tar.gz"), 1, "answered from the association, not downloaded again");
  });

  test("a body without checksum or length goes through a temporary file, and is the blob answered", async () => {
    const body = randomBytes(2 * 1024 * 1024 + 5);
    origin.routes.set("/chunked", { kind: "file", body, chunked: true });
    const answer = await fetchBlob(farm, { uris: [`${origin.url}/chunked`] });
    assert.deepEqual(answer.blobDigest, sha256(body));
    assert.deepEqual(await readBlob(farm, sha256(body)), body);
  });

  test("sha384 and sha512 checksums are checked, and the first URI that works is answered", async () => {
    const body = randomBytes(100_000);
    origin.routes.set("/mirror-ok", { kind: "file", body });
    for (const algorithm of ["sha384", "sha512"]) {
      const answer = await fetchBlob(farm, {
        uris: [`${origin.url}/missing-${algorithm}`, `${origin.url}/mirror-ok`],
        qualifiers: [sri(body, algorithm)],
      });
      assert.equal(answer.uri, `${origin.url}/mirror-ok`);
      assert.deepEqual(answer.blobDigest, sha256(body));
    }
  });

  test("a checksum the content does not match is NOT_FOUND naming both, and nothing is remembered", async () => {
    const body = Buffer.from("the real content\n");
    origin.routes.set("/tampered", { kind: "file", body });
    const uri = `${origin.url}/tampered`;
    const wrong = sri(Buffer.from("what the client expected\n"));
    for (const chunked of [false, true]) {
      origin.routes.set("/tampered", { kind: "file", body, chunked });
      await assert.rejects(
        fetchBlob(farm, { uris: [uri], qualifiers: [wrong] }),
        failsWith(Code.NOT_FOUND, /uris\[0\].*does not match checksum\.sri|uris\[0\].*not the checksum\.sri/),
      );
    }
    // The blob fetched with the wrong checksum was not kept under that checksum: the right one still downloads.
    const hits = origin.hits("/tampered");
    const right = await fetchBlob(farm, { uris: [uri], qualifiers: [sri(body)] });
    assert.deepEqual(right.blobDigest, sha256(body));
    assert.equal(origin.hits("/tampered"), hits + 1);
  });

  test("concurrent identical fetches share one download", async () => {
    const body = randomBytes(1024 * 1024);
    origin.routes.set("/shared", { kind: "file", body });
    const request = { uris: [`${origin.url}/shared`], qualifiers: [sri(body)] };
    const answers = await Promise.all(Array.from({ length: 8 }, () => fetchBlob(farm, request)));
    for (const answer of answers) assert.deepEqual(answer.blobDigest, sha256(body));
    assert.equal(origin.hits("/shared"), 1);
  });

  test("oldest_content_accepted after the fetch makes the farm fetch again", async () => {
    origin.routes.set("/moving", { kind: "file", body: Buffer.from("version 1") });
    const uri = `${origin.url}/moving`;
    const v1 = await fetchBlob(farm, { uris: [uri] });
    assert.deepEqual(v1.blobDigest, sha256("version 1"));
    origin.routes.set("/moving", { kind: "file", body: Buffer.from("version 2") });
    const cached = await fetchBlob(farm, { uris: [uri] });
    assert.deepEqual(cached.blobDigest, sha256("version 1"));
    const now = Date.now() + 1000;
    const fresh = await fetchBlob(farm, {
      uris: [uri],
      oldestContentAccepted: { seconds: Math.floor(now / 1000), nanos: 0 },
    });
    assert.deepEqual(fresh.blobDigest, sha256("version 2"));
  });

  test("associations are kept per instance name", async () => {
    origin.routes.set("/per-instance", { kind: "file", body: Buffer.from("for a") });
    const uri = `${origin.url}/per-instance`;
    await fetchBlob(farm, { instanceName: "a", uris: [uri] });
    origin.routes.set("/per-instance", { kind: "file", body: Buffer.from("for b") });
    const b = await fetchBlob(farm, { instanceName: "b", uris: [uri] });
    assert.deepEqual(b.blobDigest, sha256("for b"), "instance b did not see a's association");
    const a = await fetchBlob(farm, { instanceName: "a", uris: [uri] });
    assert.deepEqual(a.blobDigest, sha256("for a"));
    await assert.rejects(
      fetchBlob(farm, { instanceName: "c", uris: [uri] }),
      failsWith(Code.INVALID_ARGUMENT, /unknown instance name "c"/),
    );
  });

  test("content one URI of a list gave is not remembered for the others unless a checksum proved it", async () => {
    // A client lists its own URL first and the victim's second: only its own URL gets the association.
    origin.routes.set("/attacker", { kind: "file", body: Buffer.from("evil") });
    origin.routes.set("/victim", { kind: "file", body: Buffer.from("genuine") });
    await fetchBlob(farm, { uris: [`${origin.url}/attacker`, `${origin.url}/victim`] });
    const victim = await fetchBlob(farm, { uris: [`${origin.url}/victim`] });
    assert.deepEqual(victim.blobDigest, sha256("genuine"));
    assert.equal(origin.hits("/victim"), 1);
    // With a checksum the content is the content, whichever mirror gave it: every URI of the list is answered.
    const body = Buffer.from("mirrored");
    origin.routes.set("/mirror-a", { kind: "file", body });
    await fetchBlob(farm, { uris: [`${origin.url}/mirror-a`, `${origin.url}/mirror-b`], qualifiers: [sri(body)] });
    const fromB = await fetchBlob(farm, { uris: [`${origin.url}/mirror-b`], qualifiers: [sri(body)] });
    assert.deepEqual(fromB.blobDigest, sha256(body));
    assert.equal(origin.hits("/mirror-b"), 0);
  });

  test("a blob the CAS already holds under the checksum is answered without reading the body", async () => {
    const known = randomBytes(200_000);
    await upload(farm, { data: known, digest: sha256(known) });
    // The origin would send other bytes of the same length: never read, since the checksum names a stored blob.
    origin.routes.set("/known", { kind: "file", body: randomBytes(known.byteLength) });
    const answer = await fetchBlob(farm, { uris: [`${origin.url}/known`], qualifiers: [sri(known)] });
    assert.deepEqual(answer.blobDigest, sha256(known));
  });

  test("the blob's digest is in the digest function the request names", async () => {
    const body = randomBytes(70_000);
    origin.routes.set("/sha512", { kind: "file", body });
    const answer = await fetchBlob(farm, {
      uris: [`${origin.url}/sha512`],
      qualifiers: [sri(body, "sha512")],
      digestFunction: 6,
    });
    assert.equal(answer.digestFunction, 6);
    assert.deepEqual(answer.blobDigest, {
      hash: createHash("sha512").update(body).digest("hex"),
      sizeBytes: body.byteLength,
    });
  });

  test("HTTP errors and unreachable URIs are NOT_FOUND naming each URI's reason", async () => {
    origin.routes.set("/gone", { kind: "status", status: 410 });
    await assert.rejects(
      fetchBlob(farm, {
        uris: [`${origin.url}/nothing-here`, `${origin.url}/gone`, "urn:example:not-pushed"],
      }),
      failsWith(Code.NOT_FOUND, /uris\[0\].*HTTP 404.*uris\[1\].*HTTP 410.*uris\[2\]: no association/),
    );
  });
});

describe("Remote Asset requests a client gets wrong", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm({});
  });
  after(() => farm.close());

  test("an empty request is INVALID_ARGUMENT on every method (how BuildStream finds out the API is there)", async () => {
    for (const call of [
      () => fetchBlob(farm, {}),
      () => fetchDirectory(farm, {}),
      () => pushBlob(farm, {}),
      () => pushDirectory(farm, {}),
    ]) {
      await assert.rejects(call(), (err: ServiceError) => {
        assert.equal(err.code, Code.INVALID_ARGUMENT, err.details);
        assert.match(err.details, /uris: at least one URI is required/);
        return true;
      });
    }
  });

  test("qualifiers the farm cannot honour are INVALID_ARGUMENT with a BadRequest violation each", async () => {
    const err = await fetchBlob(farm, {
      uris: ["https://example.com/repo.git"],
      qualifiers: [
        { name: "vcs.commit", value: "b5123b1" },
        { name: "checksum.sri", value: sri(Buffer.from("x")).value },
        { name: "directory", value: "sub" },
      ],
    }).then(
      () => assert.fail("accepted"),
      (e: ServiceError) => e,
    );
    assert.equal(err.code, Code.INVALID_ARGUMENT);
    assert.match(err.details, /"vcs\.commit", "directory" not supported/);
    const violations = statusDetails(err).badRequest?.fieldViolations ?? [];
    assert.deepEqual(
      violations.map((v) => [v.field, v.description]),
      [
        ["qualifiers.name", '"vcs.commit" not supported'],
        ["qualifiers.name", '"directory" not supported'],
      ],
    );
  });

  test("malformed URIs, digests, checksums and duplicate qualifiers are INVALID_ARGUMENT naming the field", async () => {
    const cases: [() => Promise<unknown>, RegExp][] = [
      [() => fetchBlob(farm, { uris: ["not a uri"] }), /uris\[0\]: "not a uri" is not an absolute URI/],
      [() => fetchBlob(farm, { uris: [""] }), /uris\[0\]: is empty/],
      [
        () =>
          fetchBlob(farm, {
            uris: ["https://x.example/a"],
            qualifiers: [{ name: "checksum.sri", value: "sha256-abc" }],
          }),
        /qualifiers\[0\]\.value: checksum\.sri token "sha256-abc"/,
      ],
      [
        () =>
          fetchBlob(farm, {
            uris: ["https://x.example/a"],
            qualifiers: [
              { name: "bazel.canonical_id", value: "1" },
              { name: "bazel.canonical_id", value: "2" },
            ],
          }),
        /qualifiers\[1\]\.name: "bazel\.canonical_id" is given twice/,
      ],
      [() => fetchBlob(farm, { uris: ["https://x.example/a"], digestFunction: 4 }), /digest_function: .*VSO/],
      [
        () => pushBlob(farm, { uris: ["urn:x"], blobDigest: { hash: "zz", sizeBytes: 1 } }),
        /blob_digest\.hash: "zz" has 2 characters/,
      ],
      [() => pushDirectory(farm, { uris: ["urn:x"] }), /root_directory_digest: digest is missing/],
      [
        () => fetchBlob(farm, { uris: ["https://x.example/a"], timeout: { seconds: -1, nanos: 0 } }),
        /timeout: is negative/,
      ],
    ];
    for (const [call, message] of cases) await assert.rejects(call(), failsWith(Code.INVALID_ARGUMENT, message));
  });
});
