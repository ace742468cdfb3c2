import { RegistryError } from "./errors.js";
import type { Descriptor, ImageIndex } from "./manifest.js";

/** An OCI platform: `linux`/`amd64`, `linux`/`arm`/`v7`, … */
export interface Platform {
  readonly os: string;
  readonly architecture: string;
  /** Compared only when asked for. */
  readonly variant?: string;
}

/** Node's `process.arch` in the names of the OCI image spec (Go's GOARCH). */
const ARCHITECTURES: Record<string, string> = {
  x64: "amd64",
  arm64: "arm64",
  arm: "arm",
  ia32: "386",
  ppc64: "ppc64le",
  s390x: "s390x",
  riscv64: "riscv64",
  loong64: "loong64",
  mips: "mips",
  mipsel: "mipsle",
};

/** The platform this process runs on, as images name it; Berth's workers only run Linux images. */
export function defaultPlatform(arch: string = process.arch): Platform {
  return { os: "linux", architecture: ARCHITECTURES[arch] ?? arch };
}

export function formatPlatform(p: Platform): string {
  return [p.os, p.architecture, p.variant].filter((s) => s !== undefined && s !== "").join("/");
}

/** arm64 images often omit their only variant, v8. */
function normalizedVariant(architecture: string, variant: string | undefined): string | undefined {
  if (architecture === "arm64" && (variant === undefined || variant === "")) return "v8";
  return variant === "" ? undefined : variant;
}

/**
 * The manifest an index offers for `wanted`. Without a wanted variant, an entry
 * without variant is preferred over the others. Entries without a platform
 * (attestations, signatures) are never chosen.
 */
export function selectManifest(index: ImageIndex, wanted: Platform, reference: string): Descriptor {
  const candidates = index.manifests.filter((d) => {
    const p = d.platform;
    if (!p || p.os !== wanted.os || p.architecture !== wanted.architecture) return false;
    if (wanted.variant === undefined) return true;
    return normalizedVariant(p.architecture, p.variant) === normalizedVariant(wanted.architecture, wanted.variant);
  });
  const chosen = candidates.find((d) => !d.platform?.variant) ?? candidates[0];
  if (chosen) return chosen;
  const offered = index.manifests
    .flatMap((d) => (d.platform && d.platform.os !== "unknown" ? [formatPlatform(d.platform)] : []))
    .filter((p, i, all) => all.indexOf(p) === i);
  throw new RegistryError(
    "not-found",
    reference,
    `the image has no variant for platform ${formatPlatform(wanted)}; it offers ${offered.length > 0 ? offered.join(", ") : "no platforms"}`,
  );
}
