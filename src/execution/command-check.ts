import { MAX_INPUT_PATH_BYTES } from "../cas/tree-limits.js";
import type { Command } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { invalidArgument } from "../status/status.js";

/**
 * Refuses, as INVALID_ARGUMENT naming the field, what no worker could pass
 * to a program: execve takes NUL-terminated strings, and an environment
 * entry is NAME=VALUE, so a name that is empty or holds "=" would turn into
 * another variable. Paths longer than the farm lays out would fail with
 * ENAMETOOLONG on the worker.
 */
export function checkCommand(command: Command): void {
  if (command.arguments.length === 0) throw invalidArgument("command.arguments", "is empty");
  command.arguments.forEach((arg, i) => {
    if (arg.includes("\0")) throw invalidArgument(`command.arguments[${i}]`, "contains a NUL byte");
  });
  command.environmentVariables.forEach(({ name, value }, i) => {
    const field = `command.environment_variables[${i}]`;
    if (name === "") throw invalidArgument(`${field}.name`, "is empty");
    if (name.includes("=")) throw invalidArgument(`${field}.name`, `"${shown(name)}" contains "="`);
    if (name.includes("\0")) throw invalidArgument(`${field}.name`, "contains a NUL byte");
    if (value.includes("\0")) throw invalidArgument(`${field}.value`, `(of ${shown(name)}) contains a NUL byte`);
  });
  const paths: [string, string][] = [
    ["command.working_directory", command.workingDirectory],
    ...command.outputFiles.map((p, i): [string, string] => [`command.output_files[${i}]`, p]),
    ...command.outputDirectories.map((p, i): [string, string] => [`command.output_directories[${i}]`, p]),
    ...command.outputPaths.map((p, i): [string, string] => [`command.output_paths[${i}]`, p]),
  ];
  for (const [field, path] of paths) {
    if (path.includes("\0")) throw invalidArgument(field, "contains a NUL byte");
    const bytes = Buffer.byteLength(path);
    if (bytes > MAX_INPUT_PATH_BYTES) {
      throw invalidArgument(
        field,
        `is ${bytes} bytes long; this farm lays out paths of at most ${MAX_INPUT_PATH_BYTES} bytes`,
      );
    }
    for (const part of path.split("/")) {
      if (Buffer.byteLength(part) > 255) {
        throw invalidArgument(field, `has a component of more than 255 bytes, the file system's limit`);
      }
    }
  }
}

function shown(s: string): string {
  const printable = s.replaceAll("\0", "\\0");
  return printable.length > 80 ? `${printable.slice(0, 80)}…` : printable;
}
