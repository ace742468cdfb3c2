import { InvalidArgumentError } from "commander";
import type { Property } from "../action/property.js";

/** Parses repeated `--property KEY=VALUE` options. */
export function collectProperty(value: string, previous: Property[]): Property[] {
  const at = value.indexOf("=");
  if (at <= 0) throw new InvalidArgumentError(`"${value}" is not KEY=VALUE`);
  return [...previous, { name: value.slice(0, at), value: value.slice(at + 1) }];
}
