import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { copyFile, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";
import { unpackLayer } from "./layer-unpack.js";
import { overlayMountArgs, runInOverlay } from "./overlay.js";
import { WhiteoutMaker } from "./whiteout.js";

const run = promisify(execFile);
let root: string;

before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-umoci-"));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
}

/** Layers of image `O:t` in the OCI layout `O`, bottom to top. */
async function manifestLayers(layout: string): Promise<Descriptor[]> {
  const blob = (d: Descriptor) => join(layout, "blobs", ...d.digest.split(":"));
  const index = JSON.parse(await readFile(join(layout, "index.json"), "utf8")) as { manifests: Descriptor[] };
  const manifest = index.manifests[0] ?? assert.fail("no manifest");
  return (JSON.parse(await readFile(blob(manifest), "utf8")) as { layers: Descriptor[] }).layers;
}

test("unpacks and runs an image umoci built from busybox, deletions included", async (t) => {
  const layout = join(root, "O");
  const bundle = join(root, "B");
  const rootfs = join(bundle, "rootfs");
  await run("umoci", ["init", "--layout", layout]);
  await run("umoci", ["new", "--image", `${layout}:t`]);
  await run("umoci", ["unpack", "--image", `${layout}:t`, bundle]);
  await mkdir(join(rootfs, "bin"));
  await copyFile("/bin/busybox", join(rootfs, "bin/busybox"));
  for (const applet of ["sh", "ls", "cat"]) await symlink("busybox", join(rootfs, "bin", applet));
  await mkdir(join(rootfs, "etc/old"), { recursive: true });
  await writeFile(join(rootfs, "etc/motd"), "bottom\n");
  await writeFile(join(rootfs, "etc/old/file"), "bottom\n");
  await run("umoci", ["repack", "--refresh-bundle", "--image", `${layout}:t`, bundle]);
  // A second layer that deletes: umoci writes whiteouts for what went away.
  await rm(join(rootfs, "etc/motd"));
  await rm(join(rootfs, "etc/old"), { recursive: true });
  await writeFile(join(rootfs, "etc/new"), "top\n");
  await run("umoci", ["repack", "--image", `${layout}:t`, bundle]);

  const layers = await manifestLayers(layout);
  assert.equal(layers.length, 2);
  const whiteouts = new WhiteoutMaker(join(root, "whiteout"));
  const dirs: string[] = [];
  for (const [i, layer] of layers.entries()) {
    const dest = join(root, "layers", String(i));
    await mkdir(join(root, "layers"), { recursive: true });
    const blob = join(layout, "blobs", ...layer.digest.split(":"));
    const started = performance.now();
    const stats = await unpackLayer(blob, layer.mediaType, dest, { whiteouts });
    const millis = performance.now() - started;
    t.diagnostic(
      `layer ${i}: ${layer.size} bytes ${layer.mediaType}, ${JSON.stringify(stats)}, ${millis.toFixed(1)} ms`,
    );
    dirs.push(dest);
  }
  const busybox = await readFile(join(dirs[0] ?? "", "bin/busybox"));
  assert.ok(busybox.equals(await readFile("/bin/busybox")));

  const action = join(root, "action");
  for (const dir of ["upper", "work", "merged"]) await mkdir(join(action, dir), { recursive: true });
  const args = overlayMountArgs(dirs, join(action, "upper"), join(action, "work"), join(action, "links"));
  const merged = join(action, "merged");
  const { stdout } = await runInOverlay(args, merged, [
    "chroot",
    merged,
    "/bin/sh",
    "-c",
    "ls /etc && cat /etc/new && echo done > /etc/written",
  ]);
  assert.equal(stdout, "new\ntop\n");
  assert.equal(await readFile(join(action, "upper/etc/written"), "utf8"), "done\n");
});
