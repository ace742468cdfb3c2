import { invalidArgument } from "../status/status.js";

/** BuildBuddy's property naming how an action is isolated; clients already send it. */
export const WORKLOAD_ISOLATION_TYPE = "workload-isolation-type";

/**
 * BuildBuddy's `none` (a bare process), `sandbox` (macOS's sandbox-exec),
 * `oci` (its own OCI runtime), `docker` and `podman` all ask for an action
 * confined on a shared kernel, which Berth's namespace (bubblewrap) sandbox
 * gives at least as strictly, on the host's root or in the action's image.
 */
const NAMESPACE_SANDBOX_VALUES = ["none", "sandbox", "oci", "docker", "podman"] as const;

/** Isolation by a virtual machine of the action's own (its own kernel): the VM runner (src/vm). */
const MICRO_VM_VALUES = ["firecracker", "microvm"] as const;

const ACCEPTED = [...NAMESPACE_SANDBOX_VALUES, ...MICRO_VM_VALUES];

/** The runner kind an action's workload-isolation-type asks for. */
export type WorkloadIsolation = "namespace-sandbox" | "microvm";

/**
 * What a worker with a VM runner offers, and what an action asking for a
 * microVM requires: the scheduler matches the two, so such an action never
 * reaches a worker without VMs, and is refused at once as unsatisfiable on
 * a farm that has none (running it in a namespace sandbox instead would give
 * it a weaker boundary than it asked for, silently).
 */
export const MICRO_VM_CAPABILITY = { name: WORKLOAD_ISOLATION_TYPE, value: "microvm" } as const;

/**
 * Reads the property's value (undefined: not given). Values are compared
 * without case ("Docker" is "docker"): they name technologies, not strings
 * a client chose, and no two accepted values differ only by case.
 */
export function readWorkloadIsolation(value: string | undefined): WorkloadIsolation {
  if (value === undefined) return "namespace-sandbox";
  const kind = value.toLowerCase();
  if ((NAMESPACE_SANDBOX_VALUES as readonly string[]).includes(kind)) return "namespace-sandbox";
  if ((MICRO_VM_VALUES as readonly string[]).includes(kind)) return "microvm";
  throw invalidArgument(
    `platform property ${WORKLOAD_ISOLATION_TYPE}`,
    `"${value}" is not one of ${ACCEPTED.map((v) => `"${v}"`).join(", ")}`,
  );
}
