import { satisfies } from "./host-platform.js";

/** A platform property, as REAPI's Platform.Property. */
export interface Property {
  name: string;
  value: string;
}

/**
 * The first property of `wanted` that `offered` lacks, or undefined when all
 * are offered. A worker may offer several values of one name. Values are
 * compared exactly, except those of OSFamily, ISA and Arch (see host-platform.ts).
 */
export function unmetProperty(offered: readonly Property[], wanted: readonly Property[]): Property | undefined {
  return wanted.find((w) => !offered.some((o) => satisfies(o, w)));
}

export function formatProperty(p: Property): string {
  return `${p.name}=${p.value}`;
}
