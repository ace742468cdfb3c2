import { lstat, readFile } from "node:fs/promises";
import { homedir } from "node:os";
import { isAbsolute, join, resolve } from "node:path";
import { parse as parseYaml } from "yaml";
import { z } from "zod";
import { parseHostPattern } from "../asset/host-pattern.js";
import { checkPrivateFile, PrivateFileError } from "../auth/private-file.js";
import { DEFAULT_MAX_ACTION_BYTES, DEFAULT_MAX_COMMAND_BYTES } from "../cas/message-size.js";
import { DEFAULT_INPUT_TREE_LIMITS } from "../cas/tree-limits.js";
import { DEFAULT_CHECKED_DIRECTORY_BYTES } from "../execution/checked-directories.js";
import { DEFAULT_IMAGE_LIMITS } from "../image/image-limits.js";
import { DEFAULT_FLAGFILE_LIMITS } from "../persistent/persistent-action.js";
import { DEFAULT_WORKER_POOL_LIMITS } from "../persistent/worker-pool.js";

const UNITS: Record<string, number> = {
  "": 1,
  b: 1,
  kib: 1024,
  mib: 1024 ** 2,
  gib: 1024 ** 3,
  tib: 1024 ** 4,
  kb: 1e3,
  mb: 1e6,
  gb: 1e9,
  tb: 1e12,
};

/** A byte count: a number, or a string such as "512MiB" or "10 GB". */
const bytes = z.union([z.number().int().nonnegative(), z.string()]).transform((value, ctx) => {
  if (typeof value === "number") return value;
  const match = /^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$/.exec(value);
  const factor = match ? UNITS[(match[2] ?? "").toLowerCase()] : undefined;
  if (!match || factor === undefined) {
    ctx.addIssue({ code: "custom", message: `"${value}" is not a size; write e.g. 1048576, "512MiB" or "10GiB"` });
    return z.NEVER;
  }
  return Math.floor(Number(match[1]) * factor);
});

/** An entry of asset.fetch.allowedHosts (see asset/host-pattern.ts). */
const allowedHostPattern = z.string().superRefine((value, ctx) => {
  try {
    parseHostPattern(value);
  } catch (err) {
    ctx.addIssue({ code: "custom", message: (err as Error).message });
  }
});

const hostPort = z.string().regex(/^(\[[0-9a-fA-F:]+\]|[^\s:]+):[0-9]{1,5}$/, "must be HOST:PORT, e.g. 127.0.0.1:8980");

export const ConfigSchema = z
  .object({
    /** gRPC address the farm listens on. */
    listen: hostPort.default("127.0.0.1:8980"),
    /** Everything Berth writes goes below this directory. */
    dataDir: z.string().default(join(homedir(), ".cache", "berth")),
    logLevel: z.enum(["trace", "debug", "info", "warn", "error", "silent"]).default("info"),
    /** Instance names served; empty means any name is accepted. */
    instanceNames: z.array(z.string()).default([]),
    cas: z
      .object({
        /** Blobs past this total are evicted, least recently used first. */
        maxSizeBytes: bytes.default(10 * 1024 ** 3),
        /** Limit on the data of one BatchUpdateBlobs or BatchReadBlobs request. */
        maxBatchTotalSizeBytes: bytes.default(4 * 1024 ** 2 - 64 * 1024),
        /** Interrupted ByteStream uploads are kept this long for QueryWriteStatus and resumption. */
        uploadIdleTimeoutSeconds: z.number().positive().default(600),
        /** Whether action results may hold symlinks with absolute targets. */
        allowAbsoluteSymlinks: z.boolean().default(true),
        /** Small blobs (Actions, Commands, Directories, small outputs) recently used, kept in memory too; 0: none. */
        memoryCacheSizeBytes: bytes.default(64 * 1024 ** 2),
      })
      .strict()
      .prefault({}),
    actionCache: z
      .object({
        maxSizeBytes: bytes.default(1024 ** 3),
        /** Results recently read or stored, kept in memory too (encoded); 0: none. */
        memoryCacheSizeBytes: bytes.default(16 * 1024 ** 2),
        /** Total bytes of stdout, stderr and files returned inline with one result. */
        maxInlineBytes: bytes.default(1024 ** 2),
      })
      .strict()
      .prefault({}),
    execution: z
      .object({
        /** Timeout of actions that set none. */
        defaultTimeoutSeconds: z.number().positive().default(900),
        /** Actions asking for a longer timeout are refused. */
        maxTimeoutSeconds: z
          .number()
          .positive()
          .default(3 * 3600),
        /** How often workers must report; one silent for leaseTimeoutSeconds loses its actions. */
        heartbeatIntervalSeconds: z.number().positive().default(5),
        leaseTimeoutSeconds: z.number().positive().default(30),
        /** Starts of one action on workers that vanished before it fails. */
        maxAttempts: z.number().int().positive().default(3),
        /** An action asking for a warm runner (recycle-runner) waits this long for a busy worker holding one. */
        warmRunnerWaitSeconds: z.number().nonnegative().default(1),
        /** How long WaitExecution and GetOperation still find a completed operation. */
        retainCompletedSeconds: z.number().nonnegative().default(600),
        /** An operation no Execute or WaitExecution stream has followed for this long is dropped (its action cancelled). */
        unwatchedOperationTimeoutSeconds: z.number().positive().default(60),
        /** Input trees past these are refused at Execute, before anything is queued or laid out. */
        inputLimits: z
          .object({
            /** Files, directories and symlinks of the expanded tree. */
            maxEntries: z.number().int().positive().default(DEFAULT_INPUT_TREE_LIMITS.maxEntries),
            /** Directory levels below the input root. */
            maxDepth: z.number().int().positive().default(DEFAULT_INPUT_TREE_LIMITS.maxDepth),
            /** Sizes of the expanded tree's files summed. */
            maxTotalBytes: bytes.default(DEFAULT_INPUT_TREE_LIMITS.maxTotalBytes),
            /** Distinct Directory messages. */
            maxDirectoryBlobs: z.number().int().positive().default(DEFAULT_INPUT_TREE_LIMITS.maxDirectoryBlobs),
            /** Bytes of one Directory message; a larger one is refused before it is read (server and workers). */
            maxDirectoryBytes: bytes.default(DEFAULT_INPUT_TREE_LIMITS.maxDirectoryBytes),
            /** Bytes of the tree's distinct Directory messages summed; refused before they are read. */
            maxTotalDirectoryBytes: bytes.default(DEFAULT_INPUT_TREE_LIMITS.maxTotalDirectoryBytes),
          })
          .strict()
          .prefault({}),
        /** false: actions asking for a network (network=external|on, dockerNetwork=standard|bridge|host) are refused. */
        allowNetwork: z.boolean().default(true),
        /**
         * Instance names whose actions run with their input root as "/" (as in a chroot: BuildStream 2,
         * buildbox-run, recc), not on the worker's root with the input root at /run/berth/execroot.
         */
        inputRootAsRoot: z.array(z.string()).default([]),
        /** Estimated heap bytes of input-tree checks remembered across Executes (0: none). */
        checkedDirectoryCacheBytes: bytes.default(DEFAULT_CHECKED_DIRECTORY_BYTES),
        /** Bytes of an Action blob; a larger one is refused before it is read. */
        maxActionBytes: bytes.default(DEFAULT_MAX_ACTION_BYTES),
        /** Bytes of a Command blob; a larger one is refused before it is read. */
        maxCommandBytes: bytes.default(DEFAULT_MAX_COMMAND_BYTES),
      })
      .strict()
      .prefault({}),
    worker: z
      .object({
        /** A worker's copies of input files past this total are deleted, least recently used first. */
        fileCacheMaxSizeBytes: bytes.default(10 * 1024 ** 3),
        /** A worker's materialized roots of expanded images past this total are deleted, least recently used first. */
        expandedRootsMaxSizeBytes: bytes.default(20 * 1024 ** 3),
        /**
         * Executor slot n runs its actions as host uid and gid sandboxUidBase + n (no /etc/passwd entry needed):
         * a range no local user or service uses, so one slot's processes are neither counted against, nor
         * signalled by, another's. Two workers on one host need ranges that do not overlap.
         */
        sandboxUidBase: z
          .number()
          .int()
          .min(1000)
          .max(2 ** 32 - 2 ** 16)
          .default(2_000_000_000),
        /** Runs actions with network=external in a namespace of their own (never reaching the host's loopback). */
        slirp4netnsPath: z.string().min(1).default("slirp4netns"),
        /** Bounds of each action; 0 means unbounded. */
        limits: z
          .object({
            /** Processes and threads of one action (a cgroup's pids.max, and RLIMIT_NPROC of the slot's uid). */
            maxProcesses: z.number().int().nonnegative().default(4096),
            /** Memory of one action, page cache and tmpfs included (a cgroup; RLIMIT_AS where there is none). */
            maxMemoryBytes: bytes.default(8 * 1024 ** 3),
            /** Size of the action's private /tmp (a tmpfs; its pages count as the action's memory). */
            tmpSizeBytes: bytes.default(1024 ** 3),
            /** Size of the action's private /dev/shm (a tmpfs). */
            shmSizeBytes: bytes.default(64 * 1024 ** 2),
            /** Largest file the action may write (RLIMIT_FSIZE), in its input root and elsewhere. */
            maxFileSizeBytes: bytes.default(16 * 1024 ** 3),
            /** Open file descriptors per process (RLIMIT_NOFILE). */
            maxOpenFiles: z.number().int().nonnegative().default(65536),
            /**
             * Bytes the action keeps on disk: its own files in its input root and its image's upper layer,
             * sampled from 1 s of run time on (an action past it is killed); shorter actions are bounded by
             * maxFileSizeBytes per file only.
             */
            diskBytes: bytes.default(64 * 1024 ** 3),
            /** Files, directories and other entries the action keeps on disk, counted with diskBytes. */
            diskEntries: z.number().int().nonnegative().default(4_000_000),
          })
          .strict()
          .prefault({}),
        /** MicroVMs (workload-isolation-type=firecracker/microvm), run by QEMU. */
        vm: z
          .object({
            /** The guest (kernel, initramfs) scripts/guest-assets.sh builds; default <dataDir>/vm. Absent guest: no VMs. */
            dir: z.string().min(1).optional(),
            /** The QEMU binary; a worker where it does not start offers no VMs. */
            qemuPath: z.string().min(1).default("qemu-system-x86_64"),
            /** auto: KVM when a real guest boots under the host's /dev/kvm (probed once at start), TCG otherwise. */
            accelerator: z.enum(["auto", "kvm", "tcg"]).default("auto"),
            /** Memory and vCPUs of a VM, and the size of its scratch disk (its writes), when the action estimates none. */
            memoryBytes: bytes.default(512 * 1024 ** 2),
            vcpus: z.number().int().min(1).max(64).default(1),
            scratchDiskBytes: bytes.default(4 * 1024 ** 3),
            /** The most an action's EstimatedMemory, EstimatedCPU and EstimatedFreeDiskBytes get. */
            maxMemoryBytes: bytes.default(4 * 1024 ** 3),
            maxVcpus: z.number().int().min(1).max(64).default(2),
            maxScratchDiskBytes: bytes.default(32 * 1024 ** 3),
            /** Root disks made from images (one per image), least recently used removed past this. */
            rootDisksMaxSizeBytes: bytes.default(16 * 1024 ** 3),
            /** Resume VMs from a snapshot of a booted VM of the same image and size, made at the first one's start. */
            snapshots: z.boolean().default(true),
            /** Snapshots (a VM's memory and scratch disk each), least recently used removed past this. */
            snapshotsMaxSizeBytes: bytes.default(8 * 1024 ** 3),
            /** A VM whose agent has not answered by then (cold boot or resume) fails. */
            bootTimeoutSeconds: z.number().positive().default(60),
            /** Docker daemons started in VMs (init-dockerd=true). */
            dockerd: z
              .object({
                /** A daemon that does not answer by then fails its action (DEADLINE_EXCEEDED). */
                startTimeoutSeconds: z.number().positive().default(120),
                /** Mirrors the daemon pulls through (its registry-mirrors); each is reachable from the VM. */
                registryMirrors: z.array(z.string().min(1)).default([]),
              })
              .strict()
              .prefault({}),
          })
          .strict()
          .prefault({}),
        /** Bazel's remote persistent workers (platform property persistentWorkerKey), kept between actions. */
        /**
         * Each slot keeps a sandbox started for its next action (the shape of its last), used once: an
         * action's latency without the sandbox's start, at the cost of more CPU per action (a resident
         * sandbox's agent), which a busy worker may not have to spare.
         */
        sandboxesAhead: z.boolean().default(false),
        /** Runners kept between actions that ask for it (recycle-runner), with what they left running. */
        warmRunners: z
          .object({
            /** Idle warm runners a worker process keeps; past it the least recently used one is stopped. */
            maxRunners: z.number().int().nonnegative().default(4),
            /** Memory the processes of idle warm runners may hold together; past it they are stopped, oldest first. */
            maxMemoryBytes: bytes.default(4 * 1024 ** 3),
            /** Disk their workspaces and writable layers may hold together; past it they are stopped, oldest first. */
            maxDiskBytes: bytes.default(16 * 1024 ** 3),
            /** A warm runner unused this long is stopped. */
            idleSeconds: z.number().positive().default(600),
          })
          .strict()
          .prefault({}),
        persistentWorkers: z
          .object({
            /** Worker processes of one key (tool, arguments, environment); each answers one request at a time. */
            maxProcessesPerKey: z.number().int().positive().default(DEFAULT_WORKER_POOL_LIMITS.maxProcessesPerKey),
            /** Worker processes of all keys; past it the least recently used idle one is stopped. */
            maxProcesses: z.number().int().positive().default(DEFAULT_WORKER_POOL_LIMITS.maxProcesses),
            /** An idle worker process is stopped after this long. */
            idleSeconds: z
              .number()
              .positive()
              .default(DEFAULT_WORKER_POOL_LIMITS.idleTimeoutMs / 1000),
            /** A larger WorkResponse (json line or proto message) kills its process. */
            maxResponseBytes: bytes.default(DEFAULT_WORKER_POOL_LIMITS.maxResponseBytes),
            /** Bytes of @flagfiles read into one request (a flagfile named twice counts twice). */
            maxFlagfileBytes: bytes.default(DEFAULT_FLAGFILE_LIMITS.maxBytes),
          })
          .strict()
          .prefault({}),
      })
      .strict()
      .prefault({}),
    /** TLS on the gRPC port; without this section the port speaks plain HTTP/2 (keep it on loopback then). */
    tls: z
      .object({
        /** PEM certificate chain and private key of the server. */
        certFile: z.string().min(1),
        keyFile: z.string().min(1),
        /** PEM roots that client certificates are verified against (mTLS). */
        clientCaFile: z.string().min(1).optional(),
        /** true: a client without a certificate from clientCaFile cannot connect at all. */
        requireClientCert: z.boolean().default(false),
      })
      .strict()
      .refine((tls) => !tls.requireClientCert || tls.clientCaFile !== undefined, {
        message: "requireClientCert needs clientCaFile (the roots client certificates are checked against)",
        path: ["clientCaFile"],
      })
      .optional(),
    auth: z
      .object({
        /** YAML/JSON file of client tokens (by SHA-256) and the instance names each may use; unset: no token needed. */
        tokensFile: z.string().min(1).optional(),
        /** Files each holding one more worker token (for `berth worker --token-file` on other hosts). */
        workerTokenFiles: z.array(z.string().min(1)).default([]),
        /** Common names of client certificates (from tls.clientCaFile) that make their holder a worker without a token. */
        workerCertificateNames: z.array(z.string().min(1)).default([]),
      })
      .strict()
      .prefault({}),
    images: z
      .object({
        /**
         * Registries and repositories actions may name: "127.0.0.1:5000" (a registry), "docker.io/library/debian"
         * (a repository) or "ghcr.io/team/*" (every repository below a path). Empty: any image may be used.
         */
        allowed: z.array(z.string().min(1)).default([]),
        /** allow: tags are used as they are; resolve: a tag is pinned to its digest when the action is queued; reject: only digest references. */
        tagPolicy: z.enum(["allow", "resolve", "reject"]).default("allow"),
        /** Registries reached over plain HTTP (loopback ones always may be). */
        insecureRegistries: z.array(z.string()).default([]),
        /** Credentials per registry host, e.g. { "registry.example:5000": { username, password } }. */
        credentials: z
          .record(z.string(), z.object({ username: z.string(), password: z.string() }).strict())
          .default({}),
        /** A Docker config.json whose `auths` are used for registries not configured above. */
        dockerConfig: z.string().optional(),
        /** How long a worker trusts what a tag resolved to before asking the registry again. */
        tagRefreshSeconds: z.number().nonnegative().default(300),
        /** A pull taking longer fails the actions waiting for it. */
        pullTimeoutSeconds: z.number().positive().default(600),
        /** Unpacked layers past this total are evicted (least recently used, none in use). */
        storeMaxSizeBytes: bytes.default(20 * 1024 ** 3),
        /** Bytes of files one layer may hold, counted while it is unpacked or expanded; past it the image is refused. */
        maxLayerBytes: bytes.default(DEFAULT_IMAGE_LIMITS.maxLayerBytes),
        /** Tar entries (files, directories, links…) one layer may hold. */
        maxLayerEntries: z.number().int().positive().default(DEFAULT_IMAGE_LIMITS.maxLayerEntries),
        /** Bytes of files of all an image's layers (also at most storeMaxSizeBytes in mount mode, cas.maxSizeBytes in expand mode). */
        maxImageBytes: bytes.default(DEFAULT_IMAGE_LIMITS.maxImageBytes),
        /** Tar entries of all an image's layers. */
        maxImageEntries: z.number().int().positive().default(DEFAULT_IMAGE_LIMITS.maxImageEntries),
        /**
         * How actions run in their image: mount (workers pull it and run on an overlay of its layers) or expand
         * (the server turns it into a CAS tree, merges the input root in, and workers need no registry). An
         * action may choose with the platform property berth-image-mode.
         */
        mode: z.enum(["mount", "expand"]).default("mount"),
        /** Where the input root appears inside an image; a path images do not use. */
        inputRootPath: z
          .string()
          .regex(/^\/[^\0]*[^/]$/, "must be an absolute path such as /run/berth/execroot")
          .default("/run/berth/execroot"),
      })
      .strict()
      .prefault({}),
    /** The Remote Asset API (Fetch, Push) on the gRPC port. */
    asset: z
      .object({
        fetch: z
          .object({
            /**
             * Hosts FetchBlob may download from: "host" (its scheme's default port only), "host:port", "host:*"
             * (any port), "*.example.com[:port]" (every name below it), "[::1]:8080". Empty: the farm
             * downloads nothing and answers only what was pushed or fetched before.
             */
            allowedHosts: z.array(allowedHostPattern).default([]),
            /** Plain http:// to allowed hosts that are not loopback (https and loopback http always may be used). */
            allowHttp: z.boolean().default(false),
            /** Names (not IP literals) of allowed hosts may resolve to private, link-local and CGNAT addresses. */
            allowPrivateAddresses: z.boolean().default(false),
            /** A download past this size is abandoned. */
            maxBlobBytes: bytes.default(1024 ** 3),
            /** Downloads at once; more wait (within their timeout) for one to finish. */
            maxConcurrentDownloads: z.number().int().positive().default(16),
            /** Timeout of a download whose request sets none. */
            defaultTimeoutSeconds: z.number().positive().default(300),
            /** Longer timeouts asked for are cut to this. */
            maxTimeoutSeconds: z.number().positive().default(3600),
          })
          .strict()
          .prefault({}),
      })
      .strict()
      .prefault({}),
  })
  .strict()
  .refine((config) => config.auth.workerCertificateNames.length === 0 || config.tls?.requireClientCert === true, {
    message:
      "workers can be known by their certificate only when tls.requireClientCert is true (with tls.clientCaFile)",
    path: ["auth", "workerCertificateNames"],
  })
  .superRefine((config, ctx) => {
    const served = config.instanceNames;
    const unserved = config.execution.inputRootAsRoot.filter((name) => served.length > 0 && !served.includes(name));
    if (unserved.length > 0) {
      ctx.addIssue({
        code: "custom",
        message: `${unserved.map((n) => JSON.stringify(n)).join(", ")} not in instanceNames, which the farm serves alone`,
        path: ["execution", "inputRootAsRoot"],
      });
    }
  });

export type Config = z.infer<typeof ConfigSchema>;

/** Command-line values that take precedence over the file. */
export interface ConfigOverrides {
  listen?: string;
  dataDir?: string;
}

export class ConfigError extends Error {}

/** Reads and validates the configuration; errors name the offending key. */
export async function loadConfig(file: string | undefined, overrides: ConfigOverrides = {}): Promise<Config> {
  let raw: unknown = {};
  if (file !== undefined) {
    let text: string;
    try {
      text = await readFile(file, "utf8");
    } catch (err) {
      throw new ConfigError(`cannot read config file ${file}: ${(err as Error).message}`);
    }
    try {
      raw = parseYaml(text) ?? {};
    } catch (err) {
      throw new ConfigError(`config file ${file} is not valid YAML or JSON: ${(err as Error).message}`);
    }
  }
  const merged = { ...(raw as object), ...definedOnly(overrides) };
  const config = parseConfig(merged, file ?? "the command line");
  await refuseExposedSecrets(config, file);
  return config;
}

/**
 * A configuration holding registry passwords, and the Docker config it names, must be private like every
 * other secret (see auth/private-file.ts): on the host root, actions read whatever their uid may.
 */
async function refuseExposedSecrets(config: Config, file: string | undefined): Promise<void> {
  try {
    if (file !== undefined && Object.keys(config.images.credentials).length > 0) {
      await checkPrivateFile(file, "the config file (it holds images.credentials)");
    }
    const dockerConfig = config.images.dockerConfig;
    if (dockerConfig !== undefined && (await exists(dockerConfig))) {
      await checkPrivateFile(dockerConfig, "images.dockerConfig");
    }
  } catch (err) {
    if (err instanceof PrivateFileError) throw new ConfigError(err.message);
    throw err;
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await lstat(path);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return false;
    throw err;
  }
}

export function parseConfig(raw: unknown, source = "configuration"): Config {
  const result = ConfigSchema.safeParse(raw);
  if (!result.success) {
    const lines = result.error.issues.map((issue) => {
      const key = issue.path.join(".") || "(top level)";
      return `  ${key}: ${issue.message}`;
    });
    throw new ConfigError(`invalid configuration in ${source}:\n${lines.join("\n")}`);
  }
  const config = result.data;
  config.dataDir = expandHome(config.dataDir);
  if (config.worker.vm.dir !== undefined) config.worker.vm.dir = expandHome(config.worker.vm.dir);
  return config;
}

function expandHome(path: string): string {
  if (path === "~" || path.startsWith("~/")) return join(homedir(), path.slice(1));
  return isAbsolute(path) ? path : resolve(path);
}

function definedOnly(values: ConfigOverrides): Record<string, string> {
  return Object.fromEntries(Object.entries(values).filter(([, v]) => v !== undefined));
}
