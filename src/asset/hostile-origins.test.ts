import assert from "node:assert/strict";
import { lookup } from "node:dns/promises";
import { readdir, readFile } from "node:fs/promises";
import { hostname } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { after, before, describe, test } from "node:test";
import { Metadata, type ServiceError } from "@grpc/grpc-js";
import { pino } from "pino";
import { failsWith, fetchBlob, readBlob, sri } from "../../test/support/assets.js";
import { sha256 } from "../../test/support/blobs.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { type HttpOrigin, startHttpOrigin } from "../../test/support/http-origin.js";
import { FetchBlobRequest, type FetchBlobResponse } from "../gen/build/bazel/remote/asset/v1/remote_asset.js";
import { Code } from "../status/status.js";

/** The machine's own name, when it resolves to a loopback address (as /etc/hosts usually makes it). */
async function loopbackName(): Promise<string | undefined> {
  const name = hostname().toLowerCase();
  if (name === "localhost") return undefined;
  try {
    const addresses = await lookup(name, { all: true });
    return addresses.length > 0 && addresses.every((a) => a.address.startsWith("127.") || a.address === "::1")
      ? name
      : undefined;
  } catch {
    return undefined;
  }
}

/** The curl processes this process started (the farm runs in it), with their command lines as /proc shows them to anyone. */
async function curlChildren(): Promise<{ pid: number; cmdline: string }[]> {
  const found: { pid: number; cmdline: string }[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^[0-9]+$/.test(entry)) continue;
    try {
      const stat = await readFile(`/proc/${entry}/stat`, "utf8");
      // pid (comm) state ppid ...
      const [comm, rest] = [
        stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")")),
        stat.slice(stat.lastIndexOf(")") + 2),
      ];
      if (comm !== "curl" || Number(rest.split(" ")[1]) !== process.pid) continue;
      const cmdline = (await readFile(`/proc/${entry}/cmdline`, "utf8")).split("\0").join(" ").trim();
      found.push({ pid: Number(entry), cmdline });
    } catch {
      // gone meanwhile
    }
  }
  return found;
}

describe("FetchBlob against hostile URLs and origins", () => {
  let origin: HttpOrigin;
  /** A second server on this host the farm is not allowed to reach: what an SSRF would aim at. */
  let internal: HttpOrigin;
  let farm: TestFarm;
  let selfName: string | undefined;
  const logLines: string[] = [];
  before(async () => {
    origin = await startHttpOrigin();
    internal = await startHttpOrigin();
    internal.routes.set("/secret", { kind: "file", body: Buffer.from("internal only") });
    selfName = await loopbackName();
    const log = pino(
      { level: "debug" },
      new Writable({
        write(chunk, _encoding, done) {
          logLines.push(String(chunk));
          done();
        },
      }),
    );
    farm = await startTestFarm(
      {
        asset: {
          fetch: {
            allowedHosts: [`127.0.0.1:${origin.port}`, `localhost:${origin.port}`, "plain.example.invalid"],
            maxBlobBytes: "1MiB",
            defaultTimeoutSeconds: 30,
          },
        },
        cas: { memoryCacheSizeBytes: 0 },
      },
      undefined,
      { log },
    );
  });
  after(async () => {
    await farm.close();
    await origin.close();
    await internal.close();
  });

  const tempFiles = () => readdir(join(farm.config.dataDir, "asset", "tmp"));

  test("a host:port not allowed is PERMISSION_DENIED, names the key, and is never contacted", async () => {
    await assert.rejects(
      fetchBlob(farm, { uris: [`http://127.0.0.1:${internal.port}/secret`] }),
      failsWith(
        Code.PERMISSION_DENIED,
        new RegExp(`127\\.0\\.0\\.1:${internal.port} is not in asset\\.fetch\\.allowedHosts`),
      ),
    );
    assert.equal(internal.hits("/secret"), 0);
  });

  test("a redirect to a host not allowed is refused before it is followed; one within the allowed host is followed", async () => {
    origin.routes.set("/to-internal", { kind: "redirect", location: `http://127.0.0.1:${internal.port}/secret` });
    origin.routes.set("/to-metadata", {
      kind: "redirect",
      location: "http://169.254.169.254/latest/meta-data/",
      status: 307,
    });
    for (const path of ["/to-internal", "/to-metadata"]) {
      await assert.rejects(
        fetchBlob(farm, { uris: [`${origin.url}${path}`] }),
        failsWith(Code.PERMISSION_DENIED, /uris\[0\] .*redirected to http:\/\/.*is not in asset\.fetch\.allowedHosts/),
      );
    }
    assert.equal(internal.hits("/secret"), 0);
    origin.routes.set("/moved", { kind: "redirect", location: "/final", status: 301 });
    origin.routes.set("/final", { kind: "file", body: Buffer.from("after a redirect") });
    const answer = await fetchBlob(farm, { uris: [`${origin.url}/moved`] });
    assert.deepEqual(answer.blobDigest, sha256("after a redirect"));
  });

  test("the same machine by another name or spelling is only what the list names", async () => {
    origin.routes.set("/here", { kind: "file", body: Buffer.from("loopback content") });
    // Listed explicitly: localhost reaches loopback by name.
    const byLocalhost = await fetchBlob(farm, { uris: [`http://localhost:${origin.port}/here`] });
    assert.deepEqual(byLocalhost.blobDigest, sha256("loopback content"));
    const before = origin.hits("/here");
    // [::1] and another port are other hosts; a fragment or userinfo trick does not change the host.
    for (const uri of [`http://[::1]:${origin.port}/here`, `http://127.0.0.1:${origin.port + 1}/here`]) {
      await assert.rejects(fetchBlob(farm, { uris: [uri] }), failsWith(Code.PERMISSION_DENIED, /allowedHosts/));
    }
    await assert.rejects(
      fetchBlob(farm, { uris: [`http://evil.example.invalid#@127.0.0.1:${origin.port}/here`] }),
      failsWith(Code.PERMISSION_DENIED, /evil\.example\.invalid is not in asset\.fetch\.allowedHosts/),
    );
    await assert.rejects(
      fetchBlob(farm, { uris: [`http://127.0.0.1:${origin.port}@evil.example.invalid/here`] }),
      failsWith(Code.INVALID_ARGUMENT, /uris\[0\]: a URL with credentials in it/),
    );
    // One that does not even parse is not echoed with what might be its password.
    const err = await fetchBlob(farm, { uris: ["http://user:hunter2@[bad-host/here"] }).catch((e: ServiceError) => e);
    assert.equal((err as ServiceError).code, Code.INVALID_ARGUMENT);
    assert.doesNotMatch((err as ServiceError).details, /hunter2/);
    assert.equal(origin.hits("/here"), before, "none of these reached the origin");
  });

  test("a listed name that resolves to loopback (DNS the attacker controls) is refused", async (t) => {
    if (!selfName) return t.skip("this host's name does not resolve to loopback here");
    const byName = await startTestFarm({
      asset: {
        fetch: { allowedHosts: [`${selfName}:${origin.port}`, `${selfName}:${internal.port}`], allowHttp: true },
      },
    });
    try {
      for (const port of [origin.port, internal.port]) {
        await assert.rejects(
          fetchBlob(byName, { uris: [`http://${selfName}:${port}/secret`] }),
          failsWith(Code.PERMISSION_DENIED, new RegExp(`${selfName} resolves to 127\\.[0-9.]+, a loopback`)),
        );
      }
    } finally {
      await byName.close();
    }
    assert.equal(internal.hits("/secret"), 0);
  });

  test("plain http to a host that is not loopback is refused unless allowHttp", async () => {
    await assert.rejects(
      fetchBlob(farm, { uris: ["http://plain.example.invalid/file"] }),
      failsWith(
        Code.PERMISSION_DENIED,
        /plain http to plain\.example\.invalid is not allowed \(asset\.fetch\.allowHttp/,
      ),
    );
    // Other schemes are keys of pushed content only: never opened.
    await assert.rejects(
      fetchBlob(farm, { uris: ["ftp://plain.example.invalid/file", "file:///etc/passwd"] }),
      failsWith(Code.NOT_FOUND, /uris\[0\]: no association, and not an http or https URL.*uris\[1\]: no association/),
    );
  });

  test("a body larger than maxBlobBytes is abandoned, announced or not, and nothing of it is kept", async () => {
    origin.routes.set("/big", { kind: "file", body: Buffer.alloc(1024 * 1024 + 1, 7) });
    await assert.rejects(
      fetchBlob(farm, { uris: [`${origin.url}/big`] }),
      failsWith(Code.NOT_FOUND, /its 1048577 bytes are more than asset\.fetch\.maxBlobBytes \(1048576\)/),
    );
    // 64 MiB without a Content-Length: cut off a chunk past the cap, not read to the end.
    origin.routes.set("/endless", { kind: "endless", bytes: 64 * 1024 * 1024 });
    await assert.rejects(
      fetchBlob(farm, { uris: [`${origin.url}/endless`] }),
      failsWith(Code.NOT_FOUND, /it sent more than asset\.fetch\.maxBlobBytes \(1048576 bytes\)/),
    );
    assert.deepEqual(await tempFiles(), []);
  });

  test("a body of unknown length one byte over maxBlobBytes is refused; one of exactly maxBlobBytes is stored", async () => {
    // curl runs under prlimit --fsize=max+1: the file may reach max+1 bytes, which must still be a refusal.
    const over = Buffer.alloc(1024 * 1024 + 1, 3);
    origin.routes.set("/over-by-one", { kind: "file", body: over, chunked: true });
    await assert.rejects(
      fetchBlob(farm, { uris: [`${origin.url}/over-by-one`] }),
      failsWith(Code.NOT_FOUND, /it sent more than asset\.fetch\.maxBlobBytes \(1048576 bytes\)/),
    );
    const exact = Buffer.alloc(1024 * 1024, 4);
    origin.routes.set("/exactly-max", { kind: "file", body: exact, chunked: true });
    const answer = await fetchBlob(farm, { uris: [`${origin.url}/exactly-max`], qualifiers: [sri(exact)] });
    assert.deepEqual(answer.blobDigest, sha256(exact));
    assert.deepEqual(await readBlob(farm, sha256(exact)), exact);
    assert.deepEqual(await tempFiles(), []);
  });

  test("a farm that may download keeps one curl started ahead, and ends it when it stops", async () => {
    const before = new Set((await curlChildren()).map((c) => c.pid));
    const newCurls = async () => (await curlChildren()).filter((c) => !before.has(c.pid));
    const other = await startTestFarm({ asset: { fetch: { allowedHosts: [`127.0.0.1:${origin.port}`] } } });
    let started: { pid: number; cmdline: string }[] = [];
    try {
      for (let i = 0; i < 100 && started.length === 0; i++) {
        started = await newCurls();
        if (started.length === 0) await new Promise((resolve) => setTimeout(resolve, 20));
      }
      assert.equal(started.length, 1, "one curl waits for the first download");
      assert.equal(started[0]?.cmdline, "curl -q -K -");
    } finally {
      await other.close();
    }
    for (let i = 0; i < 100 && (await newCurls()).length > 0; i++) await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(await newCurls(), [], "the waiting curl ended with the farm");
  });

  test("request headers reach the origin as given: quotes, backslashes and an empty value, none taken as curl syntax", async () => {
    origin.routes.set("/headers", { kind: "file", body: Buffer.from("headers") });
    const tricky = 'a "quoted" \\back\\slash\\" \\n -o /etc/passwd';
    await fetchBlob(farm, {
      uris: [`${origin.url}/headers`],
      qualifiers: [
        { name: "http_header:X-Tricky", value: tricky },
        { name: "http_header:X-Empty", value: "" },
      ],
    });
    const received = origin.lastHeaders("/headers");
    assert.equal(received?.["x-tricky"], tricky);
    assert.equal(received?.["x-empty"], "");
    assert.equal(received?.["user-agent"], "berth-remote-asset");
  });

  test("an empty body, announced or not, is the empty blob (curl creates no file for it)", async () => {
    origin.routes.set("/empty", { kind: "file", body: Buffer.alloc(0) });
    origin.routes.set("/empty-chunked", { kind: "file", body: Buffer.alloc(0), chunked: true });
    for (const path of ["/empty", "/empty-chunked"]) {
      const answer = await fetchBlob(farm, { uris: [`${origin.url}${path}`], qualifiers: [sri(Buffer.alloc(0))] });
      assert.deepEqual(answer.blobDigest, sha256(Buffer.alloc(0)));
    }
    assert.deepEqual(await tempFiles(), []);
  });

  test("curl's command line shows neither the URL nor the credentials, and a hanging download leaves no curl behind", async () => {
    const secret = "Bearer cmdline-s3cr3t";
    origin.routes.set("/hang-private", { kind: "hang", first: Buffer.from("partial"), length: 1000 });
    // A pre-signed URL keeps its signature in the query: as secret as a header.
    const uri = `${origin.url}/hang-private?X-Amz-Signature=query-s3cr3t`;
    const pending = fetchBlob(farm, {
      uris: [uri],
      qualifiers: [{ name: "bazel.auth_headers", value: JSON.stringify({ [uri]: { Authorization: secret } }) }],
      timeout: { seconds: 2, nanos: 0 },
    });
    const outcome = pending.then(
      () => undefined,
      (err: ServiceError) => err,
    );
    while (origin.hits("/hang-private") === 0) await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(origin.lastHeaders("/hang-private")?.authorization, secret, "the origin got the credentials");
    // The download's curl, and at most one started ahead for the next download (curl-launcher.ts).
    const running = await curlChildren();
    assert.ok(running.length >= 1 && running.length <= 2, `curl processes: ${JSON.stringify(running)}`);
    for (const { cmdline } of running) {
      assert.equal(cmdline, "curl -q -K -", "curl's whole command line");
    }
    const err = await outcome;
    assert.equal(err?.code, Code.DEADLINE_EXCEEDED);
    const left = new Set((await curlChildren()).map((c) => c.pid));
    assert.ok(left.size <= 1, "at most the one started ahead is left");
    assert.ok(
      running.filter((c) => left.has(c.pid)).length < running.length,
      "the download's curl was killed before the answer",
    );
    assert.deepEqual(await tempFiles(), []);
  });

  test("an origin that hangs is DEADLINE_EXCEEDED at the request's timeout, and the next URI is not tried after it", async () => {
    origin.routes.set("/hang-body", { kind: "hang", first: Buffer.from("partial"), length: 1000 });
    origin.routes.set("/silent", { kind: "silent" });
    for (const path of ["/hang-body", "/silent"]) {
      const started = Date.now();
      await assert.rejects(
        fetchBlob(farm, { uris: [`${origin.url}${path}`, `${origin.url}/here`], timeout: { seconds: 1, nanos: 0 } }),
        failsWith(Code.DEADLINE_EXCEEDED, /did not finish within its timeout of 1 s: uris\[0\] .*timeout passed/),
      );
      const took = Date.now() - started;
      assert.ok(took >= 900 && took < 5000, `answered after ${took} ms`);
    }
    assert.deepEqual(await tempFiles(), []);
  });

  test("downloads beyond maxConcurrentDownloads wait for a slot, and time out waiting without touching the origin", async () => {
    const narrow = await startTestFarm({
      asset: { fetch: { allowedHosts: [`127.0.0.1:${origin.port}`], maxConcurrentDownloads: 1 } },
    });
    try {
      origin.routes.set("/occupies", { kind: "silent" });
      origin.routes.set("/queued", { kind: "file", body: Buffer.from("queued") });
      const occupying = fetchBlob(narrow, { uris: [`${origin.url}/occupies`], timeout: { seconds: 2, nanos: 0 } });
      await new Promise((resolve) => setTimeout(resolve, 200));
      await assert.rejects(
        fetchBlob(narrow, { uris: [`${origin.url}/queued`], timeout: { seconds: 1, nanos: 0 } }),
        failsWith(Code.DEADLINE_EXCEEDED, /waited for a download slot: all 1 \(asset\.fetch\.maxConcurrentDownloads\)/),
      );
      assert.equal(origin.hits("/queued"), 0);
      // Once the slot is free again, a waiting fetch gets it.
      const waiting = fetchBlob(narrow, { uris: [`${origin.url}/queued`], timeout: { seconds: 10, nanos: 0 } });
      await assert.rejects(occupying, failsWith(Code.DEADLINE_EXCEEDED, /timeout/));
      assert.deepEqual((await waiting).blobDigest, sha256("queued"));
    } finally {
      await narrow.close();
    }
  });

  test("a download outlives a client that gave up: the next call gets it without a second download", async () => {
    const body = Buffer.from("worth the wait");
    origin.routes.set("/slow", { kind: "slow", body, delayMs: 800 });
    const request = FetchBlobRequest.fromPartial({ uris: [`${origin.url}/slow`], qualifiers: [sri(body)] });
    const impatient = new Promise<FetchBlobResponse>((resolve, reject) => {
      farm.clients.fetch.fetchBlob(request, new Metadata(), { deadline: Date.now() + 200 }, (err, res) =>
        err ? reject(err) : resolve(res),
      );
    });
    await assert.rejects(impatient, (err: ServiceError) => err.code === Code.DEADLINE_EXCEEDED);
    await new Promise((resolve) => setTimeout(resolve, 1200));
    const later = await fetchBlob(farm, request);
    assert.deepEqual(later.blobDigest, sha256(body));
    assert.equal(origin.hits("/slow"), 1);
  });

  test("credentials in bazel.auth_headers reach only their URI's origin and are never logged, echoed or remembered", async () => {
    const secret = "Bearer s3cr3t-token-for-the-origin";
    const body = Buffer.from("private artifact");
    const uri = `${origin.url}/private`;
    origin.routes.set("/private", { kind: "file", body });
    const auth = { name: "bazel.auth_headers", value: JSON.stringify({ [uri]: { Authorization: secret } }) };
    const answer = await fetchBlob(farm, { uris: [uri], qualifiers: [auth] });
    assert.deepEqual(answer.blobDigest, sha256(body));
    assert.equal(origin.lastHeaders("/private")?.authorization, secret);
    assert.deepEqual(answer.qualifiers, [], "the credentials are not echoed");
    // Not remembered without a checksum: a client without the credentials is not answered from the farm.
    await fetchBlob(farm, { uris: [uri] });
    assert.equal(origin.hits("/private"), 2);
    assert.equal(origin.lastHeaders("/private")?.authorization, undefined);
    // A redirect to another origin (allowed) does not carry them along.
    origin.routes.set("/private-moved", { kind: "redirect", location: `http://localhost:${origin.port}/private` });
    const moved = `${origin.url}/private-moved`;
    await fetchBlob(farm, {
      uris: [moved],
      qualifiers: [{ name: "bazel.auth_headers", value: JSON.stringify({ [moved]: { Authorization: secret } }) }],
    });
    assert.equal(origin.lastHeaders("/private-moved")?.authorization, secret);
    assert.equal(origin.lastHeaders("/private")?.authorization, undefined);
    // A failure with credentials does not say them either.
    const failed = await fetchBlob(farm, {
      uris: [`${origin.url}/nothing`],
      qualifiers: [
        { name: "bazel.auth_headers", value: JSON.stringify({ [`${origin.url}/nothing`]: { Authorization: secret } }) },
      ],
    }).catch((err: ServiceError) => err);
    assert.equal((failed as ServiceError).code, Code.NOT_FOUND);
    assert.doesNotMatch((failed as ServiceError).details, /s3cr3t/);
    assert.ok(logLines.length > 0);
    assert.equal(logLines.filter((line) => line.includes("s3cr3t")).length, 0, "a log line holds the secret");
  });
});
