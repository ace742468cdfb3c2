import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { RegistryError } from "./errors.js";
import type { ImageIndex } from "./manifest.js";
import { defaultPlatform, formatPlatform, selectManifest } from "./platform.js";

const digest = (n: number) => `sha256:${String(n).repeat(64)}`;
const entry = (n: number, platform?: { os: string; architecture: string; variant?: string }) => ({
  mediaType: "application/vnd.oci.image.manifest.v1+json",
  digest: digest(n),
  size: 100,
  ...(platform ? { platform } : {}),
});

const INDEX: ImageIndex = {
  schemaVersion: 2,
  manifests: [
    entry(1, { os: "linux", architecture: "arm", variant: "v6" }),
    entry(2, { os: "linux", architecture: "arm", variant: "v7" }),
    entry(3, { os: "linux", architecture: "arm64" }),
    entry(4, { os: "unknown", architecture: "unknown" }),
    entry(5, { os: "windows", architecture: "amd64" }),
    entry(6, { os: "linux", architecture: "amd64", variant: "v3" }),
    entry(7, { os: "linux", architecture: "amd64" }),
    entry(8),
  ],
};

describe("platform selection", () => {
  it("maps Node's architectures to OCI names", () => {
    assert.deepEqual(defaultPlatform("x64"), { os: "linux", architecture: "amd64" });
    assert.equal(defaultPlatform("ia32").architecture, "386");
    assert.equal(defaultPlatform("ppc64").architecture, "ppc64le");
    assert.equal(formatPlatform({ os: "linux", architecture: "arm", variant: "v7" }), "linux/arm/v7");
  });

  it("prefers the entry without variant, matches variants when asked, and arm64 means v8", () => {
    assert.equal(selectManifest(INDEX, { os: "linux", architecture: "amd64" }, "r").digest, digest(7));
    assert.equal(selectManifest(INDEX, { os: "linux", architecture: "amd64", variant: "v3" }, "r").digest, digest(6));
    assert.equal(selectManifest(INDEX, { os: "linux", architecture: "arm", variant: "v7" }, "r").digest, digest(2));
    assert.equal(selectManifest(INDEX, { os: "linux", architecture: "arm64", variant: "v8" }, "r").digest, digest(3));
    assert.equal(selectManifest(INDEX, { os: "windows", architecture: "amd64" }, "r").digest, digest(5));
  });

  it("lists what is on offer, attestations left out", () => {
    assert.throws(
      () => selectManifest(INDEX, { os: "linux", architecture: "riscv64" }, "reg/x:1"),
      (err: unknown) => {
        assert.ok(err instanceof RegistryError);
        assert.equal(err.kind, "not-found");
        assert.equal(
          err.message,
          "image reg/x:1: the image has no variant for platform linux/riscv64; it offers linux/arm/v6, linux/arm/v7, linux/arm64, windows/amd64, linux/amd64/v3, linux/amd64",
        );
        return true;
      },
    );
  });
});
