import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { type AddressInfo, createServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { gunzipSync } from "node:zlib";
import { extract } from "tar-stream";
import {
  busyboxImage,
  freePort,
  LAYERED_IMAGE,
  layeredImage,
  MARKER_PATH,
  multiArchImage,
  startRegistry,
  type TestRegistry,
} from "../../test/support/registry.js";
import { parseImageReference } from "../image/reference.js";
import { createRegistryClient, type RegistryClient, type ResolvedImage } from "./client.js";
import { RegistryError, type RegistryErrorKind } from "./errors.js";
import { MediaType } from "./media-types.js";
import { defaultPlatform } from "./platform.js";

const FAST_RETRY = { maxAttempts: 3, initialDelayMs: 10, maxDelayMs: 20 };

async function rejectsWith(
  promise: Promise<unknown>,
  kind: RegistryErrorKind,
  message: RegExp,
): Promise<RegistryError> {
  let caught: unknown;
  await assert.rejects(promise, (err: unknown) => {
    caught = err;
    return true;
  });
  assert.ok(caught instanceof RegistryError, `expected a RegistryError, got ${String(caught)}`);
  assert.equal(caught.kind, kind, caught.message);
  assert.match(caught.message, message);
  return caught;
}

/** Reads one file out of a (gzip or plain) layer tarball, independently of Berth's unpacker. */
async function fileInLayer(layerPath: string, name: string): Promise<string | undefined> {
  const raw = await readFile(layerPath);
  const tar = raw[0] === 0x1f && raw[1] === 0x8b ? gunzipSync(raw) : raw;
  const reader = extract();
  let found: string | undefined;
  const done = new Promise<void>((resolve, reject) => {
    reader.on("entry", (header, stream, next) => {
      const chunks: Buffer[] = [];
      stream.on("data", (c: unknown) => chunks.push(c as Buffer));
      stream.on("end", () => {
        if (header.name.replace(/^\.\//, "") === name) found = Buffer.concat(chunks).toString();
        next();
      });
    });
    reader.on("finish", resolve);
    reader.on("error", reject);
  });
  reader.end(tar);
  await done;
  return found;
}

describe("registry client on an open registry", () => {
  let registry: TestRegistry;
  let client: RegistryClient;
  let scratch: string;

  before(async () => {
    registry = await startRegistry();
    client = createRegistryClient({ retry: FAST_RETRY });
    scratch = await mkdtemp(join(tmpdir(), "berth-registry-test-"));
  });
  after(async () => {
    await registry?.stop();
    await rm(scratch, { recursive: true, force: true });
  });

  async function newDir(name: string): Promise<string> {
    const dir = join(scratch, name);
    await rm(dir, { recursive: true, force: true });
    await mkdir(dir);
    return dir;
  }

  it("resolves a tag to the OCI manifest it was pushed as, with its configuration", async () => {
    const image = await busyboxImage("open-one");
    const ref = parseImageReference(await registry.push(image, "tools/busybox", "v1"));
    const resolved = await client.resolve(ref);
    assert.equal(resolved.manifestMediaType, MediaType.ociManifest);
    assert.equal(resolved.manifestDigest, image.digest);
    assert.equal(resolved.indexDigest, undefined);
    assert.equal(String(resolved.reference), `${registry.host}/tools/busybox:v1@${image.digest}`);
    assert.equal(resolved.layers.length, 1);
    assert.equal(resolved.layers[0]?.compression, "gzip");
    assert.deepEqual(resolved.config.env, ["PATH=/bin"]);
    assert.deepEqual(resolved.config.cmd, ["/bin/sh"]);
    assert.equal(resolved.config.workingDir, "/");
    assert.equal(resolved.config.os, "linux");
    assert.equal(resolved.config.architecture, "amd64");
    assert.equal(resolved.config.diffIds.length, 1);
    assert.match(resolved.configDigest, /^sha256:[0-9a-f]{64}$/);
  });

  it("resolves a digest, with or without a tag beside it", async () => {
    const image = await busyboxImage("open-one");
    await registry.push(image, "tools/busybox", "v1");
    for (const text of [
      `${registry.host}/tools/busybox@${image.digest}`,
      `${registry.host}/tools/busybox:ignored@${image.digest}`,
    ]) {
      const resolved = await client.resolve(parseImageReference(text));
      assert.equal(resolved.manifestDigest, image.digest, text);
    }
  });

  it("downloads layers verified, atomically, with progress", async () => {
    const image = await busyboxImage("open-one");
    const ref = parseImageReference(await registry.push(image, "tools/busybox", "v1"));
    const resolved = await client.resolve(ref);
    const layer = resolved.layers[0];
    assert.ok(layer);
    const dir = await newDir("download");
    let last = 0;
    const path = await client.fetchBlob(ref, layer, dir, { onProgress: (received) => (last = received) });
    assert.equal(last, layer.size);
    assert.equal(
      `sha256:${createHash("sha256")
        .update(await readFile(path))
        .digest("hex")}`,
      layer.digest,
    );
    assert.deepEqual(await readdir(dir), [path.slice(dir.length + 1)]);
    assert.equal(await fileInLayer(path, MARKER_PATH), "open-one\n");
    // A second fetch finds the verified file in place.
    assert.equal(await client.fetchBlob(ref, layer, dir), path);
  });

  it("refuses a corrupted blob: invalid, digest mismatch, nothing left behind", async () => {
    const image = await busyboxImage("to-be-corrupted");
    const ref = parseImageReference(await registry.push(image, "tools/corrupt", "v1"));
    const [layer] = (await client.resolve(ref)).layers;
    assert.ok(layer);
    const stored = await readFile(registry.blobPath(layer.digest));
    stored[Math.floor(stored.length / 2)] ^= 0xff;
    await writeFile(registry.blobPath(layer.digest), stored);
    const dir = await newDir("corrupt");
    const err = await rejectsWith(client.fetchBlob(ref, layer, dir), "invalid", /digest mismatch/);
    assert.ok(err.message.includes(String(ref)), err.message);
    assert.ok(err.message.includes(layer.digest), err.message);
    assert.deepEqual(await readdir(dir), []);
  });

  it("refuses a manifest whose bytes do not match its digest", async () => {
    const image = await busyboxImage("tampered-manifest");
    const ref = parseImageReference(await registry.push(image, "tools/tampered", "v1"));
    const path = registry.blobPath(image.digest);
    // Same length, still valid JSON: only the digest check can notice.
    const tampered = (await readFile(path, "utf8")).replace(
      /"size":(\d)/,
      (_m, d: string) => `"size":${(Number(d) + 1) % 10}`,
    );
    await writeFile(path, tampered);
    await rejectsWith(client.resolve(parseImageReference(`${ref}@${image.digest}`)), "invalid", /digest mismatch/);
    await rejectsWith(client.resolve(ref), "invalid", /digest mismatch: the registry says the manifest is/);
  });

  it("reads Docker schema 2 manifests, manifest lists, layer and config types", async () => {
    const single = parseImageReference(
      await registry.push(await busyboxImage("open-one"), "tools/docker-format", "v1", { format: "docker" }),
    );
    const resolved = await client.resolve(single);
    assert.equal(resolved.manifestMediaType, MediaType.dockerManifest);
    assert.equal(resolved.manifest.config.mediaType, MediaType.dockerConfig);
    assert.deepEqual(
      resolved.layers.map((l) => [l.mediaType, l.compression]),
      [[MediaType.dockerLayerGzip, "gzip"]],
    );
    const list = parseImageReference(
      await registry.push(await multiArchImage(), "tools/docker-list", "v1", { format: "docker" }),
    );
    const arm64 = await client.resolve(list, { os: "linux", architecture: "arm64" });
    assert.equal(arm64.manifestMediaType, MediaType.dockerManifest);
    assert.equal(arm64.config.architecture, "arm64");
    const index = await fetch(`http://${registry.host}/v2/tools/docker-list/manifests/v1`, {
      headers: { accept: MediaType.dockerManifestList },
    });
    assert.equal(index.headers.get("content-type"), MediaType.dockerManifestList);
    assert.equal(arm64.indexDigest, index.headers.get("docker-content-digest"));
  });

  it("resolves every layer kind of a layered image", async () => {
    const image = await layeredImage();
    const ref = parseImageReference(await registry.push(image, "tools/layered", "v1"));
    const resolved = await client.resolve(ref);
    assert.deepEqual(
      resolved.layers.map((l) => l.compression),
      ["gzip", "gzip", "gzip", "none"],
    );
    assert.equal(resolved.config.diffIds.length, 4);
    const dir = await newDir("layered");
    const paths = [];
    for (const layer of resolved.layers) paths.push(await client.fetchBlob(ref, layer, dir));
    assert.equal(await fileInLayer(paths[1] ?? "", "etc/.wh.removed-later"), "");
    assert.equal(await fileInLayer(paths[2] ?? "", "opt/replaced/.wh..wh..opq"), "");
    assert.equal(
      await fileInLayer(paths[3] ?? "", "etc/from-uncompressed-layer"),
      LAYERED_IMAGE.present["etc/from-uncompressed-layer"],
    );
  });

  describe("multi-architecture index", () => {
    let ref: ReturnType<typeof parseImageReference>;
    let indexDigest: string;
    before(async () => {
      const image = await multiArchImage();
      indexDigest = image.digest;
      ref = parseImageReference(await registry.push(image, "tools/multi", "v1"));
    });

    async function marker(resolved: ResolvedImage): Promise<string | undefined> {
      const layer = resolved.layers[0];
      assert.ok(layer);
      return fileInLayer(
        await client.fetchBlob(ref, layer, await newDir(`multi-${resolved.config.architecture}`)),
        MARKER_PATH,
      );
    }

    it("picks linux/amd64 by default on this machine and arm64 when asked", async () => {
      assert.deepEqual(defaultPlatform("x64"), { os: "linux", architecture: "amd64" });
      assert.deepEqual(defaultPlatform("arm64"), { os: "linux", architecture: "arm64" });
      const amd64 = await client.resolve(ref, { os: "linux", architecture: "amd64" });
      assert.equal(amd64.indexDigest, indexDigest);
      assert.notEqual(amd64.manifestDigest, indexDigest);
      assert.equal(amd64.config.architecture, "amd64");
      assert.equal(await marker(amd64), "multi-amd64\n");
      if (process.arch === "x64") assert.equal((await client.resolve(ref)).manifestDigest, amd64.manifestDigest);
      const arm64 = await client.resolve(ref, { os: "linux", architecture: "arm64" });
      assert.equal(arm64.config.architecture, "arm64");
      assert.equal(await marker(arm64), "multi-arm64\n");
      const v8 = await client.resolve(ref, { os: "linux", architecture: "arm64", variant: "v8" });
      assert.equal(v8.manifestDigest, arm64.manifestDigest);
    });

    it("names the platforms on offer when the wanted one is missing", async () => {
      await rejectsWith(
        client.resolve(ref, { os: "linux", architecture: "s390x" }),
        "not-found",
        /tools\/multi:v1: the image has no variant for platform linux\/s390x; it offers linux\/amd64, linux\/arm64\/v8/,
      );
    });
  });

  it("reports a missing tag, repository or blob as not-found, naming the image", async () => {
    await registry.push(await busyboxImage("open-one"), "tools/busybox", "v1");
    const missingTag = parseImageReference(`${registry.host}/tools/busybox:nope`);
    await rejectsWith(
      client.resolve(missingTag),
      "not-found",
      /tools\/busybox:nope: tag "nope" does not exist in repository tools\/busybox/,
    );
    const missingRepo = parseImageReference(`${registry.host}/no/such/repo`);
    await rejectsWith(client.resolve(missingRepo), "not-found", /no\/such\/repo:latest: .*repository/);
    const digest = `sha256:${"0".repeat(64)}`;
    await rejectsWith(
      client.resolve(parseImageReference(`${registry.host}/tools/busybox@${digest}`)),
      "not-found",
      /manifest sha256:0+ does not exist/,
    );
    const dir = await newDir("missing-blob");
    await rejectsWith(
      client.fetchBlob(missingTag, { digest, size: 3 }, dir),
      "not-found",
      /blob sha256:0+ is not in repository tools\/busybox/,
    );
    assert.deepEqual(await readdir(dir), []);
  });

  it("gives up on an unreachable registry quickly, after the configured attempts", async () => {
    const port = await freePort();
    const ref = parseImageReference(`127.0.0.1:${port}/tools/busybox:v1`);
    const started = Date.now();
    await rejectsWith(
      client.resolve(ref),
      "unavailable",
      new RegExp(
        `127\\.0\\.0\\.1:${port}/tools/busybox:v1: cannot reach http://127\\.0\\.0\\.1:${port}: connection refused.*gave up after 3 attempts`,
      ),
    );
    assert.ok(Date.now() - started < 2000);
  });

  it("stops at once when the pull is cancelled or times out", async () => {
    const ref = parseImageReference(`${registry.host}/tools/busybox:v1`);
    await rejectsWith(client.resolve(ref, undefined, { signal: AbortSignal.abort() }), "unavailable", /cancelled/);
    // A server that accepts connections and never answers: only the timeout ends the pull.
    const sockets: Socket[] = [];
    const silent = createServer((socket) => sockets.push(socket));
    await new Promise<void>((resolve) => silent.listen(0, "127.0.0.1", resolve));
    const { port } = silent.address() as AddressInfo;
    const slow = createRegistryClient({ timeoutMs: 200 });
    const started = Date.now();
    try {
      await rejectsWith(
        slow.resolve(parseImageReference(`127.0.0.1:${port}/a:b`)),
        "unavailable",
        /did not finish within 0.2 s/,
      );
    } finally {
      for (const socket of sockets) socket.destroy();
      silent.close();
    }
    assert.ok(Date.now() - started < 2000);
  });
});
