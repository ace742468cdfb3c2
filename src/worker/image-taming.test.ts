import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { lstat, readdir } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { gzipSync } from "node:zlib";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import { gzipBombLayer, type LayerEntry, MEDIA_TYPES, makeLayer } from "../../test/support/layers.js";
import {
  busyboxImage,
  type ExtraLayer,
  imageWithLayers,
  startRegistry,
  type TestRegistry,
} from "../../test/support/registry.js";
import { Code } from "../status/status.js";

// Images as a hostile publisher makes them, pulled from a real registry by a real farm in both modes: what lands
// on the host must give no local user a way in, and a bomb must stop at the configured cap while it is read.

const MiB = 1024 * 1024;
const CAPS = { maxLayerBytes: 64 * MiB, maxLayerEntries: 10_000, maxImageBytes: 96 * MiB, maxImageEntries: 20_000 };

/** Files and directories whose modes no host should keep, with the modes they ask for. */
const HOSTILE_ENTRIES: LayerEntry[] = [
  { name: "opt/", type: "directory", mode: 0o755 },
  { name: "opt/suid-root", content: "#!/bin/sh\nid\n", mode: 0o4755, uid: 0, gid: 0 },
  { name: "opt/setgid", content: "#!/bin/sh\nid\n", mode: 0o2755, uid: 0, gid: 0 },
  { name: "opt/open/", type: "directory", mode: 0o777 },
  { name: "opt/open/writable", content: "anyone\n", mode: 0o666 },
  { name: "opt/group/", type: "directory", mode: 0o775, gid: 100 },
  { name: "opt/sticky/", type: "directory", mode: 0o1777 },
];

let registry: TestRegistry;
const images: Record<string, string> = {};
/** Digests of the layer blobs each refusal must name. */
const digests: Record<string, string> = {};

async function gzipLayer(entries: LayerEntry[]): Promise<ExtraLayer> {
  const tar = await makeLayer(entries, "none");
  return { blob: gzipSync(tar), diffId: sha256(tar), mediaType: MEDIA_TYPES.gzip };
}

function sha256(data: Buffer): string {
  return `sha256:${createHash("sha256").update(data).digest("hex")}`;
}

before(async () => {
  registry = await startRegistry();
  const base = await busyboxImage("tamed base");
  const hostile = await gzipLayer(HOSTILE_ENTRIES);
  // 1 GiB of zeros in 16 MiB files, about 1 MiB of gzip.
  const bomb = await gzipBombLayer(64, 16 * MiB);
  // 50,000 empty files: no bytes at all, only entries (inodes).
  const many = await gzipLayer(Array.from({ length: 50_000 }, (_, i) => ({ name: `many/${i}`, content: "" })));
  // Two layers of 56 MiB: each under maxLayerBytes, together over maxImageBytes.
  const halves = await Promise.all(["left", "right"].map((dir) => gzipBombLayer(7, 8 * MiB, dir)));
  const layers: Record<string, ExtraLayer[]> = {
    hostile: [hostile],
    bomb: [{ ...bomb, mediaType: MEDIA_TYPES.gzip }],
    many: [many],
    halves: halves.map((half) => ({ ...half, mediaType: MEDIA_TYPES.gzip })),
  };
  for (const [name, extra] of Object.entries(layers)) {
    images[name] = await registry.push(await imageWithLayers(base, `taming-${name}`, extra), `hostile/${name}`, "1");
    digests[name] = sha256((extra.at(-1) as ExtraLayer).blob);
  }
});
after(() => registry?.stop());

/** Where each mode keeps what images bring onto the worker's host. */
const STORES = { mount: ["worker", "images"], expand: ["worker", "expanded"] } as const;

interface Found {
  path: string;
  mode: number;
}

/** Every file and directory below `dir` (not symlinks), with its mode; paths vanishing meanwhile are skipped. */
async function walk(dir: string, out: Found[] = []): Promise<Found[]> {
  const names = await readdir(dir).catch(() => []);
  for (const name of names) {
    const path = join(dir, name);
    const info = await lstat(path).catch(() => undefined);
    if (!info || info.isSymbolicLink()) continue;
    out.push({ path, mode: info.mode });
    if (info.isDirectory()) await walk(path, out);
  }
  return out;
}

/** Bytes allocated below `dir`, as `du` counts them. */
async function diskUsage(dir: string): Promise<number> {
  let total = 0;
  const visit = async (path: string): Promise<void> => {
    const info = await lstat(path).catch(() => undefined);
    if (!info) return;
    total += info.blocks * 512;
    if (info.isDirectory()) {
      for (const name of await readdir(path).catch(() => [])) await visit(join(path, name));
    }
  };
  await visit(dir);
  return total;
}

for (const mode of ["mount", "expand"] as const) {
  describe(`images are tamed on the way in (${mode} mode)`, () => {
    let farm: TestFarm;
    before(async () => {
      farm = await startTestFarm({ images: { mode, ...CAPS } }, undefined, { workers: 1 });
    });
    after(() => farm?.close());

    async function runIn(image: string, script: string) {
      const action = await uploadAction(farm.clients, {
        args: ["sh", "-c", script],
        platform: [{ name: "container-image", value: `docker://${image}` }],
        salt: `${Math.random()}`,
      });
      return (await execute(farm.clients, action)).response;
    }

    test("a setuid-root binary loses its bit everywhere; 0777 directories are 0755 on the host and 0777 only in the action's own layer; the stores are root's only", async () => {
      const paths = ["/opt/suid-root", "/opt/setgid", "/opt/open", "/opt/open/writable", "/opt/group", "/opt/sticky"];
      const response = await runIn(
        images.hostile as string,
        `stat -c '%n %a' ${paths.join(" ")}; id -u; echo planted > /opt/open/planted && echo wrote`,
      );
      assert.equal(response.status?.code ?? 0, Code.OK, response.status?.message);
      const stdout = await readBlob(farm.clients, response.result?.stdoutDigest);
      assert.equal(response.result?.exitCode, 0, stdout);
      const lines = stdout.trim().split("\n");
      assert.equal(lines.pop(), "wrote", "the action writes in the image's 0777 directory (its own upper layer)");
      assert.equal(lines.pop(), "65534", "the action runs as the unprivileged user");
      const seen = new Map(lines.map((line) => line.split(" ") as [string, string]));
      for (const path of ["/opt/suid-root", "/opt/setgid", "/opt/open/writable"]) {
        const bits = Number.parseInt(seen.get(path) ?? "", 8);
        assert.ok(Number.isInteger(bits), `${path}: ${stdout}`);
        assert.equal(bits & 0o6022, 0, `${path} inside the action is ${bits.toString(8)}`);
      }
      // Directories show the image's modes inside (less setuid/setgid), from the action's own upper layer.
      assert.equal(seen.get("/opt/open"), "777");
      assert.equal(seen.get("/opt/group"), "775");
      assert.equal(seen.get("/opt/sticky"), "1777");

      // On the host: nothing the images brought is setuid, setgid, or writable by group or others.
      const store = join(farm.config.dataDir, ...STORES[mode]);
      assert.equal((await lstat(store)).mode & 0o777, 0o700, `${store} is root's only`);
      if (mode === "mount") assert.equal((await lstat(join(store, "store"))).mode & 0o777, 0o700);
      const found = await walk(store);
      const planted = found.filter((f) => f.path.endsWith("/opt/suid-root"));
      assert.ok(planted.length > 0, "the hostile layer is on the host");
      const loose = found
        .filter((f) => (f.mode & 0o6022) !== 0)
        .map((f) => `${f.path} ${(f.mode & 0o7777).toString(8)}`);
      assert.deepEqual(loose, []);
      const open = found.filter((f) => f.path.endsWith("/opt/open")).map((f) => (f.mode & 0o7777).toString(8));
      assert.ok(open.length > 0 && open.every((m) => m === "755"), `/opt/open on the host: ${open}`);
      assert.deepEqual(
        found.filter((f) => f.path.endsWith("/opt/open/planted")),
        [],
        "what the action wrote stayed in its layer",
      );
      const next = await runIn(images.hostile as string, "test ! -e /opt/open/planted && echo clean");
      assert.equal(await readBlob(farm.clients, next.result?.stdoutDigest), "clean\n");
    });

    test("a gzip bomb stops at images.maxLayerBytes while it is read, naming image, layer and key, and leaves nothing", async (t) => {
      const dataDir = farm.config.dataDir;
      const before = await diskUsage(dataDir);
      let peak = before;
      let sampling = true;
      const sampler = (async () => {
        while (sampling) {
          peak = Math.max(peak, await diskUsage(dataDir));
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
      })();
      const response = await runIn(images.bomb as string, "echo never ran").finally(() => {
        sampling = false;
      });
      await sampler;
      assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
      const message = response.status?.message ?? "";
      assert.match(message, /hostile\/bomb/, "names the image");
      assert.ok(message.includes(digests.bomb as string), `names the layer: ${message}`);
      assert.match(message, /more than 67108864 bytes of files \(images\.maxLayerBytes\)/);
      // The layer holds 1 GiB; at most the cap (and one blob of ~1 MiB) was ever on disk.
      const grew = peak - before;
      t.diagnostic(`data directory: ${before} bytes before, ${grew} more at the peak seen`);
      assert.ok(grew <= CAPS.maxLayerBytes + 8 * MiB, `the data directory grew by ${grew} bytes at its peak`);
      const left = (await diskUsage(dataDir)) - before;
      assert.ok(left <= 4 * MiB, `${left} bytes stayed behind`);
      if (mode === "mount") {
        const hex = (digests.bomb as string).slice("sha256:".length);
        const layers: string[] = await readdir(join(dataDir, "worker/images/store/layers/sha256")).catch(() => []);
        assert.ok(!layers.includes(hex), "no half-unpacked layer is kept");
      }
      // Asked again, it is refused again: nothing half-written was kept to be used.
      const again = await runIn(images.bomb as string, "echo never ran");
      assert.equal(again.status?.code, Code.FAILED_PRECONDITION, again.status?.message);
    });

    test("a layer of 50,000 empty files stops at images.maxLayerEntries", async () => {
      const response = await runIn(images.many as string, "echo never ran");
      assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
      const message = response.status?.message ?? "";
      assert.match(message, /hostile\/many/);
      assert.ok(message.includes(digests.many as string), message);
      assert.match(message, /more than 10000 entries \(images\.maxLayerEntries\)/);
      const leftovers = (await walk(farm.config.dataDir)).filter((f) => /\/many\/[0-9]+$/.test(f.path));
      assert.deepEqual(leftovers.length, 0, "the partial layer is gone");
    });

    test("layers each under the layer cap but together over images.maxImageBytes are refused while read", async () => {
      const response = await runIn(images.halves as string, "echo never ran");
      assert.equal(response.status?.code, Code.FAILED_PRECONDITION, response.status?.message);
      assert.match(
        response.status?.message ?? "",
        /hostile\/halves.*its layers hold more than 100663296 bytes of files \(images\.maxImageBytes\)/,
      );
    });
  });
}
