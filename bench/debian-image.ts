/**
 * The Debian image of the image benchmarks: a debootstrap root (made once, kept in /var/cache/berth-bench),
 * packed as an OCI image by umoci and pushed to a loopback registry; and the reference pull of the same image
 * with skopeo and umoci.
 */
import { execFile } from "node:child_process";
import { mkdir } from "node:fs/promises";
import { dirname, join } from "node:path";
import { promisify } from "node:util";
import { ensureDebootstrapRoot, packRoot } from "../test/support/debootstrap.js";
import { startRegistry, type TestRegistry } from "../test/support/registry.js";
import type { BenchContext } from "./context.js";
import { elapsedMs, fmt, MB } from "./stats.js";

const run = promisify(execFile);

export { missing } from "../test/support/debootstrap.js";

/** The debootstrapped root is kept here between runs (33 s to make, 206 MB). */
const CACHE_DIR = "/var/cache/berth-bench";
export const SUITE = "bookworm";
export const ROOTFS = join(CACHE_DIR, `debootstrap-${SUITE}`);
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
  const built = await packRoot(ROOTFS, layout, TAG, { path: MARKER, content: "berth benchmark image" });
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
export function ensureRootfs(ctx: BenchContext): Promise<string> {
  return ensureDebootstrapRoot({ dir: ROOTFS, suite: SUITE, variant: "minbase", estimate: "about 35 s" }, ctx.log);
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
