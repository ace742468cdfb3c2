/**
 * Whether an action is a remote persistent-worker action, as Bazel 6+ sends
 * them with --experimental_remote_mark_tool_inputs, and what it becomes: a
 * worker process started with the Command's arguments that are not flagfiles
 * (plus --persistent_worker), and a WorkRequest carrying the lines of those
 * flagfiles and every input file with its digest. The Command itself is the
 * action run as a plain process; Bazel does not rewrite it.
 */
import { createHash } from "node:crypto";
import { posix } from "node:path";
import { type Digest, digestKey, parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type { WorkRequest } from "../gen/blaze/worker/worker_protocol.js";
import type { Action, Command, Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { invalidArgument, missingBlobs } from "../status/status.js";
import type { WorkerLaunch } from "./launcher.js";
import type { WorkProtocol } from "./work-protocol.js";

/** Bazel's platform property: an opaque key over the tool's files, arguments and environment. */
export const PERSISTENT_WORKER_KEY = "persistentWorkerKey";
/** json, or proto (the default; also spelled protobuf): from the rule's exec_properties, Bazel never sets it. */
export const PERSISTENT_WORKER_PROTOCOL = "persistentWorkerProtocol";
/** The node property (empty value) Bazel puts on the input files that belong to the tool. */
export const TOOL_INPUT_PROPERTY = "bazel_tool_input";
/** What turns a tool into a worker reading WorkRequests; Bazel appends it to the start-up arguments. */
export const PERSISTENT_WORKER_FLAG = "--persistent_worker";

/** Bazel's WorkerParser: an argument is a flagfile argument when the whole of it matches this. */
const FLAGFILE_ARGUMENT = /^(?:@|--?flagfile=)(.+)$/;
/** Bazel's expansion leaves external repository labels (@repo//pkg) as they are. */
const EXTERNAL_LABEL = /^@.*\/\/.*$/;

export interface FlagfileLimits {
  /** Bytes of all the flagfiles one action's request reads. */
  maxBytes: number;
  /** A flagfile naming a flagfile naming…: Bazel does not bound it (and overflows its stack on a cycle). */
  maxDepth: number;
}

export const DEFAULT_FLAGFILE_LIMITS: FlagfileLimits = { maxBytes: 16 * 1024 * 1024, maxDepth: 16 };

/** The input root as the worker already has it: its Directory messages, and its files' bytes on demand. */
export interface InputRootSource {
  readonly fn: DigestFunction;
  readonly root: Digest;
  /** A Directory of the tree by digest; every one of them was read (and checked) before. */
  directory(digest: Digest): Directory | undefined;
  /** The bytes of an input file (the flagfiles are read through it). */
  readFile(digest: Digest): Promise<Buffer>;
}

export interface PersistentWorkerSpec {
  /**
   * The pool's key: the client's persistentWorkerKey, the protocol, the start-up arguments, the environment,
   * the working directory, every tool input's path and digest, and the caller's scope. The client's key alone
   * is not trusted: two actions whose tools differ never share a process, whatever key they send.
   */
  key: string;
  /** persistentWorkerKey as the action sent it. */
  clientKey: string;
  protocol: WorkProtocol;
  launch: WorkerLaunch;
  /** The request for this action (request_id 0: singleplex). */
  request: WorkRequest;
  /** Paths (relative to the input root) of the input files marked bazel_tool_input. */
  toolInputs: string[];
}

export interface PersistentActionOptions {
  /** Folded into the key: what else must match for two actions to share a process (instance, image, runner). */
  scope?: string;
  limits?: FlagfileLimits;
}

/**
 * The action's persistent-worker spec, or undefined when it asks for none (no persistentWorkerKey). Bad
 * input is INVALID_ARGUMENT naming the property or argument; a Directory not in `inputs` is FAILED_PRECONDITION.
 */
export async function persistentWorkerSpec(
  action: Action,
  command: Command,
  inputs: InputRootSource,
  options: PersistentActionOptions = {},
): Promise<PersistentWorkerSpec | undefined> {
  // REAPI 2.2 moved the platform to the Action; older clients send it on the Command (Bazel sends both).
  const properties =
    (action.platform?.properties.length ?? 0) > 0
      ? (action.platform?.properties ?? [])
      : (command.platform?.properties ?? []);
  const clientKey = single(properties, PERSISTENT_WORKER_KEY);
  if (clientKey === undefined || clientKey === "") return undefined;
  const protocol = readProtocol(single(properties, PERSISTENT_WORKER_PROTOCOL));

  const startup: string[] = [];
  const flagfiles: { argument: string; index: number }[] = [];
  command.arguments.forEach((argument, index) => {
    if (FLAGFILE_ARGUMENT.test(argument)) flagfiles.push({ argument, index });
    else startup.push(argument);
  });
  if (flagfiles.length === 0) {
    throw invalidArgument(
      "Command.arguments",
      `the action has platform property ${PERSISTENT_WORKER_KEY} but none of its ${command.arguments.length} arguments is an @flagfile or --flagfile= argument, which carry a worker's request`,
    );
  }
  if (startup.length === 0) {
    throw invalidArgument(
      "Command.arguments",
      `the action has platform property ${PERSISTENT_WORKER_KEY} but every argument is a flagfile: there is no tool to start`,
    );
  }

  const files = listFiles(inputs);
  const workingDirectory = posix.normalize(command.workingDirectory || ".");
  if (posix.isAbsolute(workingDirectory) || workingDirectory === ".." || workingDirectory.startsWith("../")) {
    throw invalidArgument("Command.working_directory", `${quote(command.workingDirectory)} is outside the input root`);
  }
  const expander = new FlagfileExpander(files, inputs, workingDirectory, options.limits ?? DEFAULT_FLAGFILE_LIMITS);
  const requestArguments: string[] = [];
  for (const { argument, index } of flagfiles) {
    requestArguments.push(...(await expander.expand(argument, `Command.arguments[${index}]`, 0)));
  }

  const env = Object.fromEntries(command.environmentVariables.map(({ name, value }) => [name, value]));
  const argv = [...startup, PERSISTENT_WORKER_FLAG];
  const tools = [...files].filter(([, file]) => file.tool);
  const key = createHash("sha256")
    .update(
      JSON.stringify({
        scope: options.scope ?? "",
        clientKey,
        protocol,
        argv,
        env: Object.entries(env).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)),
        workingDirectory,
        tools: tools.map(([path, file]) => [path, file.digest.fn.name, file.digest.hash, file.digest.sizeBytes]),
      }),
    )
    .digest("hex");
  return {
    key,
    clientKey,
    protocol,
    launch: { argv, env, workingDirectory },
    request: {
      arguments: requestArguments,
      // As Bazel sends them: the lowercase hex of the content hash, as UTF-8 bytes.
      inputs: [...files].map(([path, file]) => ({ path, digest: Buffer.from(file.digest.hash) })),
      requestId: 0,
      cancel: false,
      verbosity: 0,
      sandboxDir: "",
    },
    toolInputs: tools.map(([path]) => path),
  };
}

function single(properties: readonly { name: string; value: string }[], name: string): string | undefined {
  const values = properties.filter((p) => p.name === name);
  if (values.length > 1)
    throw invalidArgument(`platform property ${name}`, `is given ${values.length} times; give it once`);
  return values[0]?.value;
}

function readProtocol(value: string | undefined): WorkProtocol {
  if (value === undefined || value === "" || value === "proto" || value === "protobuf") return "proto";
  if (value === "json") return "json";
  throw invalidArgument(
    `platform property ${PERSISTENT_WORKER_PROTOCOL}`,
    `${JSON.stringify(value.slice(0, 100))} is not a worker protocol; use json or proto (also spelled protobuf)`,
  );
}

interface InputFile {
  digest: Digest;
  tool: boolean;
}

/** Every file of the input root by path (relative, "/"-separated), in path order. */
function listFiles(inputs: InputRootSource): Map<string, InputFile> {
  const files: [string, InputFile][] = [];
  const pending: { digest: Digest; path: string }[] = [{ digest: inputs.root, path: "" }];
  for (let next = pending.pop(); next !== undefined; next = pending.pop()) {
    const directory = inputs.directory(next.digest);
    if (!directory) throw missingBlobs([digestKey(next.digest)], "Directory");
    for (const file of directory.files) {
      const path = next.path + file.name;
      files.push([
        path,
        {
          digest: parseDigest(inputs.fn, file.digest, `input file ${path}`),
          tool: file.nodeProperties?.properties.some((p) => p.name === TOOL_INPUT_PROPERTY) ?? false,
        },
      ]);
    }
    for (const child of directory.directories) {
      const path = `${next.path}${child.name}/`;
      pending.push({ digest: parseDigest(inputs.fn, child.digest, `input directory ${path}`), path });
    }
  }
  files.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return new Map(files);
}

/** Bazel's WorkerSpawnRunner.expandArgument, bounded in depth and bytes. */
class FlagfileExpander {
  private bytesRead = 0;
  private readonly decoder = new TextDecoder("utf-8", { fatal: true });

  constructor(
    private readonly files: ReadonlyMap<string, InputFile>,
    private readonly inputs: InputRootSource,
    private readonly workingDirectory: string,
    private readonly limits: FlagfileLimits,
  ) {}

  async expand(argument: string, field: string, depth: number): Promise<string[]> {
    // --flagfile= arguments, @@escaped ones and external labels travel as they are (the tool reads the file).
    if (!argument.startsWith("@") || argument.startsWith("@@") || EXTERNAL_LABEL.test(argument)) return [argument];
    if (depth >= this.limits.maxDepth) {
      throw invalidArgument(
        field,
        `flagfiles name flagfiles more than ${this.limits.maxDepth} deep (at ${quote(argument)})`,
      );
    }
    const file = this.resolve(argument.slice(1), field);
    this.bytesRead += file.digest.sizeBytes;
    if (this.bytesRead > this.limits.maxBytes) {
      throw invalidArgument(
        field,
        `the flagfiles of one request may hold ${this.limits.maxBytes} bytes; ${quote(argument)} goes past it`,
      );
    }
    let text: string;
    try {
      text = this.decoder.decode(await this.inputs.readFile(file.digest));
    } catch (err) {
      if (err instanceof TypeError) throw invalidArgument(field, `flagfile ${quote(argument)} is not UTF-8 text`);
      throw err;
    }
    const lines = text.split("\n").map((line) => (line.endsWith("\r") ? line.slice(0, -1) : line));
    // A last newline ends the last line; it does not start an empty argument.
    if (lines.at(-1) === "") lines.pop();
    const expanded: string[] = [];
    for (const line of lines) expanded.push(...(await this.expand(line, `${field} (${quote(argument)})`, depth + 1)));
    return expanded;
  }

  /** The input file `path` names, relative to the working directory, never outside the input root. */
  private resolve(path: string, field: string): InputFile {
    const inRoot = posix.normalize(posix.join(this.workingDirectory, path));
    if (posix.isAbsolute(path) || inRoot === ".." || inRoot.startsWith("../")) {
      throw invalidArgument(field, `flagfile ${quote(`@${path}`)} is outside the input root`);
    }
    const file = this.files.get(inRoot);
    if (!file) {
      throw invalidArgument(
        field,
        `flagfile ${quote(`@${path}`)} is not a file of the input root (${inRoot}); a worker's request is read from it`,
      );
    }
    return file;
  }
}

function quote(text: string): string {
  return JSON.stringify(text.length > 200 ? `${text.slice(0, 200)}…` : text);
}
