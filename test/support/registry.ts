/**
 * Real OCI registries and real images for tests: Debian's `docker-registry`
 * (distribution 2.8) on a loopback port, images built by `umoci` from
 * busybox-static and pushed by `skopeo`. Nothing here imitates a registry.
 *
 *   const registry = await startRegistry({ auth: "basic" });
 *   const ref = await registry.push(await busyboxImage("one"), "tools/busybox", "v1");
 *   … await registry.stop();
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { createHash, createPrivateKey, randomBytes, sign, X509Certificate } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { chmod, copyFile, cp, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { createServer as createHttpServer, type Server } from "node:http";
import { createServer as createNetServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { gzipSync } from "node:zlib";
import { pack } from "tar-stream";

const run = promisify(execFile);

export type RegistryAuth = "none" | "basic" | "token";

export interface StartRegistryOptions {
  /** "none" (default): open; "basic": htpasswd; "token": Bearer tokens from a token server started alongside. */
  readonly auth?: RegistryAuth;
  readonly username?: string;
  readonly password?: string;
  /** Token auth only: the realm the registry announces, instead of the token server's (nothing is started then). */
  readonly tokenRealm?: string;
}

export interface TestRegistry {
  /** `127.0.0.1:PORT`, the registry part of image references. */
  readonly host: string;
  readonly port: number;
  readonly auth: RegistryAuth;
  readonly username: string;
  readonly password: string;
  /** The registry's storage root (`storage.filesystem.rootdirectory`). */
  readonly rootDir: string;
  /** How many token requests the token server answered (token auth). */
  readonly tokenRequests: number;
  /**
   * Pushes an image (every platform of a multi-architecture one) and returns `host/repository:tag`.
   * `format: "docker"` converts it to Docker schema 2 (manifest list, manifests, layer and config types).
   */
  push(image: BuiltImage, repository: string, tag: string, options?: { format?: "oci" | "docker" }): Promise<string>;
  /** The file in the registry's storage holding a blob's bytes (to corrupt it on purpose). */
  blobPath(digest: string): string;
  stop(): Promise<void>;
}

export const DEFAULT_USERNAME = "berth-user";
export const DEFAULT_PASSWORD = "Pa55-word-that-must-not-leak";

/** Starts a registry on a free loopback port with its storage in a new temporary directory. */
export async function startRegistry(options: StartRegistryOptions = {}): Promise<TestRegistry> {
  const auth = options.auth ?? "none";
  const username = options.username ?? DEFAULT_USERNAME;
  const password = options.password ?? DEFAULT_PASSWORD;
  const dir = await mkdtemp(join(tmpdir(), "berth-registry-"));
  const rootDir = join(dir, "storage");
  const port = await freePort();
  let tokenServer: TokenServer | undefined;
  const config: Record<string, unknown> = {
    version: 0.1,
    log: { level: "error", accesslog: { disabled: true } },
    storage: { filesystem: { rootdirectory: rootDir }, delete: { enabled: true } },
    http: { addr: `127.0.0.1:${port}` },
  };
  if (auth === "basic") {
    const { stdout } = await run("htpasswd", ["-Bbn", username, password]);
    await writeFile(join(dir, "htpasswd"), stdout);
    config.auth = { htpasswd: { realm: "basic-realm", path: join(dir, "htpasswd") } };
  } else if (auth === "token") {
    const { certPem, keyPem } = await selfSignedCertificate(dir);
    await writeFile(join(dir, "cert.pem"), certPem);
    if (options.tokenRealm === undefined) tokenServer = await startTokenServer(certPem, keyPem, username, password);
    config.auth = {
      token: {
        realm: options.tokenRealm ?? tokenServer?.realm,
        service: TOKEN_SERVICE,
        issuer: TOKEN_ISSUER,
        rootcertbundle: join(dir, "cert.pem"),
      },
    };
  }
  // JSON is YAML, and needs no YAML library.
  await writeFile(join(dir, "config.yml"), JSON.stringify(config));
  const child = spawn("docker-registry", ["serve", join(dir, "config.yml")], { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr?.on("data", (chunk: Buffer) => {
    stderr = (stderr + chunk.toString()).slice(-4000);
  });
  const host = `127.0.0.1:${port}`;
  try {
    await waitUntilServing(host, child, () => stderr);
  } catch (err) {
    child.kill("SIGKILL");
    tokenServer?.server.close();
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
  const creds = auth === "none" ? [] : ["--dest-creds", `${username}:${password}`];
  return {
    host,
    port,
    auth,
    username,
    password,
    rootDir,
    get tokenRequests() {
      return tokenServer?.requests ?? 0;
    },
    async push(image, repository, tag, pushOptions = {}) {
      const target = `${host}/${repository}:${tag}`;
      const all = image.multiArch ? ["--all"] : [];
      // Keep the layout's bytes as they are (skopeo would otherwise gzip the uncompressed layer), unless converting.
      const format = pushOptions.format === "docker" ? ["--format", "v2s2"] : ["--preserve-digests"];
      await run("skopeo", [
        "copy",
        "--quiet",
        ...format,
        ...all,
        "--dest-tls-verify=false",
        ...creds,
        `oci:${image.layout}:${image.tag}`,
        `docker://${target}`,
      ]);
      return target;
    },
    blobPath(digest) {
      const hex = digest.replace(/^sha256:/, "");
      return join(rootDir, "docker/registry/v2/blobs/sha256", hex.slice(0, 2), hex, "data");
    },
    async stop() {
      // The registry takes ~2 s to exit on SIGTERM; tests have nothing to flush.
      const exited = new Promise((resolve) => child.once("exit", resolve));
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      await exited;
      await new Promise((resolve) => (tokenServer ? tokenServer.server.close(resolve) : resolve(undefined)));
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** A port that was free a moment ago (the registry cannot be told to pick one itself). */
export async function freePort(): Promise<number> {
  const server = createNetServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  await new Promise((resolve) => server.close(resolve));
  if (address === null || typeof address === "string") throw new Error("no port");
  return address.port;
}

async function waitUntilServing(host: string, child: ChildProcess, stderr: () => string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`docker-registry exited with ${child.exitCode}: ${stderr()}`);
    try {
      await fetch(`http://${host}/v2/`);
      return;
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  }
  throw new Error(`docker-registry did not answer on ${host} within 10 s: ${stderr()}`);
}

// ---------------------------------------------------------------- token auth

const TOKEN_SERVICE = "berth-test-registry";
const TOKEN_ISSUER = "berth-test-issuer";

interface TokenServer {
  readonly server: Server;
  readonly realm: string;
  requests: number;
}

async function selfSignedCertificate(dir: string): Promise<{ certPem: string; keyPem: string }> {
  const keyFile = join(dir, "token-key.pem");
  const certFile = join(dir, "token-cert.pem");
  await run("openssl", [
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-days",
    "2",
    "-subj",
    "/CN=berth-test-token-issuer",
    "-keyout",
    keyFile,
    "-out",
    certFile,
  ]);
  return { certPem: await readFile(certFile, "utf8"), keyPem: await readFile(keyFile, "utf8") };
}

/**
 * The token service of the distribution spec: checks Basic credentials and
 * answers a JWT signed with RS256 whose `x5c` header carries the certificate
 * the registry trusts. Anonymous requests get a token granting nothing.
 */
async function startTokenServer(
  certPem: string,
  keyPem: string,
  username: string,
  password: string,
): Promise<TokenServer> {
  const key = createPrivateKey(keyPem);
  const certDer = new X509Certificate(certPem).raw.toString("base64");
  const state = { requests: 0 };
  const server = createHttpServer((req, res) => {
    state.requests++;
    const url = new URL(req.url ?? "/", "http://token");
    const header = req.headers.authorization ?? "";
    const given = header.startsWith("Basic ") ? Buffer.from(header.slice(6), "base64").toString() : undefined;
    if (given !== undefined && given !== `${username}:${password}`) {
      res.writeHead(401, { "content-type": "application/json" }).end('{"details":"incorrect username or password"}');
      return;
    }
    const access =
      given === undefined
        ? []
        : url.searchParams.getAll("scope").flatMap((scope) => {
            const [type, name, actions] = [
              scope.split(":")[0],
              scope.split(":").slice(1, -1).join(":"),
              scope.split(":").at(-1),
            ];
            return type && name && actions ? [{ type, name, actions: actions.split(",") }] : [];
          });
    const now = Math.floor(Date.now() / 1000);
    const jwt = signJwt(
      { alg: "RS256", typ: "JWT", x5c: [certDer] },
      {
        iss: TOKEN_ISSUER,
        sub: given === undefined ? "" : username,
        aud: url.searchParams.get("service") ?? "",
        exp: now + 300,
        nbf: now - 10,
        iat: now,
        jti: randomBytes(8).toString("hex"),
        access,
      },
      key,
    );
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ token: jwt, expires_in: 300, issued_at: new Date().toISOString() }));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  if (address === null || typeof address === "string") throw new Error("token server has no port");
  const tokenServer: TokenServer = {
    server,
    realm: `http://127.0.0.1:${address.port}/token`,
    get requests() {
      return state.requests;
    },
  };
  return tokenServer;
}

function signJwt(header: object, claims: object, key: ReturnType<typeof createPrivateKey>): string {
  const encode = (value: object) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const input = `${encode(header)}.${encode(claims)}`;
  return `${input}.${sign("sha256", Buffer.from(input), key).toString("base64url")}`;
}

// ---------------------------------------------------------------- images

/** An image in an OCI layout on disk, ready for `TestRegistry.push`. */
export interface BuiltImage {
  readonly layout: string;
  /** The tag inside the layout. */
  readonly tag: string;
  /** Digest of what the tag names: the image manifest, or the index of a multi-architecture image. */
  readonly digest: string;
  readonly multiArch: boolean;
  /** The content of `/etc/berth-image-marker`, per platform for multi-architecture images. */
  readonly marker: string;
}

export const MARKER_PATH = "etc/berth-image-marker";

/**
 * What the layered image holds after its four layers are applied in order:
 * 1. (umoci, gzip) busybox, `etc/removed-later`, `opt/replaced/{old-a,old-b}`, `opt/kept/file`;
 * 2. (umoci, gzip) deletes `etc/removed-later` (a `.wh.` whiteout), adds `etc/added-in-layer-2`;
 * 3. (hand-made, gzip) replaces `opt/replaced` by an opaque directory holding only `new`;
 * 4. (hand-made, uncompressed tar) adds `etc/from-uncompressed-layer`.
 */
export const LAYERED_IMAGE = {
  marker: "layered",
  present: {
    "etc/added-in-layer-2": "added in layer 2\n",
    "opt/replaced/new": "new content from the opaque layer\n",
    "opt/kept/file": "kept\n",
    "etc/from-uncompressed-layer": "uncompressed\n",
  },
  absent: ["etc/removed-later", "opt/replaced/old-a", "opt/replaced/old-b"],
} as const;

const built = new Map<string, Promise<BuiltImage>>();
let workDir: string | undefined;

/** Images are built once per test process, in a directory removed when it exits. */
function imagesDir(): string {
  if (workDir === undefined) {
    const dir = mkdtempSync(join(tmpdir(), "berth-images-"));
    process.once("exit", () => rmSync(dir, { recursive: true, force: true }));
    workDir = dir;
  }
  return workDir;
}

function cached(key: string, build: () => Promise<BuiltImage>): Promise<BuiltImage> {
  let image = built.get(key);
  if (!image) {
    image = build();
    built.set(key, image);
  }
  return image;
}

/** One gzip layer: busybox with a symlink per applet in /bin, /etc/passwd, /tmp, and the marker. */
export function busyboxImage(marker = "busybox", architecture = "amd64"): Promise<BuiltImage> {
  return cached(`busybox:${marker}:${architecture}`, async () => {
    const layout = join(imagesDir(), `busybox-${hash(marker + architecture)}`);
    await umociImage(layout, "t", [async (rootfs) => writeBusyboxRoot(rootfs, marker)], architecture);
    return { layout, tag: "t", digest: await tagDigest(layout, "t"), multiArch: false, marker };
  });
}

/** Four layers with a whiteout, an opaque directory and an uncompressed layer; see `LAYERED_IMAGE`. */
export function layeredImage(): Promise<BuiltImage> {
  return cached("layered", async () => {
    const layout = join(imagesDir(), "layered");
    await umociImage(layout, "t", [
      async (rootfs) => {
        await writeBusyboxRoot(rootfs, LAYERED_IMAGE.marker);
        await writeFiles(rootfs, {
          "etc/removed-later": "to be deleted by layer 2\n",
          "opt/replaced/old-a": "old a\n",
          "opt/replaced/old-b": "old b\n",
          "opt/kept/file": "kept\n",
        });
      },
      async (rootfs) => {
        await rm(join(rootfs, "etc/removed-later"));
        await writeFiles(rootfs, { "etc/added-in-layer-2": "added in layer 2\n" });
      },
    ]);
    // umoci never writes opaque whiteouts (it lists every deleted entry), so this layer is made by hand.
    const opaque = await tarBytes([
      { name: "opt/", type: "directory" },
      { name: "opt/replaced/", type: "directory" },
      { name: "opt/replaced/.wh..wh..opq", content: "" },
      { name: "opt/replaced/new", content: LAYERED_IMAGE.present["opt/replaced/new"] },
    ]);
    await appendLayer(layout, "t", gzipSync(opaque), opaque, "application/vnd.oci.image.layer.v1.tar+gzip");
    const plain = await tarBytes([
      { name: "etc/", type: "directory" },
      { name: "etc/from-uncompressed-layer", content: LAYERED_IMAGE.present["etc/from-uncompressed-layer"] },
    ]);
    await appendLayer(layout, "t", plain, plain, "application/vnd.oci.image.layer.v1.tar");
    return { layout, tag: "t", digest: await tagDigest(layout, "t"), multiArch: false, marker: LAYERED_IMAGE.marker };
  });
}

/**
 * `base` with one more layer holding `files`: a second image whose bottom
 * layer is byte for byte the base's (a shared base layer).
 */
export function extendedImage(base: BuiltImage, files: Record<string, string>): Promise<BuiltImage> {
  return cached(`extended:${base.layout}:${JSON.stringify(files)}`, async () => {
    const layout = join(imagesDir(), `extended-${hash(base.layout + JSON.stringify(files))}`);
    await cp(base.layout, layout, { recursive: true });
    const dirs = new Set<string>();
    for (const path of Object.keys(files)) {
      const parts = path.split("/").slice(0, -1);
      for (let i = 1; i <= parts.length; i++) dirs.add(`${parts.slice(0, i).join("/")}/`);
    }
    const tar = await tarBytes([
      ...[...dirs].sort().map((name) => ({ name, type: "directory" as const })),
      ...Object.entries(files).map(([name, content]) => ({ name, content })),
    ]);
    await appendLayer(layout, base.tag, gzipSync(tar), tar, "application/vnd.oci.image.layer.v1.tar+gzip");
    return { layout, tag: base.tag, digest: await tagDigest(layout, base.tag), multiArch: false, marker: base.marker };
  });
}

/** A layer to put on an image: its blob as the registry serves it, and the digest of its tar (`sha256:…`). */
export interface ExtraLayer {
  blob: Buffer;
  diffId: string;
  mediaType: string;
}

/**
 * `base` with `layers` on top, in a layout named by `name` (one image per
 * name and process): hostile or unusual layers made by hand, on a base
 * that runs.
 */
export function imageWithLayers(base: BuiltImage, name: string, layers: readonly ExtraLayer[]): Promise<BuiltImage> {
  return cached(`with-layers:${name}`, async () => {
    const layout = join(imagesDir(), `with-layers-${hash(name)}`);
    await cp(base.layout, layout, { recursive: true });
    for (const layer of layers) await appendLayer(layout, base.tag, layer.blob, layer.diffId, layer.mediaType);
    return { layout, tag: base.tag, digest: await tagDigest(layout, base.tag), multiArch: false, marker: base.marker };
  });
}

/** An OCI index with linux/amd64 (marker "multi-amd64") and linux/arm64/v8 (marker "multi-arm64"). */
export function multiArchImage(): Promise<BuiltImage> {
  return cached("multi", async () => {
    const layout = join(imagesDir(), "multi");
    const platforms = [
      { architecture: "amd64", tag: "amd64" },
      { architecture: "arm64", variant: "v8", tag: "arm64" },
    ];
    for (const p of platforms) {
      // One layout, one tag per platform: `umoci init` runs only for the first.
      await umociImage(
        layout,
        p.tag,
        [async (rootfs) => writeBusyboxRoot(rootfs, `multi-${p.architecture}`)],
        p.architecture,
      );
    }
    const index = await readJson<OciIndex>(join(layout, "index.json"));
    const manifests = platforms.map((p) => {
      const entry = index.manifests.find((m) => m.annotations?.["org.opencontainers.image.ref.name"] === p.tag);
      if (!entry) throw new Error(`no tag ${p.tag} in ${layout}`);
      const platform = { architecture: p.architecture, os: "linux", ...(p.variant ? { variant: p.variant } : {}) };
      return { mediaType: entry.mediaType, digest: entry.digest, size: entry.size, platform };
    });
    const indexBlob = Buffer.from(
      JSON.stringify({ schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests }),
    );
    const digest = await writeBlob(layout, indexBlob);
    index.manifests.push({
      mediaType: "application/vnd.oci.image.index.v1+json",
      digest,
      size: indexBlob.byteLength,
      annotations: { "org.opencontainers.image.ref.name": "multi" },
    });
    await writeFile(join(layout, "index.json"), JSON.stringify(index));
    return { layout, tag: "multi", digest, multiArch: true, marker: "multi-amd64" };
  });
}

type RootfsStep = (rootfs: string) => Promise<void>;

/** One umoci repack per step, each a layer; then the image's configuration. */
async function umociImage(layout: string, tag: string, steps: RootfsStep[], architecture = "amd64"): Promise<void> {
  const image = `${layout}:${tag}`;
  await run("umoci", ["init", "--layout", layout]).catch(async (err: unknown) => {
    // A second platform in the same layout: the layout exists already.
    if (!(await readFile(join(layout, "oci-layout")).catch(() => undefined))) throw err;
  });
  await run("umoci", ["new", "--image", image]);
  const bundle = `${layout}-bundle-${tag}`;
  await run("umoci", ["unpack", "--image", image, bundle]);
  for (const step of steps) {
    await step(join(bundle, "rootfs"));
    // --refresh-bundle: the next repack diffs against this layer, not the empty image.
    await run("umoci", ["repack", "--refresh-bundle", "--image", image, bundle]);
  }
  await run("umoci", [
    "config",
    "--image",
    image,
    "--os",
    "linux",
    "--architecture",
    architecture,
    "--config.env",
    "PATH=/bin",
    "--config.cmd",
    "/bin/sh",
    "--config.workingdir",
    "/",
  ]);
  await rm(bundle, { recursive: true, force: true });
}

async function writeBusyboxRoot(rootfs: string, marker: string): Promise<void> {
  await mkdir(join(rootfs, "bin"), { recursive: true });
  await copyFile("/bin/busybox", join(rootfs, "bin/busybox"));
  await chmod(join(rootfs, "bin/busybox"), 0o755);
  const { stdout } = await run("/bin/busybox", ["--list"]);
  for (const applet of stdout.split("\n").filter((a) => a !== "" && a !== "busybox")) {
    await symlink("busybox", join(rootfs, "bin", applet));
  }
  await writeFiles(rootfs, {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    [MARKER_PATH]: `${marker}\n`,
  });
  await mkdir(join(rootfs, "tmp"), { recursive: true });
  await chmod(join(rootfs, "tmp"), 0o1777);
}

async function writeFiles(rootfs: string, files: Record<string, string>): Promise<void> {
  for (const [path, content] of Object.entries(files)) {
    await mkdir(join(rootfs, path, ".."), { recursive: true });
    await writeFile(join(rootfs, path), content);
  }
}

interface TarEntry {
  name: string;
  type?: "directory";
  content?: string;
}

async function tarBytes(entries: TarEntry[]): Promise<Buffer> {
  const tar = pack();
  const mtime = new Date(0);
  for (const e of entries) {
    if (e.type === "directory") tar.entry({ name: e.name, type: "directory", mode: 0o755, mtime });
    else tar.entry({ name: e.name, mode: 0o644, mtime }, e.content ?? "");
  }
  tar.finalize();
  const chunks: Buffer[] = [];
  for await (const chunk of tar) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

interface OciDescriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}
interface OciIndex {
  schemaVersion: number;
  manifests: OciDescriptor[];
}
interface OciManifest {
  schemaVersion: number;
  mediaType?: string;
  config: OciDescriptor;
  layers: OciDescriptor[];
}
interface OciConfig {
  rootfs: { type: string; diff_ids: string[] };
  history?: { created_by?: string; empty_layer?: boolean }[];
}

/** Adds a layer on top of a tag's image: new config (diff_ids, history), new manifest, index.json updated. */
/** `uncompressed`: the layer's tar, or the digest of it (its diff_id) for a tar too large to hold. */
async function appendLayer(
  layout: string,
  tag: string,
  blob: Buffer,
  uncompressed: Buffer | string,
  mediaType: string,
): Promise<void> {
  const index = await readJson<OciIndex>(join(layout, "index.json"));
  const entry = index.manifests.find((m) => m.annotations?.["org.opencontainers.image.ref.name"] === tag);
  if (!entry) throw new Error(`no tag ${tag} in ${layout}`);
  const manifest = await readJson<OciManifest>(blobFile(layout, entry.digest));
  const config = await readJson<OciConfig>(blobFile(layout, manifest.config.digest));
  config.rootfs.diff_ids.push(typeof uncompressed === "string" ? uncompressed : `sha256:${hash(uncompressed)}`);
  config.history = [...(config.history ?? []), { created_by: "berth test fixture (hand-made layer)" }];
  const configBytes = Buffer.from(JSON.stringify(config));
  manifest.config = { ...manifest.config, digest: await writeBlob(layout, configBytes), size: configBytes.byteLength };
  manifest.layers.push({ mediaType, digest: await writeBlob(layout, blob), size: blob.byteLength });
  const manifestBytes = Buffer.from(JSON.stringify(manifest));
  entry.digest = await writeBlob(layout, manifestBytes);
  entry.size = manifestBytes.byteLength;
  await writeFile(join(layout, "index.json"), JSON.stringify(index));
}

async function tagDigest(layout: string, tag: string): Promise<string> {
  const index = await readJson<OciIndex>(join(layout, "index.json"));
  const entry = index.manifests.find((m) => m.annotations?.["org.opencontainers.image.ref.name"] === tag);
  if (!entry) throw new Error(`no tag ${tag} in ${layout}`);
  return entry.digest;
}

async function writeBlob(layout: string, bytes: Buffer): Promise<string> {
  const digest = `sha256:${hash(bytes)}`;
  await writeFile(blobFile(layout, digest), bytes);
  return digest;
}

function blobFile(layout: string, digest: string): string {
  return join(layout, "blobs", ...digest.split(":"));
}

async function readJson<T>(path: string): Promise<T> {
  return JSON.parse(await readFile(path, "utf8")) as T;
}

function hash(data: Buffer | string): string {
  return createHash("sha256").update(data).digest("hex");
}
