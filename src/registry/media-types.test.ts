import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { essence, layerSupport, MANIFEST_ACCEPT, MediaType, manifestKind } from "./media-types.js";

describe("media types", () => {
  it("asks for all four manifest types, so a Docker registry never converts to schema 1", () => {
    const accepted = MANIFEST_ACCEPT.split(", ");
    assert.deepEqual(
      accepted.sort(),
      [MediaType.dockerManifestList, MediaType.dockerManifest, MediaType.ociIndex, MediaType.ociManifest].sort(),
    );
  });

  it("tells images from indexes", () => {
    assert.equal(manifestKind(MediaType.ociManifest), "image");
    assert.equal(manifestKind(MediaType.dockerManifest), "image");
    assert.equal(manifestKind(MediaType.ociIndex), "index");
    assert.equal(manifestKind(MediaType.dockerManifestList), "index");
    assert.equal(manifestKind("application/vnd.docker.distribution.manifest.v1+prettyjws"), undefined);
  });

  it("knows each supported layer's compression", () => {
    assert.deepEqual(layerSupport(MediaType.ociLayerTar), { ok: true, compression: "none" });
    assert.deepEqual(layerSupport(MediaType.ociLayerGzip), { ok: true, compression: "gzip" });
    assert.deepEqual(layerSupport(MediaType.dockerLayerGzip), { ok: true, compression: "gzip" });
    assert.deepEqual(layerSupport(MediaType.ociLayerZstd), { ok: true, compression: "zstd" });
  });

  it("refuses foreign, non-distributable and unknown layers with the reason", () => {
    for (const type of [
      "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
      "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    ]) {
      const support = layerSupport(type);
      assert.ok(!support.ok && /foreign \(non-distributable\)/.test(support.reason), type);
    }
    const unknown = layerSupport("application/vnd.example.layer+squashfs");
    assert.ok(
      !unknown.ok && /"application\/vnd.example.layer\+squashfs" is not supported; Berth supports/.test(unknown.reason),
    );
  });

  it("reads a Content-Type's essence", () => {
    assert.equal(essence("Application/JSON; charset=utf-8"), "application/json");
    assert.equal(essence(null), "");
  });
});
