import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { ReadableStream as NodeReadableStream } from "node:stream/web";
import { after, before, test } from "node:test";
import { promisify } from "node:util";
import { DOCKER_IMAGE_MARKER, DOCKER_LAYOUT, DOCKER_PROGRAMS, dockerImage } from "./docker-image.js";
import { type BuiltImage, MARKER_PATH, startRegistry, type TestRegistry } from "./registry.js";

const run = promisify(execFile);

let registry: TestRegistry;
let image: BuiltImage;
let reference: string;

before(async () => {
  // Cold on a fresh machine: a debootstrap (≈45 s) and a umoci pack (≈1 min); then cached in /var/cache/berth-test.
  image = await dockerImage((line) => console.log(line));
  registry = await startRegistry();
  reference = await registry.push(image, "tools/docker", "v1");
});

after(async () => {
  await registry?.stop();
});

/**
 * GNU tar (C gzip: twice as fast as zlib and tar-stream here) run on a layer blob as the registry serves it;
 * its output.
 */
async function tarOfBlob(digest: string, args: string[]): Promise<string> {
  const response = await fetch(`http://${registry.host}/v2/tools/docker/blobs/${digest}`);
  assert.equal(response.status, 200);
  assert.ok(response.body);
  const tar = spawn("tar", args, { stdio: ["pipe", "pipe", "inherit"] });
  const chunks: Buffer[] = [];
  tar.stdout.on("data", (chunk: Buffer) => chunks.push(chunk));
  const exited = new Promise<number | null>((resolve) => tar.once("close", resolve));
  await pipeline(Readable.fromWeb(response.body as NodeReadableStream<Uint8Array>), tar.stdin);
  assert.equal(await exited, 0, `tar ${args.join(" ")} of ${digest}`);
  return Buffer.concat(chunks).toString();
}

/** `tar -tvz` of a layer: each path (without a leading ./) with its `ls -l` mode string. */
async function layerModes(digest: string): Promise<Map<string, string>> {
  const modes = new Map<string, string>();
  for (const line of (await tarOfBlob(digest, ["-tvz"])).split("\n")) {
    // -rwxr-xr-x root/root 75181184 2026-05-07 10:00 ./usr/sbin/dockerd
    const match = /^(\S{10})\s+\S+\s+\d+\s+\S+\s+\S+\s+(?:\.\/)?(.*?)(?: -> .*| link to .*)?$/.exec(line);
    if (match?.[1] && match[2] !== undefined) modes.set(match[2].replace(/\/$/, ""), match[1]);
  }
  return modes;
}

test("the image is cached: a second call gives the same layout in /var/cache/berth-test", async () => {
  const again = await dockerImage();
  assert.equal(again.layout, DOCKER_LAYOUT);
  assert.equal(again.digest, image.digest);
  assert.equal(image.marker, DOCKER_IMAGE_MARKER);
});

test("the pushed image has Docker's programs, a Debian configuration and the marker layer", async () => {
  const { stdout: configJson } = await run("skopeo", [
    "inspect",
    "--config",
    "--tls-verify=false",
    `docker://${reference}`,
  ]);
  const config = JSON.parse(configJson) as { config: { Env?: string[]; Cmd?: string[] }; architecture: string };
  assert.equal(config.architecture, "amd64");
  assert.deepEqual(config.config.Cmd, ["/bin/bash"]);
  assert.ok(config.config.Env?.includes("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"));

  const { stdout: manifestJson } = await run("skopeo", [
    "inspect",
    "--raw",
    "--tls-verify=false",
    `docker://${reference}`,
  ]);
  const manifest = JSON.parse(manifestJson) as { layers: { digest: string; mediaType: string }[] };
  assert.equal(manifest.layers.length, 2, "the debootstrapped root, then the marker layer");
  for (const layer of manifest.layers) assert.equal(layer.mediaType, "application/vnd.oci.image.layer.v1.tar+gzip");

  const [baseLayer, topLayer] = manifest.layers;
  assert.ok(baseLayer && topLayer);
  const base = await layerModes(baseLayer.digest);
  for (const program of DOCKER_PROGRAMS) {
    const mode = base.get(program);
    assert.ok(mode, `/${program} is in the image`);
    assert.match(mode, /^-..x/, `/${program} is a regular file its owner can run`);
  }
  assert.ok(base.has("bin/bash") || base.has("usr/bin/bash"));
  assert.equal(
    [...base.keys()].filter((path) => path.startsWith("var/cache/apt/archives/") && path.endsWith(".deb")).length,
    0,
    "the downloaded packages are not in the image",
  );
  const marker = await tarOfBlob(topLayer.digest, ["-xzO", "--wildcards", `*${MARKER_PATH}`]);
  assert.equal(marker, `${DOCKER_IMAGE_MARKER}\n`);
});
