import type { Assignment, ExpandedImage } from "../gen/berth/worker/v1/worker.js";
import { invalidArgument } from "../status/status.js";

/**
 * What an action runs in, decided once where the Execute front end reads its
 * platform and carried unchanged to the worker (Assignment.environment):
 *
 * - the worker's own root, read-only (Bazel's actions: their tools are the host's);
 * - a container image the worker pulls (mount mode), by its canonical reference;
 * - an image the farm expanded into the CAS (expand mode);
 * - the input root itself as "/", as in a chroot (execution.inputRootAsRoot).
 */
export type ActionEnvironment =
  | HostRootEnvironment
  | ContainerImageEnvironment
  | ExpandedImageEnvironment
  | ChrootEnvironment;

export interface HostRootEnvironment {
  kind: "host-root";
}

export interface ContainerImageEnvironment {
  kind: "container-image";
  /** Canonical, and pinned to a digest when the farm's policy pins tags. */
  reference: string;
}

export interface ExpandedImageEnvironment {
  kind: "expanded-image";
  image: ExpandedImage;
}

export interface ChrootEnvironment {
  kind: "input-root-as-root";
}

export const HOST_ROOT_ENVIRONMENT: HostRootEnvironment = { kind: "host-root" };
export const CHROOT_ENVIRONMENT: ChrootEnvironment = { kind: "input-root-as-root" };

type WireEnvironment = Pick<Assignment, "hostRoot" | "containerImage" | "expandedImage" | "inputRootAsRoot">;

/** The environment as Assignment's oneof: exactly one field set. */
export function environmentToWire(environment: ActionEnvironment): WireEnvironment {
  switch (environment.kind) {
    case "host-root":
      return { hostRoot: {} };
    case "container-image":
      return { containerImage: { reference: environment.reference } };
    case "expanded-image":
      return { expandedImage: environment.image };
    case "input-root-as-root":
      return { inputRootAsRoot: {} };
  }
}

/**
 * The environment an assignment names. The hub sets exactly one; none, or
 * (in an assignment built in memory) more than one, is INVALID_ARGUMENT, so
 * that an assignment never runs on the host's root by omission.
 */
export function environmentFromWire(assignment: WireEnvironment): ActionEnvironment {
  const found: ActionEnvironment[] = [];
  if (assignment.hostRoot) found.push(HOST_ROOT_ENVIRONMENT);
  if (assignment.containerImage)
    found.push({ kind: "container-image", reference: assignment.containerImage.reference });
  if (assignment.expandedImage) found.push({ kind: "expanded-image", image: assignment.expandedImage });
  if (assignment.inputRootAsRoot) found.push(CHROOT_ENVIRONMENT);
  const [only] = found;
  if (found.length !== 1 || !only) {
    throw invalidArgument("assignment.environment", `names ${found.length} environments; exactly one is needed`);
  }
  if (only.kind === "container-image" && only.reference === "") {
    throw invalidArgument("assignment.container_image.reference", "is empty");
  }
  return only;
}
