/**
 * The Debian image of the image benchmarks: a debootstrap root (made once, kept in /var/cache/berth-bench),
 * packed as an OCI image by umoci and pushed to a loopback registry; and the reference pull of the same image
 * with skopeo and umoci.
 */
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { promisify } from "node:util";
import { type BuiltImage, startRegistry, type TestRegistry } from "../test/support/registry.js";
import type { BenchContext } from "./context.js";
import { elapsedMs, fmt, MB } from "./stats.js";

const run = promisify(execFile);

/** The debootstrapped root is kept here between runs (33 s to make, 206 MB). */
const CACHE_DIR = "/var/cache/berth-bench";
export const SUITE = "bookworm";
export const ROOTFS = join(CACHE_DIR, `debootstrap-${SUITE}`);
const FALLBACK_MIRROR = "http://deb.debian.org/debian";
const REPOSITORY = "debian";
const TAG = "bench";
/** A file only the benchmark's image has, which the action checks to prove it ran there. */
export const MARKER = "etc/berth-bench-image";

export interface DebianImage {
  registry: TestRegistry;
  /** `127.0.0.1:PORT/debian:bench` */
  reference: string;
  /** Compressed layer sizes, bytes, bottom first. */
  layerSizes: number[];
  /** The layers' digests, bottom first (their blobs are in the registry's storage: registry.blobPath). */
  layerDigests: string[];
  rootfsBytes: number;
  rootfsInodes: number;
  /** How the root was made: reused from the cache, or debootstrapped in this run (and how long that took). */
  origin: string;
  /** umoci building the layout, ms. */
  buildMs: number;
}

let debian: Promise<DebianImage> | undefined;

/** The Debian image in a loopback registry, made once per run and shared by both benchmarks. */
export function debianImage(ctx: BenchContext): Promise<DebianImage> {
  debian ??= makeDebianImage(ctx);
  return debian;
}

async function makeDebianImage(ctx: BenchContext): Promise<DebianImage> {
  const origin = await ensureRootfs(ctx);
  const layout = join(ctx.scratchDir, "images", "debian-layout");
  await mkdir(dirname(layout), { recursive: true });
  const start = process.hrtime.bigint();
  const built = await buildLayout(layout);
  const buildMs = elapsedMs(start);
  const registry = await startRegistry();
  ctx.defer(() => registry.stop());
  const reference = await registry.push(built.image, REPOSITORY, TAG);
  const [du, inodes] = await Promise.all([run("du", ["-sb", ROOTFS]), run("du", ["-s", "--inodes", ROOTFS])]);
  const image: DebianImage = {
    registry,
    reference,
    layerSizes: built.layerSizes,
    layerDigests: built.layerDigests,
    rootfsBytes: Number(du.stdout.split(/\s/)[0]),
    rootfsInodes: Number(inodes.stdout.split(/\s/)[0]),
    origin,
    buildMs,
  };
  ctx.log(
    `  image ${reference}: ${origin}; layers ${image.layerSizes.map((s) => (s >= MB ? `${fmt(s / MB)} MB` : `${s} bytes`)).join(" + ")} ` +
      `(gzip), root ${fmt(image.rootfsBytes / MB)} MB in ${image.rootfsInodes.toLocaleString("en-US")} inodes`,
  );
  return image;
}

/** Reuses the cached debootstrapped root, or makes it (into a temporary name, renamed when complete). */
export async function ensureRootfs(ctx: BenchContext): Promise<string> {
  if (existsSync(ROOTFS)) return `root reused from ${ROOTFS}`;
  const mirror = await aptMirror();
  const partial = `${ROOTFS}.partial`;
  await mkdir(CACHE_DIR, { recursive: true });
  await rm(partial, { recursive: true, force: true });
  ctx.log(`  debootstrap --variant=minbase ${SUITE} ${partial} ${mirror} (about 35 s, once; cached in ${ROOTFS})`);
  const start = process.hrtime.bigint();
  try {
    await run("debootstrap", ["--variant=minbase", SUITE, partial, mirror], { maxBuffer: 64 * 1024 * 1024 });
  } catch (err) {
    await rm(partial, { recursive: true, force: true });
    throw missing(err, "debootstrap");
  }
  await rename(partial, ROOTFS);
  return `root debootstrapped in this run (${fmt(elapsedMs(start) / 1000)} s) and kept in ${ROOTFS}`;
}

/** An ENOENT from execFile means the program is not installed: say which package brings it. */
export function missing(err: unknown, pkg: string): unknown {
  if ((err as NodeJS.ErrnoException).code === "ENOENT") {
    return new Error(`${pkg} is not installed: apt-get install ${pkg} (bash scripts/install.sh --test)`);
  }
  return err;
}

/** The first apt source for the suite, from /etc/apt/sources.list and /etc/apt/sources.list.d/. */
async function aptMirror(): Promise<string> {
  const files = ["/etc/apt/sources.list"];
  const listDir = "/etc/apt/sources.list.d";
  for (const name of (await readdir(listDir).catch(() => [])).sort()) {
    if (name.endsWith(".list") || name.endsWith(".sources")) files.push(join(listDir, name));
  }
  for (const file of files) {
    const text = await readFile(file, "utf8").catch(() => "");
    if (file.endsWith(".sources")) {
      // deb822: stanzas separated by blank lines.
      for (const stanza of text.split(/\n\s*\n/)) {
        const field = (name: string) => new RegExp(`^${name}:\\s*(.+)$`, "mi").exec(stanza)?.[1]?.trim().split(/\s+/);
        const uri = field("URIs")?.[0];
        if (field("Types")?.includes("deb") && field("Suites")?.includes(SUITE) && uri) return uri;
      }
    } else {
      for (const line of text.split("\n")) {
        const words = line
          .replace(/#.*/, "")
          .replace(/\[[^\]]*\]/, "")
          .trim()
          .split(/\s+/);
        if (words[0] === "deb" && words[2] === SUITE && words[1]) return words[1];
      }
    }
  }
  return FALLBACK_MIRROR;
}

/**
 * Two gzip layers made by umoci: the debootstrapped root, then a one-file layer (each an `umoci repack` of a
 * bundle; `umoci insert` 0.4.7 writes layers without the last file's padding and the end-of-archive blocks,
 * which GNU tar and Berth refuse); the configuration as Docker's Debian images have it (PATH, /bin/bash).
 */
async function buildLayout(
  layout: string,
): Promise<{ image: BuiltImage; layerSizes: number[]; layerDigests: string[] }> {
  const image = `${layout}:${TAG}`;
  const bundle = `${layout}-bundle`;
  await run("umoci", ["init", "--layout", layout]);
  await run("umoci", ["new", "--image", image]);
  await run("umoci", ["unpack", "--image", image, bundle]);
  const rootfs = join(bundle, "rootfs");
  await run("cp", ["-a", `${ROOTFS}/.`, `${rootfs}/`]);
  // --refresh-bundle: the next repack diffs against this layer, not the empty image.
  await run("umoci", ["repack", "--refresh-bundle", "--image", image, bundle]);
  await writeFile(join(rootfs, MARKER), "berth benchmark image\n");
  await run("umoci", ["repack", "--refresh-bundle", "--image", image, bundle]);
  await rm(bundle, { recursive: true, force: true });
  await run("umoci", [
    "config",
    "--image",
    image,
    "--os",
    "linux",
    "--architecture",
    "amd64",
    "--config.env",
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "--config.cmd",
    "/bin/bash",
    "--config.workingdir",
    "/",
  ]);
  const index = JSON.parse(await readFile(join(layout, "index.json"), "utf8")) as {
    manifests: { digest: string; annotations?: Record<string, string> }[];
  };
  const entry = index.manifests.find((m) => m.annotations?.["org.opencontainers.image.ref.name"] === TAG);
  if (!entry) throw new Error(`no tag ${TAG} in ${layout}`);
  const manifest = JSON.parse(await readFile(join(layout, "blobs", ...entry.digest.split(":")), "utf8")) as {
    layers: { size: number; digest: string }[];
  };
  return {
    image: { layout, tag: TAG, digest: entry.digest, multiArch: false, marker: "berth benchmark image" },
    layerSizes: manifest.layers.map((l) => l.size),
    layerDigests: manifest.layers.map((l) => l.digest),
  };
}

/** `skopeo copy` of the image from the registry into an OCI layout, then `umoci unpack` of it; each timed. */
export async function skopeoUmoci(
  reference: string,
  dir: string,
): Promise<{ copy: number; unpack: number; root: string }> {
  await mkdir(dir, { recursive: true });
  const layout = join(dir, "oci");
  const bundle = join(dir, "bundle");
  const start = process.hrtime.bigint();
  await run("skopeo", ["copy", "--quiet", "--src-tls-verify=false", `docker://${reference}`, `oci:${layout}:t`]);
  const copy = elapsedMs(start);
  const between = process.hrtime.bigint();
  await run("umoci", ["unpack", "--image", `${layout}:t`, bundle]);
  return { copy, unpack: elapsedMs(between), root: join(bundle, "rootfs") };
}
