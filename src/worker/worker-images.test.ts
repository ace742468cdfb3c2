import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import {
  busyboxImage,
  layeredImage,
  MARKER_PATH,
  startRegistry,
  type TestRegistry,
} from "../../test/support/registry.js";
import { createRegistryClient } from "../registry/client.js";
import { Code, StatusError } from "../status/status.js";
import { type PullProgress, WorkerImages } from "./worker-images.js";

let dir: string;
let registry: TestRegistry;
let registryStopped = false;
let image: string;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "berth-pull-progress-"));
  registry = await startRegistry();
  image = await registry.push(await layeredImage(), "team/layered", "1");
});
after(async () => {
  if (!registryStopped) await registry?.stop();
  await rm(dir, { recursive: true, force: true });
});

test("progress counts layer bytes against the manifest's sizes; layers in the store count at once; the resolution is kept", async () => {
  const images = await WorkerImages.open({
    dir: join(dir, "images"),
    maxBytes: 1024 * 1024 * 1024,
    registry: createRegistryClient(),
    tagRefreshMs: 60_000,
  });
  // Two pulls at once share the resolution and every layer's download; both hear of it.
  const [first, second]: PullProgress[][] = [[], []];
  const prepared = await Promise.all([
    images.prepare(image, undefined, (p) => first.push(p)),
    images.prepare(image, undefined, (p) => second.push(p)),
  ]);
  await Promise.all(prepared.map((p) => p.release()));
  for (const reports of [first, second]) {
    const total = reports[0]?.bytesTotal ?? 0;
    assert.ok(total > 0);
    assert.deepEqual(reports.at(-1), { bytesDone: total, bytesTotal: total, layersDone: 4, layersTotal: 4 });
    assert.deepEqual(reports[0], { bytesDone: 0, bytesTotal: total, layersDone: 0, layersTotal: 4 });
    for (const [i, report] of reports.entries()) {
      assert.ok(report.bytesDone >= (reports[i - 1]?.bytesDone ?? 0), "bytes never go back without a retry");
    }
  }
  assert.ok(
    first.some((p) => p.bytesDone > 0 && p.layersDone === 0),
    "bytes are reported while layers download, before they are unpacked",
  );

  await registry.stop();
  registryStopped = true;
  const again: PullProgress[] = [];
  const cached = await images.prepare(image, undefined, (p) => again.push(p));
  await cached.release();
  assert.equal(cached.manifestDigest, prepared[0]?.manifestDigest);
  assert.deepEqual(again[0], { ...again[0], bytesDone: again[0]?.bytesTotal, layersDone: 4, layersTotal: 4 });

  const other = await images.prepare(`${registry.host}/team/layered:2`, undefined).catch((err: unknown) => err);
  assert.ok(other instanceof StatusError);
  assert.equal(other.code, Code.UNAVAILABLE, "a tag never resolved needs the registry");
});

test("a tag is asked again only once tagRefreshMs has passed, and then runs what it names now", async () => {
  const tags = await startRegistry();
  try {
    const images = await WorkerImages.open({
      dir: join(dir, "refresh"),
      maxBytes: 1024 * 1024 * 1024,
      registry: createRegistryClient(),
      // Long enough for the first pull and a push on a loaded machine (1.5 s was not, in CI).
      tagRefreshMs: 6000,
    });
    const reference = await tags.push(await busyboxImage("before"), "team/moving", "stable");
    const marker = async () => {
      const prepared = await images.prepare(reference, undefined);
      try {
        return (await readFile(join(prepared.layerDirs.at(-1) as string, MARKER_PATH), "utf8")).trim();
      } finally {
        await prepared.release();
      }
    };
    assert.equal(await marker(), "before");
    await tags.push(await busyboxImage("after"), "team/moving", "stable");
    assert.equal(await marker(), "before", "within tagRefreshMs the tag's earlier resolution is trusted");
    await new Promise((resolve) => setTimeout(resolve, 6100));
    assert.equal(await marker(), "after", "past tagRefreshMs the tag is resolved again");
  } finally {
    await tags.stop();
  }
});
