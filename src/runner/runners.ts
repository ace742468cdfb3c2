import type { Property } from "../action/property.js";
import { WORKLOAD_ISOLATION_TYPE, type WorkloadIsolation } from "../action/workload-isolation.js";
import { Code, StatusError } from "../status/status.js";
import type { Runner } from "./runner.js";

/**
 * The runners a worker has, one per isolation kind it offers: picks the one
 * an action's platform asks for (workload-isolation-type), and says what the
 * worker offers clients, which is what its runners can do.
 */
export class Runners {
  readonly #byIsolation: ReadonlyMap<WorkloadIsolation, Runner>;

  constructor(runners: Partial<Record<WorkloadIsolation, Runner>>) {
    this.#byIsolation = new Map(Object.entries(runners) as [WorkloadIsolation, Runner][]);
  }

  /** Every runner's capabilities, each property once. */
  get capabilities(): Property[] {
    const seen = new Map<string, Property>();
    for (const runner of this.#byIsolation.values()) {
      for (const p of runner.capabilities) seen.set(`${p.name}=${p.value}`, { name: p.name, value: p.value });
    }
    return [...seen.values()];
  }

  /** Whether some runner offers `capability`. */
  offers(capability: Property): boolean {
    return this.capabilities.some((p) => p.name === capability.name && p.value === capability.value);
  }

  /** The runner for `isolation`; FAILED_PRECONDITION naming the property when this worker has none. */
  for(isolation: WorkloadIsolation): Runner {
    const runner = this.#byIsolation.get(isolation);
    if (!runner) {
      throw new StatusError(
        Code.FAILED_PRECONDITION,
        `this worker has no runner for the ${isolation} that platform property ${WORKLOAD_ISOLATION_TYPE} asks for`,
      );
    }
    return runner;
  }
}
