/** Small statistics and formatting helpers for the benchmarks. */

export function median(values: readonly number[]): number {
  return percentile(values, 50);
}

/** The p-th percentile by linear interpolation between closest ranks (p in [0, 100]). */
export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = (p / 100) * (sorted.length - 1);
  const low = Math.floor(rank);
  const high = Math.ceil(rank);
  const a = sorted[low] as number;
  const b = sorted[high] as number;
  return a + (b - a) * (rank - low);
}

export function min(values: readonly number[]): number {
  return values.reduce((m, v) => Math.min(m, v), Number.POSITIVE_INFINITY);
}

export function max(values: readonly number[]): number {
  return values.reduce((m, v) => Math.max(m, v), Number.NEGATIVE_INFINITY);
}

/** A number with a precision that suits its magnitude. */
export function fmt(value: number, digits?: number): string {
  if (!Number.isFinite(value)) return String(value);
  if (digits !== undefined) return value.toFixed(digits);
  const abs = Math.abs(value);
  if (abs >= 1000) return Math.round(value).toLocaleString("en-US");
  if (abs >= 100) return value.toFixed(0);
  if (abs >= 10) return value.toFixed(1);
  if (abs >= 1) return value.toFixed(2);
  return value.toFixed(3);
}

export function fmtList(values: readonly number[], digits?: number): string {
  return values.map((v) => fmt(v, digits)).join(", ");
}

/** Milliseconds elapsed since `start` (a process.hrtime.bigint() value). */
export function elapsedMs(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e6;
}

export const MB = 1e6;
export const KiB = 1024;
export const MiB = 1024 * 1024;
