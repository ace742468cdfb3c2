/**
 * Persistent-worker actions as Bazel 6+ builds them with
 * --experimental_remote_mark_tool_inputs: the Command is the action as a
 * plain process (the tool, its start-up arguments, then the @flagfile
 * holding the request's arguments); the tool's files carry the node property
 * bazel_tool_input; the platform, on both Action and Command, has
 * persistentWorkerKey (a hex fingerprint of the tool's files, arguments and
 * environment) and, when the rule's exec_properties say so,
 * persistentWorkerProtocol. The tool is test/support/persistent_worker.py.
 */
import { createHash } from "node:crypto";
import { chmod, mkdir, readFile, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Digest } from "../../src/digest/digest.js";
import { SHA256 } from "../../src/digest/functions.js";
import { Action, Command, Directory } from "../../src/gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { InputRootSource } from "../../src/persistent/persistent-action.js";
import { sha256, type WireDigest } from "./blobs.js";

const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
export const PERSISTENT_WORKER_SCRIPT = join(REPO_ROOT, "test", "support", "persistent_worker.py");
/** Where Bazel puts a tool built for the exec configuration, and a target's params file. */
export const TOOL_PATH = "bazel-out/k8-opt-exec/bin/tools/persistent_worker.py";
const PARAMS_DIR = "bazel-out/k8-fastbuild/bin/pkg";

export interface BazelWorkerActionSpec {
  /** The lines of the params file: the request's arguments. */
  requestArgs: string[];
  /** persistentWorkerProtocol as the rule's exec_properties set it; absent: not sent (proto). */
  protocol?: string;
  /** How the tool is told its protocol (the tool's own flag, part of the start-up arguments). */
  toolProtocol?: "json" | "proto";
  /** More start-up arguments, e.g. --startup-delay=1. */
  startupArgs?: string[];
  /** Other (non-tool) input files by path. */
  sources?: Record<string, string>;
  env?: Record<string, string>;
  /** The tool's contents (default: persistent_worker.py itself); another content is another tool. */
  tool?: string;
  /** Arguments of the Command in place of the usual flagfile argument (to send a bad one). */
  flagfileArgs?: string[];
  /** Leaves the params file out of the input root. */
  omitParamsFile?: boolean;
  /** Extra platform properties (exec_properties). */
  properties?: { name: string; value: string }[];
  /** persistentWorkerKey as a hostile client sends it, in place of Bazel's fingerprint. */
  workerKey?: string;
  /** Makes the params file's name (and so the action) distinct. */
  name?: string;
}

export interface BazelWorkerAction {
  action: Action;
  command: Command;
  /** The input root, as the worker has it once it read the tree. */
  inputs: InputRootSource;
  /** Every blob (files, Directory messages, the Command and the Action) by digest key. */
  blobs: Map<string, { digest: WireDigest; data: Buffer }>;
  /** Writes the input root below `dir` as the worker would lay it out. */
  writeInputRoot(dir: string): Promise<void>;
}

interface TreeFile {
  data: Buffer;
  executable: boolean;
  tool: boolean;
}

export async function bazelWorkerAction(spec: BazelWorkerActionSpec): Promise<BazelWorkerAction> {
  const tool = Buffer.from(spec.tool ?? (await readFile(PERSISTENT_WORKER_SCRIPT, "utf8")));
  const paramsPath = `${PARAMS_DIR}/${spec.name ?? "out"}-0.params`;
  const files = new Map<string, TreeFile>([[TOOL_PATH, { data: tool, executable: true, tool: true }]]);
  if (!spec.omitParamsFile) {
    files.set(paramsPath, {
      data: Buffer.from(spec.requestArgs.map((a) => `${a}\n`).join("")),
      executable: false,
      tool: false,
    });
  }
  for (const [path, content] of Object.entries(spec.sources ?? {})) {
    files.set(path, { data: Buffer.from(content), executable: false, tool: false });
  }
  const startup = [
    "/usr/bin/python3",
    TOOL_PATH,
    `--protocol=${spec.toolProtocol ?? (spec.protocol === "json" ? "json" : "proto")}`,
    ...(spec.startupArgs ?? []),
  ];
  const args = [...startup, ...(spec.flagfileArgs ?? [`@${paramsPath}`])];
  const env = spec.env ?? { PATH: "/usr/bin:/bin" };

  const blobs = new Map<string, { digest: WireDigest; data: Buffer }>();
  const add = (data: Buffer): WireDigest => {
    const digest = sha256(data);
    blobs.set(`${digest.hash}/${digest.sizeBytes}`, { digest, data });
    return digest;
  };
  const directories = new Map<string, Directory>();
  const root = encodeDirectory(files, "", add, directories);

  // Bazel's key: a fingerprint of the tool files' digests, the worker's arguments and its environment.
  const fingerprint = createHash("sha256");
  for (const [path, file] of [...files].filter(([, f]) => f.tool))
    fingerprint.update(`${path}\0${sha256(file.data).hash}\0`);
  fingerprint.update(JSON.stringify([startup, Object.entries(env).sort()]));
  const properties = [
    { name: "persistentWorkerKey", value: spec.workerKey ?? fingerprint.digest("hex") },
    ...(spec.protocol === undefined ? [] : [{ name: "persistentWorkerProtocol", value: spec.protocol }]),
    ...(spec.properties ?? []),
  ].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));

  const command = Command.fromPartial({
    arguments: args,
    environmentVariables: Object.entries(env)
      .sort(([a], [b]) => (a < b ? -1 : 1))
      .map(([name, value]) => ({ name, value })),
    outputPaths: [`${PARAMS_DIR}/${spec.name ?? "out"}.txt`],
    platform: { properties },
  });
  const commandDigest = add(Buffer.from(Command.encode(command).finish()));
  const action = Action.fromPartial({ commandDigest, inputRootDigest: root, platform: { properties } });
  add(Buffer.from(Action.encode(action).finish()));

  const digestOf = (wire: WireDigest): Digest => ({ fn: SHA256, hash: wire.hash, sizeBytes: wire.sizeBytes });
  const inputs: InputRootSource = {
    fn: SHA256,
    root: digestOf(root),
    directory: (digest) => directories.get(`${digest.hash}/${digest.sizeBytes}`),
    readFile: async (digest) => {
      const blob = blobs.get(`${digest.hash}/${digest.sizeBytes}`);
      if (!blob) throw new Error(`no blob ${digest.hash}`);
      return blob.data;
    },
  };
  return {
    action,
    command,
    inputs,
    blobs,
    writeInputRoot: async (dir) => {
      for (const [path, file] of files) {
        await mkdir(dirname(join(dir, path)), { recursive: true });
        await writeFile(join(dir, path), file.data);
        await chmod(join(dir, path), file.executable ? 0o555 : 0o444);
      }
    },
  };
}

/** The Directory holding `files` below `prefix`, its children first; returns its digest. */
function encodeDirectory(
  files: Map<string, TreeFile>,
  prefix: string,
  add: (data: Buffer) => WireDigest,
  directories: Map<string, Directory>,
): WireDigest {
  const here: [string, TreeFile][] = [];
  const children = new Set<string>();
  for (const [path, file] of files) {
    if (!path.startsWith(prefix)) continue;
    const rest = path.slice(prefix.length);
    const slash = rest.indexOf("/");
    if (slash < 0) here.push([rest, file]);
    else children.add(rest.slice(0, slash));
  }
  const byName = (a: string, b: string) => Buffer.compare(Buffer.from(a), Buffer.from(b));
  const directory = Directory.fromPartial({
    files: here
      .sort(([a], [b]) => byName(a, b))
      .map(([name, file]) => ({
        name,
        digest: add(file.data),
        isExecutable: file.executable,
        // Bazel's MerkleTree: the one property, with an empty value, on the tool's files only.
        nodeProperties: file.tool ? { properties: [{ name: "bazel_tool_input", value: "" }] } : undefined,
      })),
    directories: [...children]
      .sort(byName)
      .map((name) => ({ name, digest: encodeDirectory(files, `${prefix}${name}/`, add, directories) })),
  });
  const digest = add(Buffer.from(Directory.encode(directory).finish()));
  directories.set(`${digest.hash}/${digest.sizeBytes}`, directory);
  return digest;
}
