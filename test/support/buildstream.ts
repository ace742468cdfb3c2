/**
 * A client that sends actions as BuildStream 2 does (read from its
 * sandbox/_sandboxreapi.py and _sandboxremote.py): the element's whole
 * sysroot is the input root, with /dev, /proc, /tmp, the working directory
 * and the read-write directories made in it; the command is `sh -c -e
 * SCRIPT`; `output_paths` are the read-write directories relative to the
 * working directory ("../../.." for the whole root when it is writable);
 * `output_directory_format` is DIRECTORY_ONLY; the platform (OSFamily, ISA,
 * unixUID, unixGID, network=on, sorted by name) goes on the Action and on the
 * Command; Execute asks for a cache lookup. Its outputs are read back as
 * BuildStream reads them: from `root_directory_digest`.
 */
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { posix } from "node:path";
import {
  Action,
  Command,
  Command_OutputDirectoryFormat,
  Compressor_Value,
  Directory,
  type ExecuteResponse,
} from "../../src/gen/build/bazel/remote/execution/v2/remote_execution.js";
import { decodeOperation } from "./actions.js";
import { sha256, type WireDigest } from "./blobs.js";
import type { Clients } from "./farm.js";
import { collect, unaryCall } from "./rpc.js";
import { type DirNode, dir, encodeTree, file, symlink, type TreeNode } from "./trees.js";

/** busybox-static's applets, each a symlink to /bin/busybox in the sysroot. */
const APPLETS = execFileSync("/bin/busybox", ["--list"])
  .toString()
  .split("\n")
  .filter((a) => a !== "" && a !== "busybox");

/** `node` at `path` (relative, "/"-separated) in `tree`, with the directories on the way made (a copy). */
export function put(tree: DirNode, path: string, node: TreeNode): DirNode {
  const [name, ...rest] = path.split("/").filter((c) => c !== "");
  if (name === undefined) throw new Error("put: empty path");
  if (rest.length === 0) return { ...tree, entries: { ...tree.entries, [name]: node } };
  const child = tree.entries[name];
  const below = child?.kind === "dir" ? child : dir();
  return { ...tree, entries: { ...tree.entries, [name]: put(below, rest.join("/"), node) } };
}

/** A busybox sysroot (/bin/busybox, a symlink per applet, /etc/passwd, /etc/group) with `extra` put in it. */
export function busyboxSysroot(extra: Record<string, TreeNode> = {}): DirNode {
  const bin: Record<string, TreeNode> = { busybox: file(readFileSync("/bin/busybox"), true) };
  for (const applet of APPLETS) bin[applet] = symlink("busybox");
  let tree = dir({
    bin: dir(bin),
    etc: dir({
      passwd: file("root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000:builder:/:/bin/sh\n"),
      group: file("root:x:0:\nbuilder:x:1000:\n"),
    }),
  });
  for (const [path, node] of Object.entries(extra)) tree = put(tree, path, node);
  return tree;
}

export interface BuildStreamSandboxConfig {
  /** build-os and build-arch, as BuildStream canonicalizes them ("linux", "x86-64"). */
  os: string;
  arch: string;
  /** build-uid and build-gid: sent as unixUID and unixGID when set. */
  uid?: number;
  gid?: number;
  /** SandboxFlags.NETWORK_ENABLED: network=on. */
  network?: boolean;
}

export interface BuildStreamRun {
  sysroot: DirNode;
  /** The batch script BuildStream generates, run as `sh -c -e SCRIPT`. */
  script: string;
  /** Absolute, e.g. /buildstream/project/element (the element's build directory). */
  cwd: string;
  env: Record<string, string>;
  /** The read-write directories (SandboxFlags.ROOT_READ_ONLY); absent: the whole root is writable. */
  readWrite?: string[];
  config: BuildStreamSandboxConfig;
  /** Properties beyond BuildStream's own (an attacker's additions). */
  extraProperties?: { name: string; value: string }[];
  /** Output paths of the client's choosing instead of the read-write directories (an attacker's). */
  outputPaths?: string[];
}

/** The sandbox's platform, as _create_platform builds it. */
export function buildstreamPlatform(run: BuildStreamRun): { name: string; value: string }[] {
  const properties: Record<string, string> = { OSFamily: run.config.os, ISA: run.config.arch };
  if (run.config.uid !== undefined) properties.unixUID = String(run.config.uid);
  if (run.config.gid !== undefined) properties.unixGID = String(run.config.gid);
  if (run.config.network) properties.network = "on";
  const sorted = Object.entries(properties).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return [...sorted.map(([name, value]) => ({ name, value })), ...(run.extraProperties ?? [])];
}

/** The input root, Command and Action BuildStream sends for `run`, with every blob to upload. */
export function buildstreamAction(run: BuildStreamRun) {
  let root = run.sysroot;
  const ensure = (path: string) => {
    const parts = path.split("/").filter((c) => c !== "");
    let node: TreeNode | undefined = root;
    for (const part of parts) {
      // A symlink on the way is the client's business: BuildStream's virtual directory follows it.
      if (node?.kind === "symlink") return;
      node = node?.kind === "dir" ? node.entries[part] : undefined;
    }
    if (node === undefined) root = put(root, path, dir());
  };
  ensure(run.cwd);
  for (const mountPoint of ["dev", "proc", "tmp"]) ensure(mountPoint);
  for (const directory of run.readWrite ?? []) ensure(directory);
  const tree = encodeTree(root);
  const platform = { properties: buildstreamPlatform(run) };
  const command = Command.fromPartial({
    arguments: ["sh", "-c", "-e", run.script],
    workingDirectory: run.cwd.slice(1),
    environmentVariables: Object.entries(run.env).map(([name, value]) => ({ name, value })),
    outputPaths: run.outputPaths ?? (run.readWrite ?? ["/"]).map((d) => posix.relative(run.cwd, d) || "."),
    outputDirectoryFormat: Command_OutputDirectoryFormat.DIRECTORY_ONLY,
    platform,
  });
  const commandData = Buffer.from(Command.encode(command).finish());
  const commandDigest = sha256(commandData);
  const action = Action.fromPartial({ commandDigest, inputRootDigest: tree.root, platform });
  const actionData = Buffer.from(Action.encode(action).finish());
  const actionDigest = sha256(actionData);
  return {
    command,
    actionDigest,
    blobs: [...tree.blobs, { digest: commandDigest, data: commandData }, { digest: actionDigest, data: actionData }],
  };
}

/** Uploads what the CAS of `instanceName` lacks, in batches under the default batch limit. */
async function upload(clients: Clients, instanceName: string, blobs: { digest: WireDigest; data: Buffer }[]) {
  const { missingBlobDigests } = await unaryCall(clients.cas.findMissingBlobs.bind(clients.cas), {
    instanceName,
    blobDigests: blobs.map((b) => b.digest),
    digestFunction: 0,
  });
  const missing = new Set(missingBlobDigests.map((d) => d.hash));
  let batch: typeof blobs = [];
  let bytes = 0;
  const flush = async () => {
    if (batch.length === 0) return;
    const response = await unaryCall(clients.cas.batchUpdateBlobs.bind(clients.cas), {
      instanceName,
      digestFunction: 0,
      requests: batch.map((b) => ({ ...b, compressor: Compressor_Value.IDENTITY })),
    });
    if (response.responses.some((r) => r.status?.code !== 0)) throw new Error("upload failed");
    batch = [];
    bytes = 0;
  };
  for (const blob of blobs.filter((b) => missing.has(b.digest.hash))) {
    if (bytes + blob.data.length > 3 * 1024 * 1024) await flush();
    batch.push(blob);
    bytes += blob.data.length;
  }
  await flush();
}

/** Uploads and executes `run` on `instanceName` as BuildStream's remote sandbox does; the final response. */
export async function executeAsBuildStream(
  clients: Clients,
  instanceName: string,
  run: BuildStreamRun,
): Promise<ExecuteResponse> {
  const { actionDigest, blobs } = buildstreamAction(run);
  await upload(clients, instanceName, blobs);
  const stream = clients.execution.execute({
    instanceName,
    actionDigest,
    skipCacheLookup: false,
    executionPolicy: undefined,
    resultsCachePolicy: undefined,
    digestFunction: 0,
    inlineStdout: false,
    inlineStderr: false,
    inlineOutputFiles: [],
  });
  const last = (await collect(stream)).map(decodeOperation).at(-1);
  if (!last?.done || !last.response) throw new Error("the Execute stream ended without a completed operation");
  return last.response;
}

/** An entry of an output directory: a file's contents, a symlink's target, or a directory. */
export type OutputEntry = { file: string; executable: boolean } | { symlink: string } | { directory: true };

/**
 * The output directory whose Directory is `rootDigest` (as BuildStream
 * fetches it: GetTree from root_directory_digest), flattened to paths.
 */
export async function readOutputDirectory(
  clients: Clients,
  instanceName: string,
  rootDigest: WireDigest | undefined,
): Promise<Map<string, OutputEntry>> {
  if (!rootDigest) throw new Error("the output directory has no root_directory_digest");
  const pages = await collect(
    clients.cas.getTree({ instanceName, rootDigest, pageSize: 0, pageToken: "", digestFunction: 0 }),
  );
  const directories = new Map<string, Directory>();
  for (const directory of pages.flatMap((p) => p.directories)) {
    directories.set(sha256(Directory.encode(directory).finish()).hash, directory);
  }
  const files: { path: string; digest: WireDigest; executable: boolean }[] = [];
  const entries = new Map<string, OutputEntry>();
  const walk = (hash: string, prefix: string) => {
    const directory = directories.get(hash);
    if (!directory) throw new Error(`GetTree lacks the directory ${prefix || "."}`);
    for (const f of directory.files) {
      files.push({ path: prefix + f.name, digest: f.digest as WireDigest, executable: f.isExecutable });
    }
    for (const s of directory.symlinks) entries.set(prefix + s.name, { symlink: s.target });
    for (const d of directory.directories) {
      entries.set(prefix + d.name, { directory: true });
      walk(d.digest?.hash ?? "", `${prefix}${d.name}/`);
    }
  };
  walk(rootDigest.hash, "");
  const small = files.filter((f) => f.digest.sizeBytes < 1024 * 1024);
  const { responses } = await unaryCall(clients.cas.batchReadBlobs.bind(clients.cas), {
    instanceName,
    digests: small.map((f) => f.digest),
    acceptableCompressors: [],
    digestFunction: 0,
  });
  const contents = new Map(responses.map((r) => [r.digest?.hash ?? "", r.data.toString()]));
  for (const f of files) {
    entries.set(f.path, {
      file: contents.get(f.digest.hash) ?? `<${f.digest.sizeBytes} bytes>`,
      executable: f.executable,
    });
  }
  return entries;
}
