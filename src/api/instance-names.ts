import { invalidArgument } from "../status/status.js";

/** Keywords that cannot be segments of an instance name (they delimit resource names). */
const RESERVED = new Set([
  "blobs",
  "uploads",
  "actions",
  "actionResults",
  "operations",
  "capabilities",
  "compressed-blobs",
]);

/** Which instance names this farm serves; with none configured, any well-formed name. */
export class InstanceNames {
  private readonly allowed: ReadonlySet<string> | undefined;

  constructor(names: readonly string[]) {
    this.allowed = names.length > 0 ? new Set(names) : undefined;
  }

  check(name: string, field = "instance_name"): string {
    if (this.allowed && !this.allowed.has(name)) {
      const list = [...this.allowed].map((n) => `"${n}"`).join(", ");
      throw invalidArgument(field, `unknown instance name "${name}"; this farm serves ${list}`);
    }
    for (const segment of name === "" ? [] : name.split("/")) {
      if (segment === "" || RESERVED.has(segment)) {
        throw invalidArgument(field, `instance name "${name}" has a reserved or empty segment "${segment}"`);
      }
    }
    return name;
  }
}
