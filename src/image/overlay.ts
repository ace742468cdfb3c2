import { execFile } from "node:child_process";
import { mkdir, rm, symlink } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";

const run = promisify(execFile);

/** mount(2) takes one page of option data, NUL included. */
const MAX_MOUNT_DATA = 4095;
/** overlayfs stacks at most this many lower layers (OVL_MAX_STACK). */
export const MAX_LOWER_LAYERS = 500;

/** How to mount an image's layers with a per-action upper layer. */
export interface OverlayMountArgs {
  /** `mount -t overlay overlay -o options TARGET`, run with this as its working directory. */
  options: string;
  cwd: string;
  /** Symlinks to make before mounting (`writeLayerLinks`); empty when the options name every layer in full. */
  links: { path: string; target: string }[];
}

/**
 * The overlayfs options for `layerDirs` (bottom to top, as the manifest
 * lists them) under `upper` and `work`. overlayfs wants lowerdir top first.
 * A layer listed twice is kept at its topmost place only: overlayfs refuses
 * a lower directory twice, and the lower copy could show nothing the upper
 * one does not. When absolute paths do not fit in a page (some 35 layers
 * of a store in a deep data directory), the layers are named by short
 * symlinks in `linkDir` ("0", "1"…) and mount must run there: overlayfs
 * resolves lowerdir paths, symlinks included, from the mounting process's
 * working directory. Docker's overlay2 driver does the same.
 */
export function overlayMountArgs(
  layerDirs: readonly string[],
  upper: string | undefined,
  work: string | undefined,
  linkDir: string,
): OverlayMountArgs {
  const lowers = [...new Set([...layerDirs].reverse())];
  if (lowers.length === 0) throw new Error("an overlay needs at least one lower layer");
  if (lowers.length > MAX_LOWER_LAYERS) {
    throw new Error(`an image of ${lowers.length} distinct layers is past overlayfs's limit of ${MAX_LOWER_LAYERS}`);
  }
  for (const path of [...lowers, upper ?? "/", work ?? "/", linkDir]) checkPath(path);
  // volatile: the upper layer is thrown away with the action, so unmounting need not sync the disk it is on
  // (without it, every action's end waits for whatever any process left dirty there). No upper: read-only.
  const tail = upper === undefined || work === undefined ? "" : `,upperdir=${upper},workdir=${work},volatile`;
  const full = `lowerdir=${lowers.join(":")}${tail}`;
  if (Buffer.byteLength(full) <= MAX_MOUNT_DATA) return { options: full, cwd: "/", links: [] };
  const links = lowers.map((target, i) => ({ path: join(linkDir, String(i)), target }));
  const options = `lowerdir=${lowers.map((_, i) => String(i)).join(":")}${tail}`;
  if (Buffer.byteLength(options) > MAX_MOUNT_DATA)
    throw new Error("the overlay's upper and work paths are too long to mount");
  return { options, cwd: linkDir, links };
}

/** Creates the short symlinks `args` names, replacing any left in its directory. */
export async function writeLayerLinks(args: OverlayMountArgs): Promise<void> {
  if (args.links.length === 0) return;
  await rm(args.cwd, { recursive: true, force: true });
  await mkdir(args.cwd, { recursive: true });
  await Promise.all(args.links.map((link) => symlink(link.target, link.path)));
}

/**
 * Runs `command` with the overlay mounted on `merged` in a private mount
 * namespace (needs root): the mount vanishes with the command, and nothing
 * propagates to the host. The options and target are passed as arguments,
 * never spliced into the shell script.
 */
export async function runInOverlay(
  args: OverlayMountArgs,
  merged: string,
  command: readonly string[],
): Promise<{ stdout: string; stderr: string }> {
  await writeLayerLinks(args);
  const script = 'mount -t overlay overlay -o "$1" "$2" && shift 2 && exec "$@"';
  return await run(
    "unshare",
    ["--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", args.options, merged, ...command],
    { cwd: args.cwd, maxBuffer: 64 * 1024 * 1024 },
  );
}

/** overlayfs reads `,` `:` and `\` as separators or escapes; Berth's own paths never need them. */
function checkPath(path: string): void {
  if (!path.startsWith("/") || /[,:\\\n]/.test(path)) {
    throw new Error(`cannot use ${JSON.stringify(path)} in overlay options: it must be absolute, without , : or \\`);
  }
}
