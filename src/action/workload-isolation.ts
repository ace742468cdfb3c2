import { Code, invalidArgument, StatusError } from "../status/status.js";

/** BuildBuddy's property naming how an action is isolated; clients already send it. */
export const WORKLOAD_ISOLATION_TYPE = "workload-isolation-type";

/**
 * Every value runs in the one runner Berth has today: its namespace (bubblewrap)
 * sandbox, on the host's root or inside the action's container-image. BuildBuddy's
 * `none` (a bare process), `sandbox` (macOS's sandbox-exec), `oci` (its own OCI
 * runtime), `docker` and `podman` all ask for an action confined on a shared
 * kernel, which the namespace sandbox gives at least as strictly.
 */
const NAMESPACE_SANDBOX_VALUES = ["none", "sandbox", "oci", "docker", "podman"] as const;

/** Isolation by a virtual machine: the VM runner (the next issue) will run these. */
const MICRO_VM_VALUES = ["firecracker", "microvm"] as const;

const ACCEPTED = [...NAMESPACE_SANDBOX_VALUES, ...MICRO_VM_VALUES];

/** The runner kind an action's workload-isolation-type asks for. */
export type WorkloadIsolation = "namespace-sandbox";

/**
 * Reads the property's value (undefined: not given). Values are compared
 * without case ("Docker" is "docker"): they name technologies, not strings
 * a client chose, and no two accepted values differ only by case.
 *
 * A microVM is refused with FAILED_PRECONDITION: the request is well formed,
 * but no worker of any Berth farm runs microVMs yet, so it would never run.
 * Running it in a namespace sandbox instead would give the action a weaker
 * boundary than it asked for, silently.
 */
export function readWorkloadIsolation(value: string | undefined): WorkloadIsolation {
  if (value === undefined) return "namespace-sandbox";
  const kind = value.toLowerCase();
  if ((NAMESPACE_SANDBOX_VALUES as readonly string[]).includes(kind)) return "namespace-sandbox";
  const property = `${WORKLOAD_ISOLATION_TYPE}=${value}`;
  if ((MICRO_VM_VALUES as readonly string[]).includes(kind)) {
    throw new StatusError(
      Code.FAILED_PRECONDITION,
      `platform property ${property} asks for a microVM, and no worker of this farm runs microVMs yet; ` +
        `remove the property or give one of ${NAMESPACE_SANDBOX_VALUES.map((v) => `"${v}"`).join(", ")} ` +
        "to run in Berth's namespace sandbox",
      {
        preconditionFailures: [
          {
            type: "UNSATISFIABLE_PLATFORM",
            subject: property,
            description: "no worker of this farm runs microVMs yet",
          },
        ],
      },
    );
  }
  throw invalidArgument(
    `platform property ${WORKLOAD_ISOLATION_TYPE}`,
    `"${value}" is not one of ${ACCEPTED.map((v) => `"${v}"`).join(", ")}`,
  );
}
