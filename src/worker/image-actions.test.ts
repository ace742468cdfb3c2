import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { startTestFarm, type TestFarm } from "../../test/support/farm.js";
import {
  busyboxImage,
  LAYERED_IMAGE,
  layeredImage,
  MARKER_PATH,
  startRegistry,
  type TestRegistry,
} from "../../test/support/registry.js";
import { ImageUsed } from "../gen/berth/image/v1/image.js";
import { Code } from "../status/status.js";

let open: TestRegistry;
let locked: TestRegistry;
let busybox: string;
let other: string;
let layered: string;

before(async () => {
  [open, locked] = await Promise.all([startRegistry(), startRegistry({ auth: "basic" })]);
  busybox = await open.push(await busyboxImage("first image"), "team/busybox", "1");
  other = await open.push(await busyboxImage("second image"), "team/other", "1");
  layered = await open.push(await layeredImage(), "team/layered", "1");
  await locked.push(await busyboxImage("locked image"), "private/busybox", "1");
});
after(async () => {
  await Promise.all([open?.stop(), locked?.stop()]);
});

/** Where each mode keeps what actions must never change: unpacked layers, or materialized image trees. */
const IMAGE_DIRS = { mount: join("worker", "images"), expand: join("worker", "expanded") } as const;

// The same actions and assertions in both modes: the client cannot tell them apart.
for (const mode of ["mount", "expand"] as const) {
  describe(`actions in container images (${mode} mode)`, () => {
    let farm: TestFarm;
    before(async () => {
      farm = await startTestFarm({ images: { mode } }, undefined, { workers: 2 });
    });
    after(() => farm?.close());

    async function runIn(
      image: string,
      script: string,
      extra: { name: string; value: string }[] = [],
      spec: { outputFiles?: string[]; workingDirectory?: string; env?: Record<string, string> } = {},
    ) {
      const action = await uploadAction(farm.clients, {
        args: ["sh", "-c", script],
        platform: [{ name: "container-image", value: `docker://${image}` }, ...extra],
        files: { "sub/input.txt": "from the input root\n" },
        salt: `${Math.random()}`,
        ...spec,
      });
      const { response } = await execute(farm.clients, action);
      return response;
    }

    test("the action's root is the image: it reads a file only that image has, and another image gives another output", async () => {
      const first = await runIn(busybox, `cat /${MARKER_PATH}`);
      assert.equal(first.status?.code ?? 0, Code.OK, first.status?.message);
      assert.equal(first.result?.exitCode, 0);
      assert.equal(await readBlob(farm.clients, first.result?.stdoutDigest), "first image\n");
      const second = await runIn(other, `cat /${MARKER_PATH}`);
      assert.equal(await readBlob(farm.clients, second.result?.stdoutDigest), "second image\n");
    });

    test("the input root is at /run/berth/execroot, the command starts in its working directory, outputs are collected", async () => {
      const response = await runIn(busybox, "pwd; cat input.txt; echo made > out.txt", [], {
        workingDirectory: "sub",
        outputFiles: ["out.txt"],
      });
      assert.equal(response.result?.exitCode, 0, await readBlob(farm.clients, response.result?.stderrDigest));
      assert.equal(
        await readBlob(farm.clients, response.result?.stdoutDigest),
        "/run/berth/execroot/sub\nfrom the input root\n",
      );
      assert.equal(response.result?.outputFiles[0]?.path, "out.txt");
      assert.equal(await readBlob(farm.clients, response.result?.outputFiles[0]?.digest), "made\n");
    });

    test("the image's Env is the base of the environment; the command's variables win", async () => {
      const response = await runIn(busybox, "echo $PATH; echo $MINE", [], { env: { MINE: "mine" } });
      assert.equal(await readBlob(farm.clients, response.result?.stdoutDigest), "/bin\nmine\n");
      const overridden = await runIn(busybox, "echo $PATH", [], { env: { PATH: "/usr/bin:/bin" } });
      assert.equal(await readBlob(farm.clients, overridden.result?.stdoutDigest), "/usr/bin:/bin\n");
    });

    test("layers are applied in order: whiteouts and opaque directories hide what lower layers had", async () => {
      const present = Object.keys(LAYERED_IMAGE.present);
      const script = [...present.map((p) => `cat /${p}`), ...LAYERED_IMAGE.absent.map((p) => `test ! -e /${p}`)].join(
        " && ",
      );
      const response = await runIn(layered, script);
      assert.equal(response.result?.exitCode, 0, await readBlob(farm.clients, response.result?.stderrDigest));
      assert.equal(
        await readBlob(farm.clients, response.result?.stdoutDigest),
        Object.values(LAYERED_IMAGE.present).join(""),
      );
    });

    test("writes to the image go to the action's own layer: the next action sees the image unchanged", async () => {
      const writer = await runIn(busybox, `echo changed > /tmp/x; mkdir -p /scratch && echo x > /scratch/y; id -u`, [
        { name: "dockerRunAsRoot", value: "true" },
      ]);
      assert.equal(writer.result?.exitCode, 0, await readBlob(farm.clients, writer.result?.stderrDigest));
      assert.equal(await readBlob(farm.clients, writer.result?.stdoutDigest), "0\n");
      const reader = await runIn(busybox, "test ! -e /scratch && id -u");
      assert.equal(reader.result?.exitCode, 0);
      assert.equal(await readBlob(farm.clients, reader.result?.stdoutDigest), "65534\n");
      // Nothing of the image store was touched: every layer's marker is as pushed.
      const layers = join(farm.config.dataDir, IMAGE_DIRS[mode]);
      const markers = await findFiles(layers, "berth-image-marker");
      assert.ok(markers.length >= 2);
      for (const marker of markers)
        assert.match(await readFile(marker, "utf8"), /^(first image|second image|locked image|layered)\n$/);
    });

    test("no network unless dockerNetwork=standard", async () => {
      const closed = await runIn(busybox, "ip link 2>/dev/null | grep -c '^[0-9]'");
      assert.equal(await readBlob(farm.clients, closed.result?.stdoutDigest), "1\n");
    });

    test("the image that ran is reported in auxiliary_metadata, pinned to its digest", async () => {
      const response = await runIn(busybox, "true");
      const any = response.result?.executionMetadata?.auxiliaryMetadata.find((a) => a.typeUrl.endsWith("ImageUsed"));
      assert.ok(any, "ImageUsed in auxiliary_metadata");
      const used = ImageUsed.decode(any.value);
      assert.equal(used.reference.split("@")[0], busybox);
      assert.match(used.manifestDigest, /^sha256:[a-f0-9]{64}$/);
      assert.ok(used.reference.endsWith(`@${used.manifestDigest}`));
    });

    test("a missing image, refused credentials and an unreachable registry complete the operation with a status naming the image", async () => {
      const missing = await runIn(`${open.host}/team/absent:1`, "true");
      assert.equal(missing.status?.code, Code.FAILED_PRECONDITION);
      assert.match(missing.status?.message ?? "", /team\/absent:1/);

      const image = `${locked.host}/private/busybox:1`;
      const anonymous = await runIn(image, "true");
      assert.equal(anonymous.status?.code, Code.PERMISSION_DENIED, anonymous.status?.message);
      const wrong = await runIn(image, "true", [
        { name: "container-registry-username", value: locked.username },
        { name: "container-registry-password", value: "not-the-password" },
      ]);
      assert.equal(wrong.status?.code, Code.PERMISSION_DENIED);
      assert.doesNotMatch(JSON.stringify(wrong), /not-the-password/);
      const right = await runIn(image, `cat /${MARKER_PATH}`, [
        { name: "container-registry-username", value: locked.username },
        { name: "container-registry-password", value: locked.password },
      ]);
      assert.equal(right.status?.code ?? 0, Code.OK, right.status?.message);
      assert.equal(await readBlob(farm.clients, right.result?.stdoutDigest), "locked image\n");
      assert.doesNotMatch(JSON.stringify(right.result?.executionMetadata), new RegExp(locked.password));

      const unreachable = await runIn("127.0.0.1:9/team/busybox:1", "true");
      assert.equal(unreachable.status?.code, Code.UNAVAILABLE);
      assert.match(unreachable.status?.message ?? "", /127\.0\.0\.1:9\/team\/busybox:1/);
    });
  });
}

async function findFiles(dir: string, name: string): Promise<string[]> {
  const found: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (entry.name === name && entry.isFile()) found.push(join(entry.parentPath, entry.name));
  }
  return found;
}
