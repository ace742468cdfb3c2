import { type ImageReference, ImageReferenceError, isNoImage, parseImageReference } from "../image/reference.js";
import { invalidArgument } from "../status/status.js";
import type { Property } from "./property.js";
import { RESOURCE_ESTIMATE_PROPERTIES, type ResourceEstimates, readResourceEstimates } from "./resource-estimates.js";
import { RECYCLING_PROPERTIES, type Recycling, readRecycling } from "./runner-recycling.js";
import {
  MICRO_VM_CAPABILITY,
  readWorkloadIsolation,
  WORKLOAD_ISOLATION_TYPE,
  type WorkloadIsolation,
} from "./workload-isolation.js";

/** The property naming the image an action runs in (Bazel's, Buildbarn's and BuildBuddy's name). */
export const CONTAINER_IMAGE = "container-image";
export const REGISTRY_USERNAME = "container-registry-username";
export const REGISTRY_PASSWORD = "container-registry-password";
const DOCKER_NETWORK = "dockerNetwork";
const NETWORK = "network";
const DOCKER_RUN_AS_ROOT = "dockerRunAsRoot";
/** The ids the action has inside its user namespace (BuildStream's, buildbox-run's and Buildbarn's names). */
const UNIX_UID = "unixUID";
const UNIX_GID = "unixGID";
/** The largest id accepted: bwrap and the kernel's id maps take them as signed 32-bit numbers. */
const MAX_ID = 2 ** 31 - 1;
/** BuildBuddy's: a Docker daemon is started in the action's microVM before its command (and on TCP 2375). */
export const INIT_DOCKERD = "init-dockerd";
export const ENABLE_DOCKERD_TCP = "enable-dockerd-tcp";
/** Berth's own: how this action's image is honoured, overriding the farm's images.mode. */
export const IMAGE_MODE = "berth-image-mode";

export type ImageMode = "mount" | "expand";

/**
 * What workers that run images offer. An image is not a worker property that
 * must match: any such worker pulls any image, so the image only asks for
 * this capability.
 */
export const IMAGE_CAPABILITY: Property = { name: "berth:container-images", value: "true" };

/**
 * What workers that run images the farm expanded into the CAS offer: they
 * need no registry, only to mount the image's tree as an overlay.
 */
export const EXPANDED_IMAGE_CAPABILITY: Property = { name: "berth:expanded-images", value: "true" };

export interface RegistryCredentials {
  username: string;
  password: string;
}

/** An action's platform, read: what Berth itself interprets, and what a worker must offer. */
export interface ActionPlatform {
  /** Properties a worker must offer exactly (the image capability included when an image is asked for). */
  required: Property[];
  image: ImageReference | undefined;
  /** From the action's own properties; never logged or stored by Berth. */
  credentials: RegistryCredentials | undefined;
  network: boolean;
  /** The property that asks for the network (network=external|on, dockerNetwork=standard|bridge|host), if one does. */
  networkProperty: Property | undefined;
  runAsRoot: boolean;
  /** unixUID and unixGID: the ids the action asks to have inside its sandbox; never the host's. */
  unixUid: number | undefined;
  unixGid: number | undefined;
  /** The action's own choice of image mode, when it makes one. */
  imageMode: ImageMode | undefined;
  /** workload-isolation-type: the runner the action asks for (a namespace sandbox, or a microVM). */
  isolation: WorkloadIsolation;
  /** EstimatedCPU, EstimatedMemory, EstimatedFreeDiskBytes: what sizes a microVM. */
  estimates: ResourceEstimates;
  /** recycle-runner (or dockerReuse): the action asks for a warm runner, and how its workspace is treated. */
  recycling: Recycling | undefined;
  /** Bazel's persistentWorkerKey: the action may be sent to a persistent worker process (see src/persistent). */
  persistentWorkerKey: string | undefined;
  /** init-dockerd=true: a Docker daemon in the action's VM; `tcp` from enable-dockerd-tcp. */
  dockerd: { tcp: boolean } | undefined;
}

/**
 * Bazel's remote persistent-worker properties (--experimental_remote_mark_tool_inputs). Interpreted, not
 * matched: an executor without persistent workers runs such an action as the one-shot command it also is.
 */
const PERSISTENT_WORKER_PROPERTIES = ["persistentWorkerKey", "persistentWorkerProtocol"];

const INTERPRETED = new Set([
  CONTAINER_IMAGE,
  REGISTRY_USERNAME,
  REGISTRY_PASSWORD,
  DOCKER_NETWORK,
  NETWORK,
  DOCKER_RUN_AS_ROOT,
  IMAGE_MODE,
  UNIX_UID,
  UNIX_GID,
  WORKLOAD_ISOLATION_TYPE,
  INIT_DOCKERD,
  ENABLE_DOCKERD_TCP,
  ...RESOURCE_ESTIMATE_PROPERTIES,
  ...RECYCLING_PROPERTIES,
  ...PERSISTENT_WORKER_PROPERTIES,
]);

/**
 * Reads the properties Berth interprets and leaves the rest for matching.
 * Bad values are INVALID_ARGUMENT naming the property.
 */
export function readActionPlatform(properties: readonly Property[]): ActionPlatform {
  const byName = new Map<string, string[]>();
  for (const p of properties) byName.set(p.name, [...(byName.get(p.name) ?? []), p.value]);
  const single = (name: string): string | undefined => {
    const values = byName.get(name);
    if (values && values.length > 1) {
      throw invalidArgument(`platform property ${name}`, `is given ${values.length} times; give it once`);
    }
    return values?.[0];
  };

  const imageValue = single(CONTAINER_IMAGE);
  let image: ImageReference | undefined;
  if (imageValue !== undefined && !isNoImage(imageValue)) {
    try {
      image = parseImageReference(imageValue.trim());
    } catch (err) {
      if (err instanceof ImageReferenceError)
        throw invalidArgument(`platform property ${CONTAINER_IMAGE}`, err.message);
      throw err;
    }
  }

  const username = single(REGISTRY_USERNAME);
  const password = single(REGISTRY_PASSWORD);
  if ((username === undefined) !== (password === undefined)) {
    throw invalidArgument(
      `platform property ${username === undefined ? REGISTRY_USERNAME : REGISTRY_PASSWORD}`,
      `is missing: ${REGISTRY_USERNAME} and ${REGISTRY_PASSWORD} go together`,
    );
  }

  // "bridge" and "host" are other farms' names (BuildBuddy's, Docker's) for a network of the action's own.
  const dockerNetwork = oneOf(DOCKER_NETWORK, single(DOCKER_NETWORK), ["off", "none", "standard", "bridge", "host"]);
  // "on" is BuildStream's (and buildbox-run's) request for a network.
  const network = oneOf(NETWORK, single(NETWORK), ["off", "none", "external", "on"]);
  const networkProperty =
    network === "external" || network === "on"
      ? { name: NETWORK, value: network }
      : dockerNetwork === "standard" || dockerNetwork === "bridge" || dockerNetwork === "host"
        ? { name: DOCKER_NETWORK, value: dockerNetwork }
        : undefined;
  const runAsRoot = oneOf(DOCKER_RUN_AS_ROOT, single(DOCKER_RUN_AS_ROOT), ["true", "false"]);
  const imageMode = oneOf(IMAGE_MODE, single(IMAGE_MODE), ["mount", "expand"]) as ImageMode | undefined;
  const unixUid = unixId(UNIX_UID, single(UNIX_UID));
  const unixGid = unixId(UNIX_GID, single(UNIX_GID));
  if (runAsRoot === "true" && ((unixUid ?? 0) !== 0 || (unixGid ?? 0) !== 0)) {
    throw invalidArgument(
      `platform property ${DOCKER_RUN_AS_ROOT}`,
      `asks for root, and ${UNIX_UID}/${UNIX_GID} for ${unixUid ?? 0}/${unixGid ?? 0}; give one of them`,
    );
  }

  const isolation = readWorkloadIsolation(single(WORKLOAD_ISOLATION_TYPE));
  if (isolation === "microvm" && !image) {
    throw invalidArgument(
      `platform property ${WORKLOAD_ISOLATION_TYPE}`,
      `"${single(WORKLOAD_ISOLATION_TYPE)}" boots a VM from the action's container-image, and the action names none; ` +
        "give container-image, or leave workload-isolation-type out to run in the namespace sandbox",
    );
  }
  const dockerd = readDockerd(
    single(INIT_DOCKERD),
    single(ENABLE_DOCKERD_TCP),
    isolation,
    single(WORKLOAD_ISOLATION_TYPE),
  );
  const estimates = readResourceEstimates(single);
  const recycling = readRecycling(single);
  const persistentWorkerKey = single(PERSISTENT_WORKER_PROPERTIES[0] as string) || undefined;

  const required = properties.filter((p) => !INTERPRETED.has(p.name)).map((p) => ({ name: p.name, value: p.value }));
  if (image) required.push(IMAGE_CAPABILITY);
  if (isolation === "microvm") required.push({ ...MICRO_VM_CAPABILITY });
  return {
    required,
    image,
    credentials: username !== undefined && password !== undefined ? { username, password } : undefined,
    network: networkProperty !== undefined,
    networkProperty,
    runAsRoot: runAsRoot === "true",
    unixUid,
    unixGid,
    imageMode,
    isolation,
    estimates,
    recycling,
    persistentWorkerKey,
    dockerd,
  };
}

/**
 * init-dockerd and enable-dockerd-tcp. A daemon needs a machine of the action's own: in a namespace sandbox it
 * would need the host's privileges, so it is refused there rather than started without them.
 */
function readDockerd(
  init: string | undefined,
  tcp: string | undefined,
  isolation: WorkloadIsolation,
  isolationValue: string | undefined,
): { tcp: boolean } | undefined {
  const start = oneOf(INIT_DOCKERD, init, ["true", "false"]) === "true";
  const listen = oneOf(ENABLE_DOCKERD_TCP, tcp, ["true", "false"]) === "true";
  if (start && isolation !== "microvm") {
    throw invalidArgument(
      `platform property ${INIT_DOCKERD}`,
      `starts Docker's daemon inside the action's own VM, and needs ${WORKLOAD_ISOLATION_TYPE}=firecracker (or microvm); ` +
        `this action's ${WORKLOAD_ISOLATION_TYPE} is ${isolationValue === undefined ? "not given (a namespace sandbox)" : `"${isolationValue}"`}`,
    );
  }
  if (listen && !start) {
    throw invalidArgument(
      `platform property ${ENABLE_DOCKERD_TCP}`,
      `makes the daemon that ${INIT_DOCKERD}=true starts listen on TCP; give ${INIT_DOCKERD}=true with it`,
    );
  }
  return start ? { tcp: listen } : undefined;
}

function oneOf(name: string, value: string | undefined, allowed: string[]): string | undefined {
  if (value === undefined || allowed.includes(value)) return value;
  throw invalidArgument(
    `platform property ${name}`,
    `"${value}" is not one of ${allowed.map((a) => `"${a}"`).join(", ")}`,
  );
}

/** A user or group id: a decimal number from 0 to 2^31 - 1. */
function unixId(name: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const id = /^[0-9]{1,10}$/.test(value) ? Number(value) : Number.NaN;
  if (!(id <= MAX_ID)) {
    throw invalidArgument(
      `platform property ${name}`,
      `"${value}" is not a user or group id (a decimal number from 0 to ${MAX_ID})`,
    );
  }
  return id;
}

/** The platform a client sent: REAPI 2.2 moved it to the Action; older clients (Bazel 4) set it on the Command. */
export function platformOf(
  action: { platform?: { properties: Property[] } | undefined },
  command: { platform?: { properties: Property[] } | undefined },
): Property[] {
  return (action.platform?.properties.length ? action.platform : command.platform)?.properties ?? [];
}
