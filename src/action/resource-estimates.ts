import { invalidArgument } from "../status/status.js";

/** BuildBuddy's properties saying what an action needs; clients already send them. */
export const ESTIMATED_CPU = "EstimatedCPU";
export const ESTIMATED_MEMORY = "EstimatedMemory";
export const ESTIMATED_FREE_DISK_BYTES = "EstimatedFreeDiskBytes";
export const RESOURCE_ESTIMATE_PROPERTIES = [ESTIMATED_CPU, ESTIMATED_MEMORY, ESTIMATED_FREE_DISK_BYTES];

/** What an action says it needs; absent: it said nothing. A VM is sized by it (within the worker's caps). */
export interface ResourceEstimates {
  /** Thousandths of a core ("2" is 2000, "500m" is 500). */
  cpuMillis?: number;
  memoryBytes?: number;
  freeDiskBytes?: number;
}

const UNITS: Record<string, number> = {
  "": 1,
  b: 1,
  k: 1e3,
  kb: 1e3,
  m: 1e6,
  mb: 1e6,
  g: 1e9,
  gb: 1e9,
  t: 1e12,
  tb: 1e12,
  ki: 1024,
  kib: 1024,
  mi: 1024 ** 2,
  mib: 1024 ** 2,
  gi: 1024 ** 3,
  gib: 1024 ** 3,
  ti: 1024 ** 4,
  tib: 1024 ** 4,
};

/** Reads the three properties (`single` gives a property's one value, or undefined); bad values are INVALID_ARGUMENT. */
export function readResourceEstimates(single: (name: string) => string | undefined): ResourceEstimates {
  const estimates: ResourceEstimates = {};
  const cpu = single(ESTIMATED_CPU);
  if (cpu !== undefined) {
    const match = /^\s*([0-9]+(?:\.[0-9]+)?)\s*(m?)\s*$/.exec(cpu);
    const millis = match ? Number(match[1]) * (match[2] === "m" ? 1 : 1000) : Number.NaN;
    if (!(millis > 0) || !Number.isFinite(millis)) {
      throw invalidArgument(
        `platform property ${ESTIMATED_CPU}`,
        `"${cpu}" is not a number of cores ("2", "0.5", "500m")`,
      );
    }
    estimates.cpuMillis = Math.ceil(millis);
  }
  const memory = single(ESTIMATED_MEMORY);
  if (memory !== undefined) estimates.memoryBytes = byteCount(ESTIMATED_MEMORY, memory);
  const disk = single(ESTIMATED_FREE_DISK_BYTES);
  if (disk !== undefined) estimates.freeDiskBytes = byteCount(ESTIMATED_FREE_DISK_BYTES, disk);
  return estimates;
}

function byteCount(name: string, value: string): number {
  const match = /^\s*([0-9]+(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([a-z]*)\s*$/i.exec(value);
  const factor = match ? UNITS[(match[2] as string).toLowerCase()] : undefined;
  const bytes = match && factor !== undefined ? Math.ceil(Number(match[1]) * factor) : Number.NaN;
  if (!(bytes > 0) || !Number.isSafeInteger(bytes)) {
    throw invalidArgument(
      `platform property ${name}`,
      `"${value}" is not a number of bytes ("2000000000", "2GB", "1.5GiB")`,
    );
  }
  return bytes;
}
