import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { type LayerEntry, MEDIA_TYPES, makeLayer } from "../../test/support/layers.js";
import { type LayerLayout, unpackLayer } from "./layer-unpack.js";
import { type LowerView, makeUpperDirectories, upperDirectories } from "./open-directories.js";
import { overlayMountArgs, runInOverlay } from "./overlay.js";
import { WhiteoutMaker } from "./whiteout.js";

const skip = process.getuid?.() === 0 ? false : "whiteouts and overlay mounts need root";
let root: string;
let whiteouts: WhiteoutMaker;

before(async () => {
  root = await mkdtemp(join(tmpdir(), "berth-open-dirs-"));
  whiteouts = new WhiteoutMaker(join(root, "whiteout"));
});
after(() => rm(root, { recursive: true, force: true }));

async function unpacked(name: string, entries: LayerEntry[]): Promise<LowerView> {
  const blob = join(root, `${name}.tar`);
  await writeFile(blob, await makeLayer(entries));
  const layout: LayerLayout = { opened: new Map(), opaque: new Set() };
  const dir = join(root, "layers", name);
  await mkdir(join(root, "layers"), { recursive: true });
  await unpackLayer(blob, MEDIA_TYPES.none, dir, { whiteouts, layout });
  return { dir, ...layout };
}

test("the image's modes show through the overlay where the top layer holding a directory opened it, and nowhere else", {
  skip,
}, async () => {
  const bottom = await unpacked("bottom", [
    { name: "srv/", type: "directory", mode: 0o750, uid: 7, gid: 8 },
    { name: "srv/open/", type: "directory", mode: 0o777 },
    { name: "srv/redeclared/", type: "directory", mode: 0o777 },
    { name: "srv/deleted/", type: "directory", mode: 0o777 },
    { name: "hidden/", type: "directory", mode: 0o755 },
    { name: "hidden/open/", type: "directory", mode: 0o777 },
    { name: "suid/", type: "directory", mode: 0o6777 },
  ]);
  const top = await unpacked("top", [
    { name: "srv/", type: "directory", mode: 0o750, uid: 7, gid: 8 },
    { name: "srv/redeclared/", type: "directory", mode: 0o755 },
    { name: "srv/.wh.deleted", content: "" },
    { name: "hidden/", type: "directory", mode: 0o755 },
    { name: "hidden/.wh..wh..opq", content: "" },
    { name: "late/", type: "directory", mode: 0o1777 },
  ]);
  for (const lower of [bottom, top]) {
    const info = await stat(join(lower.dir, lower === bottom ? "srv/open" : "late"));
    assert.equal(info.mode & 0o7777, lower === bottom ? 0o755 : 0o1755, "tamed on disk");
  }
  const dirs = await upperDirectories([bottom, top]);
  assert.deepEqual(
    dirs.map((d) => [d.path, d.mode.toString(8), d.uid, d.gid]),
    [
      ["srv", "750", 7, 8], // an ancestor: as the merged view has it anyway
      ["suid", "777"], // the image's 6777 less set-user-ID and set-group-ID
      ["late", "1777"],
      ["srv/open", "777"],
    ].map(([path, mode, uid = 0, gid = 0]) => [path, mode, uid, gid]),
  );

  const action = join(root, "action");
  for (const dir of ["upper", "work", "merged"]) await mkdir(join(action, dir), { recursive: true });
  await makeUpperDirectories(join(action, "upper"), dirs);
  const args = overlayMountArgs([bottom.dir, top.dir], join(action, "upper"), join(action, "work"), join(action, "l"));
  const merged = join(action, "merged");
  const { stdout } = await runInOverlay(args, merged, [
    "sh",
    "-c",
    'cd "$0" && stat -c "%n %a %u" srv srv/open srv/redeclared late suid hidden; ls hidden; echo ---; ls srv',
    merged,
  ]);
  assert.equal(
    stdout,
    [
      "srv 750 7",
      "srv/open 777 0",
      "srv/redeclared 755 0",
      "late 1777 0",
      "suid 777 0",
      "hidden 755 0",
      "---", // the opaque directory hides the bottom layer's hidden/open
      "open", // srv/deleted is whited out
      "redeclared",
      "",
    ].join("\n"),
  );
});
