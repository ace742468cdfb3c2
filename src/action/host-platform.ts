import type { Property } from "./property.js";

/**
 * The platform properties every worker offers about itself, under the names
 * clients use: Bazel's remote toolchain configurations and Buildbarn say
 * `OSFamily` and `ISA`, BuildBuddy says `OSFamily` and `Arch`, BuildStream
 * `OSFamily` and `ISA`. Their values come in many spellings ("Linux",
 * "x86_64", "amd64"), so they are compared as what they name, not as strings.
 */

export const OS_FAMILY = "OSFamily";
export const ISA = "ISA";
export const ARCH = "Arch";

/** Other spellings of an operating system, lower-cased, by the name Berth offers. */
const OS_ALIASES: Record<string, string> = {
  darwin: "macos",
  osx: "macos",
  "mac os x": "macos",
  win32: "windows",
};

/**
 * Other spellings of an architecture (Node's process.arch, Go's GOARCH,
 * uname -m, Debian's), lower-cased with "_" as "-", by the name Berth offers
 * (BuildStream's and Buildbarn's names).
 */
const ARCH_ALIASES: Record<string, string> = {
  x64: "x86-64",
  amd64: "x86-64",
  "x86-64": "x86-64",
  x8664: "x86-64",
  arm64: "aarch64",
  armv8: "aarch64",
  "armv8-a": "aarch64",
  ia32: "x86-32",
  i386: "x86-32",
  i486: "x86-32",
  i586: "x86-32",
  i686: "x86-32",
  x86: "x86-32",
  "386": "x86-32",
  arm: "aarch32",
  armhf: "aarch32",
  armel: "aarch32",
  armv7l: "aarch32",
  armv7: "aarch32",
  ppc64le: "power-isa-le",
  ppc64el: "power-isa-le",
  ppc64: "power-isa-be",
  s390x: "s390x",
  riscv64: "riscv64",
  loong64: "loongarch64",
  loongarch64: "loongarch64",
};

/** How the values of a well-known property are brought to one spelling. */
const CANONICAL: Record<string, (value: string) => string> = {
  [OS_FAMILY]: (value) => {
    const lower = value.trim().toLowerCase();
    return OS_ALIASES[lower] ?? lower;
  },
  [ISA]: canonicalArch,
  [ARCH]: canonicalArch,
};

function canonicalArch(value: string): string {
  const lower = value.trim().toLowerCase().replaceAll("_", "-");
  return ARCH_ALIASES[lower] ?? lower;
}

/**
 * Whether a worker's `offered` property satisfies the action's `wanted` one:
 * the same name, and the same value; for OSFamily, ISA and Arch the same
 * thing however spelled ("Linux" is "linux", "x86_64" and "amd64" are "x86-64").
 */
export function satisfies(offered: Property, wanted: Property): boolean {
  if (offered.name !== wanted.name) return false;
  if (offered.value === wanted.value) return true;
  const canonical = CANONICAL[wanted.name];
  return canonical !== undefined && canonical(offered.value) === canonical(wanted.value);
}

/**
 * What a worker on `platform` and `arch` (Node's process.platform and
 * process.arch, or os.endianness's answer for ppc64) offers about itself,
 * leaving out the names in `configured`: an operator's own --property wins.
 */
export function hostPlatformProperties(
  configured: readonly Property[] = [],
  platform: string = process.platform,
  arch: string = process.arch,
  endianness: "BE" | "LE" = "LE",
): Property[] {
  const os = CANONICAL[OS_FAMILY] as (value: string) => string;
  const isa = arch === "ppc64" ? (endianness === "LE" ? "power-isa-le" : "power-isa-be") : canonicalArch(arch);
  const own: Property[] = [
    { name: OS_FAMILY, value: os(platform) },
    { name: ISA, value: isa },
    { name: ARCH, value: isa },
  ];
  const named = new Set(configured.map((p) => p.name));
  return own.filter((p) => !named.has(p.name));
}
