/**
 * Debian roots made by `debootstrap` from the machine's own apt mirror, kept in a cache directory between runs
 * (a fresh machine makes them once), and packed as OCI images by `umoci`. Shared by the benchmarks' Debian image
 * (bench/debian-image.ts) and the tests' image with Docker installed (docker-image.ts).
 */
import { execFile, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { promisify } from "node:util";
import type { BuiltImage } from "./registry.js";

const run = promisify(execFile);

const FALLBACK_MIRROR = "http://deb.debian.org/debian";

/** What `debootstrap` makes, and where the finished root is kept. */
export interface DebootstrapRoot {
  /** The finished root; it is made in `<dir>.partial` and renamed only when complete. */
  readonly dir: string;
  /** `bookworm` */
  readonly suite: string;
  /** `--variant=` (`minbase`: essential packages and apt only). */
  readonly variant: string;
  /** `--include=`: more packages, with their dependencies. */
  readonly include?: readonly string[];
  /** Said in the log line before a debootstrap starts, e.g. "about 35 s". */
  readonly estimate?: string;
  /** Runs on the complete root before it is renamed (to trim or check it); a throw keeps it from being used. */
  readonly finish?: (root: string) => Promise<void>;
}

/**
 * Reuses the cached root, or makes it: `debootstrap` into `<dir>.partial`, then `finish`, then a rename, all
 * while holding `<dir>.lock`, so that a crash never leaves a half root under the final name and two processes
 * never debootstrap into the same folder. Says how the root was obtained (for reports).
 */
export async function ensureDebootstrapRoot(spec: DebootstrapRoot, log: (line: string) => void): Promise<string> {
  if (existsSync(spec.dir)) return `root reused from ${spec.dir}`;
  await mkdir(dirname(spec.dir), { recursive: true });
  return withFileLock(`${spec.dir}.lock`, async () => {
    // Another process may have made it while this one waited for the lock.
    if (existsSync(spec.dir)) return `root reused from ${spec.dir}`;
    const mirror = await aptMirror(spec.suite);
    const partial = `${spec.dir}.partial`;
    await rm(partial, { recursive: true, force: true });
    const include = spec.include?.length ? [`--include=${spec.include.join(",")}`] : [];
    const args = [`--variant=${spec.variant}`, ...include, spec.suite, partial, mirror];
    const estimate = spec.estimate ? `${spec.estimate}, ` : "";
    log(`  debootstrap ${args.join(" ")} (${estimate}once; cached in ${spec.dir})`);
    const start = process.hrtime.bigint();
    try {
      await run("debootstrap", args, { maxBuffer: 64 * 1024 * 1024 });
      await spec.finish?.(partial);
    } catch (err) {
      await rm(partial, { recursive: true, force: true });
      throw missing(err, "debootstrap");
    }
    await rename(partial, spec.dir);
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    return `root debootstrapped in this run (${seconds.toFixed(1)} s) and kept in ${spec.dir}`;
  });
}

/**
 * Runs `fn` while holding an exclusive `flock` on `file` (created if absent). The lock is held by a `flock`
 * child waiting on its stdin, so it is released when `fn` ends and also when this process dies.
 */
export async function withFileLock<T>(file: string, fn: () => Promise<T>): Promise<T> {
  const holder = spawn("flock", ["--exclusive", file, "-c", "echo locked && exec cat >/dev/null"], {
    stdio: ["pipe", "pipe", "pipe"],
  });
  let stderr = "";
  holder.stderr.on("data", (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const exited = new Promise<void>((resolve) => holder.once("close", () => resolve()));
  await new Promise<void>((resolve, reject) => {
    holder.stdout.once("data", () => resolve());
    holder.once("error", (err) => reject(missing(err, "util-linux")));
    holder.once("close", (code) => reject(new Error(`flock ${file} exited (${code}) before locking: ${stderr}`)));
  });
  try {
    return await fn();
  } finally {
    holder.stdin.end();
    await exited;
  }
}

/** An ENOENT from execFile means the program is not installed: say which package brings it. */
export function missing(err: unknown, pkg: string): unknown {
  if ((err as NodeJS.ErrnoException).code === "ENOENT") {
    return new Error(`${pkg} is not installed: apt-get install ${pkg} (bash scripts/install.sh --test)`);
  }
  return err;
}

/** The first apt source for the suite, from /etc/apt/sources.list and /etc/apt/sources.list.d/. */
export async function aptMirror(suite: string): Promise<string> {
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
        if (field("Types")?.includes("deb") && field("Suites")?.includes(suite) && uri) return uri;
      }
    } else {
      for (const line of text.split("\n")) {
        const words = line
          .replace(/#.*/, "")
          .replace(/\[[^\]]*\]/, "")
          .trim()
          .split(/\s+/);
        if (words[0] === "deb" && words[2] === suite && words[1]) return words[1];
      }
    }
  }
  return FALLBACK_MIRROR;
}

/** A root packed by `packRoot`: the image, and its layers' compressed sizes and digests, bottom first. */
export interface PackedRoot {
  image: BuiltImage;
  layerSizes: number[];
  layerDigests: string[];
}

/**
 * A new OCI layout holding `root` as an image of two gzip layers made by umoci: the root, then a one-file layer
 * with `marker.content` at `marker.path` (each an `umoci repack` of a bundle; `umoci insert` 0.4.7 writes layers
 * without the last file's padding and the end-of-archive blocks, which GNU tar and Berth refuse); the
 * configuration as Docker's Debian images have it (PATH, /bin/bash).
 */
export async function packRoot(
  root: string,
  layout: string,
  tag: string,
  marker: { path: string; content: string },
): Promise<PackedRoot> {
  const image = `${layout}:${tag}`;
  const bundle = `${layout}-bundle`;
  await rm(bundle, { recursive: true, force: true });
  await run("umoci", ["init", "--layout", layout]);
  await run("umoci", ["new", "--image", image]);
  await run("umoci", ["unpack", "--image", image, bundle]);
  const rootfs = join(bundle, "rootfs");
  await run("cp", ["-a", `${root}/.`, `${rootfs}/`]);
  // --refresh-bundle: the next repack diffs against this layer, not the empty image.
  await run("umoci", ["repack", "--refresh-bundle", "--image", image, bundle]);
  await mkdir(join(rootfs, dirname(marker.path)), { recursive: true });
  await writeFile(join(rootfs, marker.path), `${marker.content}\n`);
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
  const entry = index.manifests.find((m) => m.annotations?.["org.opencontainers.image.ref.name"] === tag);
  if (!entry) throw new Error(`no tag ${tag} in ${layout}`);
  const manifest = JSON.parse(await readFile(join(layout, "blobs", ...entry.digest.split(":")), "utf8")) as {
    layers: { size: number; digest: string }[];
  };
  return {
    image: { layout, tag, digest: entry.digest, multiArch: false, marker: marker.content },
    layerSizes: manifest.layers.map((l) => l.size),
    layerDigests: manifest.layers.map((l) => l.digest),
  };
}
