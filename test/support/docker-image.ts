/**
 * A test image with Docker installed (Debian's docker.io: dockerd, docker, containerd, runc), for actions that
 * start a Docker daemon. Its root is debootstrapped once per machine and its OCI layout packed once per root;
 * both are kept in /var/cache/berth-test between runs, so a warm call only reads a stamp.
 *
 *   const registry = await startRegistry();
 *   const ref = await registry.push(await dockerImage(), "tools/docker", "v1");
 */
import { createHash } from "node:crypto";
import { access, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { ensureDebootstrapRoot, packRoot, withFileLock } from "./debootstrap.js";
import { type BuiltImage, MARKER_PATH } from "./registry.js";

const CACHE_DIR = "/var/cache/berth-test";
/** The debootstrapped root (≈440 MB, ≈45 s to make from the mirror). */
export const DOCKER_ROOT = join(CACHE_DIR, "debootstrap-bookworm-docker");
/** The packed OCI layout (tag `DOCKER_IMAGE_TAG`), rebuilt when the root's stamp changes. */
export const DOCKER_LAYOUT = join(CACHE_DIR, "docker-image-layout");
export const DOCKER_IMAGE_TAG = "docker";
/** The content of `/etc/berth-image-marker` in the image. */
export const DOCKER_IMAGE_MARKER = "berth docker image";
/** The programs the image is for, as paths inside it; a root without one of them is refused. */
export const DOCKER_PROGRAMS = ["usr/sbin/dockerd", "usr/bin/docker", "usr/bin/containerd", "usr/sbin/runc"] as const;

const SUITE = "bookworm";
const INCLUDE = ["docker.io", "iptables", "ca-certificates"] as const;
/** Bump when packRoot's layers or configuration change, so cached layouts are rebuilt. */
const RECIPE = "1";
/** Kept inside the layout (skopeo and umoci read only oci-layout, index.json and blobs/). */
const STAMP_FILE = "berth-stamp";

let root: Promise<string> | undefined;
let image: Promise<BuiltImage> | undefined;

/** The root with Docker installed: cached, or debootstrapped now (once per machine). Resolves to its path. */
export function dockerRoot(log: (line: string) => void = () => {}): Promise<string> {
  root ??= (async () => {
    await ensureDebootstrapRoot(
      { dir: DOCKER_ROOT, suite: SUITE, variant: "minbase", include: INCLUDE, estimate: "about 45 s", finish: trim },
      log,
    );
    await checkPrograms(DOCKER_ROOT);
    return DOCKER_ROOT;
  })();
  return root;
}

/**
 * The image with Docker installed as an OCI layout: the cached one when it was packed from the current root,
 * or packed now (about 40 s) and cached. Once per process.
 */
export function dockerImage(log: (line: string) => void = () => {}): Promise<BuiltImage> {
  image ??= (async () => {
    const rootDir = await dockerRoot(log);
    const stamp = await rootStamp(rootDir);
    const cached = await cachedImage(stamp);
    if (cached) return cached;
    return withFileLock(`${DOCKER_LAYOUT}.lock`, async () => {
      // Another process may have packed it while this one waited for the lock.
      const packedMeanwhile = await cachedImage(stamp);
      if (packedMeanwhile) return packedMeanwhile;
      const partial = `${DOCKER_LAYOUT}.partial`;
      await rm(partial, { recursive: true, force: true });
      log(`  umoci: packing ${rootDir} into ${DOCKER_LAYOUT} (about 40 s, once per root)`);
      const packed = await packRoot(rootDir, partial, DOCKER_IMAGE_TAG, {
        path: MARKER_PATH,
        content: DOCKER_IMAGE_MARKER,
      });
      await writeFile(join(partial, STAMP_FILE), stamp);
      await rm(DOCKER_LAYOUT, { recursive: true, force: true });
      await rename(partial, DOCKER_LAYOUT);
      return { ...packed.image, layout: DOCKER_LAYOUT };
    });
  })();
  return image;
}

/** The cached layout, if it was packed from a root with this stamp. */
async function cachedImage(stamp: string): Promise<BuiltImage | undefined> {
  const saved = await readFile(join(DOCKER_LAYOUT, STAMP_FILE), "utf8").catch(() => undefined);
  if (saved !== stamp) return undefined;
  const index = JSON.parse(await readFile(join(DOCKER_LAYOUT, "index.json"), "utf8")) as {
    manifests: { digest: string; annotations?: Record<string, string> }[];
  };
  const entry = index.manifests.find((m) => m.annotations?.["org.opencontainers.image.ref.name"] === DOCKER_IMAGE_TAG);
  if (!entry) return undefined;
  return {
    layout: DOCKER_LAYOUT,
    tag: DOCKER_IMAGE_TAG,
    digest: entry.digest,
    multiArch: false,
    marker: DOCKER_IMAGE_MARKER,
  };
}

/**
 * What the root is, for the layout cache: the recipe and the installed packages with their versions (dpkg's
 * status file), so a root remade with other packages gets a new layout.
 */
async function rootStamp(rootDir: string): Promise<string> {
  const status = await readFile(join(rootDir, "var/lib/dpkg/status"));
  const recipe = JSON.stringify({ RECIPE, SUITE, INCLUDE, DOCKER_IMAGE_MARKER });
  return createHash("sha256").update(recipe).update(status).digest("hex");
}

/** Drops the downloaded .deb files debootstrap leaves behind (≈100 MB the image does not need), then checks. */
async function trim(partial: string): Promise<void> {
  const archives = join(partial, "var/cache/apt/archives");
  for (const name of await readdir(archives)) {
    if (name.endsWith(".deb")) await rm(join(archives, name));
  }
  await checkPrograms(partial);
}

async function checkPrograms(rootDir: string): Promise<void> {
  for (const program of [...DOCKER_PROGRAMS, "bin/bash"]) {
    await access(join(rootDir, program)).catch(() => {
      throw new Error(`${rootDir} has no /${program}: was docker.io installed by debootstrap --include?`);
    });
  }
}
