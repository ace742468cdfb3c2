import { randomUUID } from "node:crypto";
import {
  Action,
  Command,
  Compressor_Value,
  Directory,
  ExecuteOperationMetadata,
  ExecuteResponse,
  type ExecutionStage_Value,
} from "../../src/gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Operation } from "../../src/gen/google/longrunning/operations.js";
import { sha256, type WireDigest } from "./blobs.js";
import type { Clients } from "./farm.js";
import { collect, unaryCall } from "./rpc.js";
import { type DirNode, encodeTree } from "./trees.js";

type Property = { name: string; value: string };

/** An action to upload: its command, its input files and where outputs go. */
export interface ActionSpec {
  args: string[];
  env?: Record<string, string>;
  /** Input files by path, with their contents. */
  files?: Record<string, string | { content: string; executable: boolean }>;
  /** Input symlinks by path, with their targets (taken as they are, e.g. "/etc" or "../.."). */
  symlinks?: Record<string, string>;
  outputFiles?: string[];
  outputDirectories?: string[];
  outputPaths?: string[];
  workingDirectory?: string;
  timeoutSeconds?: number;
  doNotCache?: boolean;
  platform?: Property[];
  /** The platform as REAPI 2.0 clients send it, on the Command. */
  commandPlatform?: Property[];
  /** Makes otherwise identical actions distinct. */
  salt?: string;
  /** Input blobs to leave out of the upload, by path, to provoke MISSING. */
  skipUpload?: string[];
  /** The whole input root, written with trees.ts (directory modes and all), in place of files and symlinks. */
  inputRoot?: DirNode;
}

interface Blob {
  digest: WireDigest;
  data: Buffer;
}

/** Builds the Directory tree of `files`, returning the root digest and every blob of it. */
function inputTree(spec: ActionSpec): { root: WireDigest; blobs: Blob[]; skipped: Blob[] } {
  const blobs: Blob[] = [];
  const skipped: Blob[] = [];
  interface Node {
    files: Map<string, { blob: Blob; executable: boolean }>;
    symlinks: Map<string, string>;
    dirs: Map<string, Node>;
  }
  const top: Node = { files: new Map(), symlinks: new Map(), dirs: new Map() };
  /** The directory that holds `path`, made on the way, and the last component's name. */
  const place = (path: string): { node: Node; name: string } => {
    const parts = path.split("/");
    const name = parts.pop() as string;
    let node = top;
    for (const part of parts) {
      let next = node.dirs.get(part);
      if (!next) {
        next = { files: new Map(), symlinks: new Map(), dirs: new Map() };
        node.dirs.set(part, next);
      }
      node = next;
    }
    return { node, name };
  };
  for (const [path, target] of Object.entries(spec.symlinks ?? {})) {
    const { node, name } = place(path);
    node.symlinks.set(name, target);
  }
  for (const [path, value] of Object.entries(spec.files ?? {})) {
    const { content, executable } = typeof value === "string" ? { content: value, executable: false } : value;
    const { node, name } = place(path);
    const data = Buffer.from(content);
    const blob = { digest: sha256(data), data };
    (spec.skipUpload?.includes(path) ? skipped : blobs).push(blob);
    node.files.set(name, { blob, executable });
  }
  const sorted = <T>(m: Map<string, T>) => [...m.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  const encode = (node: Node): WireDigest => {
    const directory = Directory.fromPartial({
      files: sorted(node.files).map(([name, f]) => ({ name, digest: f.blob.digest, isExecutable: f.executable })),
      directories: sorted(node.dirs).map(([name, child]) => ({ name, digest: encode(child) })),
      symlinks: sorted(node.symlinks).map(([name, target]) => ({ name, target })),
    });
    const data = Buffer.from(Directory.encode(directory).finish());
    const digest = sha256(data);
    blobs.push({ digest, data });
    return digest;
  };
  return { root: encode(top), blobs, skipped };
}

export async function uploadBlobs(clients: Clients, blobs: Blob[]): Promise<void> {
  const response = await unaryCall(clients.cas.batchUpdateBlobs.bind(clients.cas), {
    instanceName: "",
    digestFunction: 0,
    requests: blobs.map((b) => ({ ...b, compressor: Compressor_Value.IDENTITY })),
  });
  if (response.responses.some((r) => r.status?.code !== 0)) throw new Error("upload failed");
}

/** Uploads the action, its command and inputs; returns the action digest. */
export async function uploadAction(clients: Clients, spec: ActionSpec): Promise<WireDigest> {
  const { root, blobs } = spec.inputRoot ? encodeTree(spec.inputRoot) : inputTree(spec);
  const command = Command.fromPartial({
    arguments: spec.args,
    environmentVariables: Object.entries(spec.env ?? { PATH: "/usr/bin:/bin" })
      .sort(([a], [b]) => (a < b ? -1 : 1))
      .map(([name, value]) => ({ name, value })),
    outputFiles: spec.outputFiles ?? [],
    outputDirectories: spec.outputDirectories ?? [],
    outputPaths: spec.outputPaths ?? [],
    workingDirectory: spec.workingDirectory ?? "",
    platform: spec.commandPlatform ? { properties: spec.commandPlatform } : undefined,
  });
  const commandData = Buffer.from(Command.encode(command).finish());
  const commandDigest = sha256(commandData);
  const action = Action.fromPartial({
    commandDigest,
    inputRootDigest: root,
    timeout: spec.timeoutSeconds === undefined ? undefined : { seconds: spec.timeoutSeconds, nanos: 0 },
    doNotCache: spec.doNotCache ?? false,
    salt: Buffer.from(spec.salt ?? ""),
    platform: spec.platform ? { properties: spec.platform } : undefined,
  });
  const actionData = Buffer.from(Action.encode(action).finish());
  const actionDigest = sha256(actionData);
  await uploadBlobs(clients, [
    ...blobs,
    { digest: commandDigest, data: commandData },
    { digest: actionDigest, data: actionData },
  ]);
  return actionDigest;
}

export interface DecodedOperation {
  name: string;
  done: boolean;
  stage: ExecutionStage_Value;
  response: ExecuteResponse | undefined;
}

export function decodeOperation(op: Operation): DecodedOperation {
  const metadata = op.metadata ? ExecuteOperationMetadata.decode(op.metadata.value) : undefined;
  return {
    name: op.name,
    done: op.done,
    stage: metadata?.stage ?? 0,
    response: op.response ? ExecuteResponse.decode(op.response.value) : undefined,
  };
}

export interface ExecuteOptions {
  skipCacheLookup?: boolean;
  priority?: number;
  inlineStdout?: boolean;
}

/** An ExecuteRequest for `actionDigest` on the default instance, with REAPI's defaults. */
export function executeRequest(actionDigest: WireDigest, options: ExecuteOptions = {}) {
  return {
    instanceName: "",
    skipCacheLookup: options.skipCacheLookup ?? false,
    actionDigest,
    executionPolicy: { priority: options.priority ?? 0 },
    resultsCachePolicy: undefined,
    digestFunction: 0,
    inlineStdout: options.inlineStdout ?? false,
    inlineStderr: false,
    inlineOutputFiles: [],
  };
}

/** Execute, following the stream to its end: every update, and the final response. */
export async function execute(clients: Clients, actionDigest: WireDigest, options: ExecuteOptions = {}) {
  const updates = (await collect(clients.execution.execute(executeRequest(actionDigest, options)))).map(
    decodeOperation,
  );
  const last = updates.at(-1);
  if (!last?.done || !last.response) throw new Error("the Execute stream ended without a completed operation");
  return { updates, response: last.response };
}

/** The contents of a blob, read back from the CAS. */
export async function readBlob(clients: Clients, digest: WireDigest | undefined): Promise<string> {
  if (!digest) return "";
  const response = await unaryCall(clients.cas.batchReadBlobs.bind(clients.cas), {
    instanceName: "",
    digests: [digest],
    acceptableCompressors: [],
    digestFunction: 0,
  });
  return response.responses[0]?.data.toString() ?? "";
}

/** Uploads one blob with a single ByteStream.Write request, as a client with a small blob does. */
export async function byteStreamUpload(clients: Clients, blob: { data: Buffer; digest: WireDigest }): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const call = clients.byteStream.write((err) => (err ? reject(err) : resolve()));
    call.write({
      resourceName: `uploads/${randomUUID()}/blobs/${blob.digest.hash}/${blob.digest.sizeBytes}`,
      writeOffset: 0,
      finishWrite: true,
      data: blob.data,
    });
    call.end();
  });
}
