import { invalidArgument } from "../status/status.js";

/** Output paths are relative to the working directory, with no `.`, `..` or empty segments. */
export function checkRelativePath(path: string, field: string): void {
  if (path === "") throw invalidArgument(field, "path is empty");
  if (path.startsWith("/")) throw invalidArgument(field, `"${path}" is absolute; output paths are relative`);
  for (const segment of path.split("/")) {
    if (segment === "" || segment === "." || segment === "..") {
      throw invalidArgument(field, `"${path}" has a "${segment}" segment; paths must be normalized`);
    }
  }
}
