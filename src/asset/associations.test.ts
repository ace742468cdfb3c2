import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
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
import { randomBlob, sha256 } from "../../test/support/blobs.js";
import { connect, startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { type HttpOrigin, startHttpOrigin } from "../../test/support/http-origin.js";
import { statusDetails, unaryCall } from "../../test/support/rpc.js";
import { dir, encodeTree, file } from "../../test/support/trees.js";
import { Directory, Tree } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code } from "../status/status.js";

/** The URN BuildStream 1.6 pushes an artifact under. */
const artifactUrn = (key: string) => `urn:fdc:buildstream.build:2020:v1:project/hello.bst/${key}`;

describe("Push and FetchDirectory: associations kept under the action cache's rules", () => {
  let farm: TestFarm;
  before(async () => {
    farm = await startTestFarm({ instanceNames: ["", "a", "b"] });
  });
  after(() => farm.close());

  test("PushDirectory then FetchDirectory, as BuildStream 1.6 pushes and pulls an artifact", async () => {
    const tree = encodeTree(dir({ files: dir({ "hello.txt": file("hello\n") }), "meta.yaml": file("key: 1\n") }));
    const uri = artifactUrn("a".repeat(64));
    await assert.rejects(
      fetchDirectory(farm, { uris: [uri] }),
      failsWith(Code.NOT_FOUND, /no directory is associated/),
    );
    await upload(farm, ...tree.blobs);
    await pushDirectory(farm, { uris: [uri], rootDirectoryDigest: tree.root });
    const answer = await fetchDirectory(farm, { uris: [uri] });
    assert.deepEqual(answer.rootDirectoryDigest, tree.root);
    assert.equal(answer.uri, uri);
    assert.equal(answer.status?.code, Code.OK);
    // GetTree from the answer gives the tree back.
    const pages = farm.clients.cas.getTree({
      instanceName: "",
      rootDigest: tree.root,
      pageSize: 0,
      pageToken: "",
      digestFunction: 0,
    });
    let count = 0;
    for await (const page of pages) count += (page as { directories: unknown[] }).directories.length;
    assert.equal(count, 2);
  });

  test("PushDirectory of a tree with a blob not in the CAS is FAILED_PRECONDITION naming it; nothing is associated", async () => {
    const tree = encodeTree(dir({ "present.txt": file("here"), "absent.txt": file("never uploaded") }));
    const absent = sha256("never uploaded");
    await upload(farm, ...tree.blobs.filter((b) => b.digest.hash !== absent.hash));
    const uri = artifactUrn("b".repeat(64));
    const err = await pushDirectory(farm, { uris: [uri], rootDirectoryDigest: tree.root }).catch(
      (e: ServiceError) => e,
    );
    assert.equal((err as ServiceError).code, Code.FAILED_PRECONDITION);
    const violations = statusDetails(err as ServiceError).preconditionFailure?.violations ?? [];
    assert.deepEqual(
      violations.map((v) => [v.type, v.subject]),
      [["MISSING", `blobs/${absent.hash}/${absent.sizeBytes}`]],
    );
    await assert.rejects(fetchDirectory(farm, { uris: [uri] }), failsWith(Code.NOT_FOUND, /no directory/));
    const unknownRoot = sha256("no such directory");
    await assert.rejects(
      pushDirectory(farm, { uris: [uri], rootDirectoryDigest: unknownRoot }),
      failsWith(Code.FAILED_PRECONDITION, new RegExp(`blobs/${unknownRoot.hash}`)),
    );
  });

  test("PushBlob then FetchBlob answers the pushed blob for exactly the pushed qualifiers", async () => {
    const blob = randomBlob(5000);
    await upload(farm, blob);
    const qualifiers = [
      { name: "vcs.commit", value: "b5123b1bb2853393c7b9aa43236db924d7e32d61" },
      { name: "resource_type", value: "application/x-git" },
    ];
    await pushBlob(farm, { uris: ["https://example.invalid/repo.git"], qualifiers, blobDigest: blob.digest });
    // In any order: qualifiers are a set.
    const answer = await fetchBlob(farm, {
      uris: ["https://example.invalid/repo.git"],
      qualifiers: [...qualifiers].reverse(),
    });
    assert.deepEqual(answer.blobDigest, blob.digest);
    // Another commit is another asset, which this farm cannot fetch itself.
    await assert.rejects(
      fetchBlob(farm, {
        uris: ["https://example.invalid/repo.git"],
        qualifiers: [{ name: "vcs.commit", value: "0000000" }, qualifiers[1] as { name: string; value: string }],
      }),
      failsWith(Code.INVALID_ARGUMENT, /"vcs\.commit", "resource_type" not supported/),
    );
  });

  test("PushBlob of a blob not in the CAS is FAILED_PRECONDITION; a checksum.sri it does not match is refused", async () => {
    const absent = sha256("not uploaded");
    const err = await pushBlob(farm, { uris: ["urn:x:1"], blobDigest: absent }).catch((e: ServiceError) => e);
    assert.equal((err as ServiceError).code, Code.FAILED_PRECONDITION);
    assert.equal(
      statusDetails(err as ServiceError).preconditionFailure?.violations[0]?.subject,
      `blobs/${absent.hash}/${absent.sizeBytes}`,
    );
    const blob = randomBlob(100);
    await upload(farm, blob);
    await assert.rejects(
      pushBlob(farm, { uris: ["urn:x:2"], blobDigest: blob.digest, qualifiers: [sri(Buffer.from("other"), "sha512")] }),
      failsWith(Code.INVALID_ARGUMENT, /checksum\.sri does not match blob_digest/),
    );
    await pushBlob(farm, { uris: ["urn:x:2"], blobDigest: blob.digest, qualifiers: [sri(blob.data, "sha512")] });
    const answer = await fetchBlob(farm, { uris: ["urn:x:2"], qualifiers: [sri(blob.data, "sha512")] });
    assert.deepEqual(answer.blobDigest, blob.digest);
    await assert.rejects(
      pushBlob(farm, {
        uris: ["urn:x:3"],
        blobDigest: blob.digest,
        qualifiers: [{ name: "bazel.auth_headers", value: "{}" }],
      }),
      failsWith(Code.INVALID_ARGUMENT, /request headers .* are not kept/),
    );
  });

  test("references_blobs and references_directories must be in the CAS, like the content itself", async () => {
    const blob = randomBlob(200);
    const absent = sha256("referenced, never uploaded");
    await upload(farm, blob);
    await assert.rejects(
      pushBlob(farm, { uris: ["urn:ref:1"], blobDigest: blob.digest, referencesBlobs: [absent] }),
      failsWith(Code.FAILED_PRECONDITION, new RegExp(`blobs/${absent.hash}`)),
    );
    const tree = encodeTree(dir({ "gone.txt": file("referenced file, never uploaded") }));
    await upload(farm, ...tree.blobs.filter((b) => b.digest.hash === tree.root.hash));
    await assert.rejects(
      pushBlob(farm, { uris: ["urn:ref:1"], blobDigest: blob.digest, referencesDirectories: [tree.root] }),
      failsWith(Code.FAILED_PRECONDITION, new RegExp(`blobs/${sha256("referenced file, never uploaded").hash}`)),
    );
    await assert.rejects(fetchBlob(farm, { uris: ["urn:ref:1"] }), failsWith(Code.NOT_FOUND, /no association/));
    await upload(farm, ...tree.blobs);
    await pushBlob(farm, { uris: ["urn:ref:1"], blobDigest: blob.digest, referencesDirectories: [tree.root] });
    assert.deepEqual((await fetchBlob(farm, { uris: ["urn:ref:1"] })).blobDigest, blob.digest);
  });

  test("expire_at: a past one is refused, a near one stops being answered, and fetches report it", async () => {
    const blob = randomBlob(64);
    await upload(farm, blob);
    await assert.rejects(
      pushBlob(farm, { uris: ["urn:exp:1"], blobDigest: blob.digest, expireAt: { seconds: 1, nanos: 0 } }),
      failsWith(Code.INVALID_ARGUMENT, /expire_at: is in the past/),
    );
    const soon = Date.now() + 600;
    await pushBlob(farm, {
      uris: ["urn:exp:1"],
      blobDigest: blob.digest,
      expireAt: { seconds: Math.floor(soon / 1000), nanos: (soon % 1000) * 1e6 },
    });
    const answer = await fetchBlob(farm, { uris: ["urn:exp:1"] });
    assert.equal(answer.expiresAt?.seconds, Math.floor(soon / 1000));
    await new Promise((resolve) => setTimeout(resolve, 800));
    await assert.rejects(fetchBlob(farm, { uris: ["urn:exp:1"] }), failsWith(Code.NOT_FOUND, /no association/));
  });

  test("oldest_content_accepted after a push is a miss", async () => {
    const tree = encodeTree(dir({ "x.txt": file("x") }));
    await upload(farm, ...tree.blobs);
    await pushDirectory(farm, { uris: ["urn:age:1"], rootDirectoryDigest: tree.root });
    const later = Date.now() + 2000;
    await assert.rejects(
      fetchDirectory(farm, {
        uris: ["urn:age:1"],
        oldestContentAccepted: { seconds: Math.floor(later / 1000), nanos: 0 },
      }),
      failsWith(Code.NOT_FOUND, /no directory/),
    );
    const earlier = Date.now() - 60_000;
    const answer = await fetchDirectory(farm, {
      uris: ["urn:age:1"],
      oldestContentAccepted: { seconds: Math.floor(earlier / 1000), nanos: 0 },
    });
    assert.deepEqual(answer.rootDirectoryDigest, tree.root);
  });

  test("associations are per instance name", async () => {
    const tree = encodeTree(dir({ "a.txt": file("only in a") }));
    await upload(farm, ...tree.blobs);
    await pushDirectory(farm, { instanceName: "a", uris: ["urn:inst:1"], rootDirectoryDigest: tree.root });
    assert.deepEqual(
      (await fetchDirectory(farm, { instanceName: "a", uris: ["urn:inst:1"] })).rootDirectoryDigest,
      tree.root,
    );
    for (const instanceName of ["", "b"]) {
      await assert.rejects(
        fetchDirectory(farm, { instanceName, uris: ["urn:inst:1"] }),
        failsWith(Code.NOT_FOUND, new RegExp(`instance "${instanceName}"`)),
      );
    }
  });

  test("the association is an action-cache entry whose Tree lists the pushed tree, and no URI is written in it", async () => {
    const tree = encodeTree(dir({ "y.txt": file("y") }));
    await upload(farm, ...tree.blobs);
    const uri = "https://user-token-in-path.example.invalid/secret-path/archive.tar";
    await pushDirectory(farm, { uris: [uri], rootDirectoryDigest: tree.root });
    const { associationDigest } = await import("./associations.js");
    const { SHA256 } = await import("../digest/functions.js");
    const actionDigest = await associationDigest(SHA256, "directory", uri, []);
    const entry = await unaryCall(farm.clients.ac.getActionResult.bind(farm.clients.ac), {
      instanceName: "",
      actionDigest: { hash: actionDigest.hash, sizeBytes: actionDigest.sizeBytes },
      inlineStdout: true,
      inlineStderr: false,
      inlineOutputFiles: [],
      digestFunction: 0,
    });
    const output = entry.outputDirectories[0];
    assert.deepEqual(output?.rootDirectoryDigest, tree.root);
    const treeBlob = Tree.decode(await readBlob(farm, output?.treeDigest as { hash: string; sizeBytes: number }));
    assert.equal(treeBlob.root?.files[0]?.name, "y.txt");
    const encoded = Buffer.from(JSON.stringify(entry));
    assert.equal(encoded.includes("secret-path"), false);
  });
});

describe("associations whose content was evicted are misses", () => {
  let origin: HttpOrigin;
  let farm: TestFarm;
  before(async () => {
    origin = await startHttpOrigin();
    // A CAS of 4 MiB, no memory cache: a few megabytes of other blobs evict everything older.
    farm = await startTestFarm({
      cas: { maxSizeBytes: "4MiB", memoryCacheSizeBytes: 0 },
      asset: { fetch: { allowedHosts: [`127.0.0.1:${origin.port}`] } },
    });
  });
  after(async () => {
    await farm.close();
    await origin.close();
  });

  const evictEverything = async () => {
    for (let i = 0; i < 6; i++) await upload(farm, randomBlob(1024 * 1024 - 100));
  };

  test("a pushed directory, a pushed blob and a fetched blob each read as a miss once evicted, never a dangling digest", async () => {
    const tree = encodeTree(dir({ sub: dir({ "big.bin": file(randomBytes(500_000)) }), "small.txt": file("s") }));
    await upload(farm, ...tree.blobs);
    await pushDirectory(farm, { uris: ["urn:evict:dir"], rootDirectoryDigest: tree.root });
    const blob = randomBlob(300_000);
    await upload(farm, blob);
    await pushBlob(farm, { uris: ["urn:evict:blob"], blobDigest: blob.digest });
    const body = randomBytes(400_000);
    origin.routes.set("/evictable", { kind: "file", body });
    await fetchBlob(farm, { uris: [`${origin.url}/evictable`], qualifiers: [sri(body)] });
    assert.deepEqual((await fetchDirectory(farm, { uris: ["urn:evict:dir"] })).rootDirectoryDigest, tree.root);

    await evictEverything();

    await assert.rejects(
      fetchDirectory(farm, { uris: ["urn:evict:dir"] }),
      failsWith(Code.NOT_FOUND, /evicted or expired/),
    );
    await assert.rejects(fetchBlob(farm, { uris: ["urn:evict:blob"] }), failsWith(Code.NOT_FOUND, /no association/));
    // The fetched one is simply fetched again, and is then in the CAS.
    const again = await fetchBlob(farm, { uris: [`${origin.url}/evictable`], qualifiers: [sri(body)] });
    assert.equal(origin.hits("/evictable"), 2);
    assert.deepEqual(await readBlob(farm, again.blobDigest as { hash: string; sizeBytes: number }), body);
  });

  test("a directory whose Directory message alone was evicted is a miss", async () => {
    // Every file stays (pushed again after the eviction); only the subdirectory's message is gone.
    const content = randomBytes(100);
    const tree = encodeTree(dir({ sub: dir({ "f.bin": file(content) }) }));
    await upload(farm, ...tree.blobs);
    await pushDirectory(farm, { uris: ["urn:evict:dirmsg"], rootDirectoryDigest: tree.root });
    await evictEverything();
    const sub = encodeTree(dir({ "f.bin": file(content) }));
    const subMessage = tree.blobs.find((b) => b.digest.hash === sub.root.hash);
    const rootMessage = tree.blobs.find((b) => b.digest.hash === tree.root.hash);
    assert.ok(subMessage && rootMessage);
    // The Tree blob the farm stored: the Directory messages as they were, the root first.
    const treeBytes = Buffer.from(
      Tree.encode({ root: Directory.decode(rootMessage.data), children: [Directory.decode(subMessage.data)] }).finish(),
    );
    await upload(farm, ...tree.blobs.filter((b) => b !== subMessage), { data: treeBytes, digest: sha256(treeBytes) });
    await assert.rejects(
      fetchDirectory(farm, { uris: ["urn:evict:dirmsg"] }),
      failsWith(Code.NOT_FOUND, /no directory/),
    );
    // With that one message back, the same association is answered again.
    await upload(farm, subMessage);
    assert.deepEqual((await fetchDirectory(farm, { uris: ["urn:evict:dirmsg"] })).rootDirectoryDigest, tree.root);
  });
});

describe("the asset API is behind the access interceptor", () => {
  let dirPath: string;
  let farm: TestFarm;
  const TOKEN = "team-a-asset-token-0123456789abcdefghij";
  before(async () => {
    dirPath = await mkdtemp(join(tmpdir(), "berth-asset-tokens-"));
    const tokensFile = join(dirPath, "tokens.yaml");
    const hex = createHash("sha256").update(TOKEN).digest("hex");
    await writeFile(tokensFile, `tokens:\n  - { name: team-a, sha256: ${hex}, instances: ["team-a"] }\n`, {
      mode: 0o600,
    });
    farm = await startTestFarm({ auth: { tokensFile } });
  });
  after(async () => {
    await farm.close();
    await rm(dirPath, { recursive: true, force: true });
  });

  test("no token is UNAUTHENTICATED, another instance is PERMISSION_DENIED, the token's own instance is served", async () => {
    await assert.rejects(fetchDirectory(farm, { uris: ["urn:t:1"] }), failsWith(Code.UNAUTHENTICATED, /needs a token/));
    const teamA = connect(farm.address, { token: TOKEN });
    const asTeamA = { ...farm, clients: teamA };
    try {
      await assert.rejects(
        pushDirectory(asTeamA, { instanceName: "team-b", uris: ["urn:t:1"], rootDirectoryDigest: sha256("x") }),
        failsWith(Code.PERMISSION_DENIED, /may not use the instance name "team-b"/),
      );
      await assert.rejects(
        fetchDirectory(asTeamA, { instanceName: "team-a", uris: ["urn:t:1"] }),
        failsWith(Code.NOT_FOUND, /no directory/),
      );
    } finally {
      teamA.close();
    }
  });
});
