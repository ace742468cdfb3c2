import { type DiskBounds, type DiskUsage, measureDiskUsage, type WritableArea } from "./disk-usage.js";
import { measureOpenDeletedFiles, type ProcessLister } from "./open-deleted-files.js";

export type DiskLimitName = "diskBytes" | "diskEntries";

export interface DiskMonitorOptions {
  /** Where the action writes: its input root (its own files only) and, in an image, its upper layer. */
  areas: readonly WritableArea[];
  /** worker.limits.diskBytes and diskEntries (0: unbounded). */
  bounds: DiskBounds;
  /**
   * The action's processes: files they hold open after deleting them count too (see open-deleted-files.ts).
   * Absent: only what the areas' names hold counts.
   */
  processes?: ProcessLister;
  /** Called once, while the action runs, when a sample finds it past a bound: the caller kills it. */
  onExceeded: (limit: DiskLimitName) => void;
}

/**
 * No walk before the action has run this long: most actions are over by then
 * and pay nothing. What a shorter action writes is bounded by RLIMIT_FSIZE per
 * file and by what it can write in this time.
 */
export const FIRST_SAMPLE_MS = 1000;
const MIN_INTERVAL_MS = 1000;
const MAX_INTERVAL_MS = 5000;
/** The pause after a walk is this many times as long as the walk: walking takes at most a fifth of the time. */
const INTERVAL_PER_WALK = 4;

/**
 * Samples what an action holds on disk while it runs: first after
 * FIRST_SAMPLE_MS, then every 1 to 5 s (longer after a long walk, so that a
 * tree of millions of entries is not walked back to back). Between two
 * samples, the action can write what it can write in that time beyond the
 * limit; `finish` walks once more when the command has ended, so that an
 * action that ran past its first sample cannot end just past the limit
 * unnoticed.
 */
export class DiskMonitor {
  readonly #options: DiskMonitorOptions;
  readonly #abort = new AbortController();
  readonly #startedAt = Date.now();
  #timer: NodeJS.Timeout | undefined;
  #walk: Promise<void> | undefined;
  #exceeded: DiskLimitName | undefined;
  #error: Error | undefined;
  #sampled = false;

  constructor(options: DiskMonitorOptions) {
    this.#options = options;
    if (this.#bounded()) this.#schedule(FIRST_SAMPLE_MS);
  }

  #bounded(): boolean {
    return this.#options.bounds.bytes > 0 || this.#options.bounds.entries > 0;
  }

  #schedule(delayMs: number): void {
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#walk = this.#sample().then((limit) => {
        this.#walk = undefined;
        if (limit !== undefined) {
          this.#exceeded = limit;
          // Once finishing, the action has ended: nothing left to kill.
          if (!this.#abort.signal.aborted) this.#options.onExceeded(limit);
        } else if (!this.#abort.signal.aborted) {
          this.#schedule(this.#nextDelay());
        }
      });
    }, delayMs);
  }

  #lastWalkMs = 0;

  #nextDelay(): number {
    return Math.min(MAX_INTERVAL_MS, Math.max(MIN_INTERVAL_MS, this.#lastWalkMs * INTERVAL_PER_WALK));
  }

  /** Which bound the action is past, if any; a failed walk is kept for `finish` to report. */
  async #sample(): Promise<DiskLimitName | undefined> {
    this.#sampled = true;
    const start = Date.now();
    try {
      const usage = await this.#measure(this.#abort.signal);
      if (this.#abort.signal.aborted) return undefined;
      return this.#passed(usage);
    } catch (error) {
      this.#error = error as Error;
      return undefined;
    } finally {
      this.#lastWalkMs = Date.now() - start;
    }
  }

  /** What the areas hold, and, unless that is already too much, the files the action holds open but deleted. */
  async #measure(signal?: AbortSignal): Promise<DiskUsage> {
    const { areas, bounds, processes } = this.#options;
    const usage = await measureDiskUsage(areas, bounds, signal);
    if (processes === undefined || signal?.aborted || this.#passed(usage) !== undefined) return usage;
    const open = await measureOpenDeletedFiles(
      await processes(),
      areas.map((area) => area.dir),
      signal,
    );
    return { bytes: usage.bytes + open.bytes, entries: usage.entries + open.entries };
  }

  #passed(usage: DiskUsage): DiskLimitName | undefined {
    const { bounds } = this.#options;
    if (bounds.bytes > 0 && usage.bytes > bounds.bytes) return "diskBytes";
    if (bounds.entries > 0 && usage.entries > bounds.entries) return "diskEntries";
    return undefined;
  }

  /** Stops sampling without a last walk (the sandbox failed; there is no result to give). */
  stop(): void {
    clearTimeout(this.#timer);
    this.#abort.abort();
  }

  /**
   * Once nothing of the action runs: stops sampling and says which bound it
   * passed. An action that ran long enough to be sampled is walked once more
   * (its last writes may have come after the last sample); a shorter one is
   * not walked at all.
   */
  async finish(): Promise<DiskLimitName | undefined> {
    clearTimeout(this.#timer);
    const ranLongEnough = this.#sampled || Date.now() - this.#startedAt >= FIRST_SAMPLE_MS;
    if (this.#exceeded !== undefined || !this.#bounded()) return this.#exceeded;
    // A sample under way saw the action still running: its answer does not count, the final walk does.
    const controller = this.#abort;
    const inFlight = this.#walk;
    controller.abort();
    await inFlight;
    if (this.#exceeded !== undefined) return this.#exceeded;
    if (!ranLongEnough) return undefined;
    // The action's processes have ended by now: only its names are left to count.
    const limit = this.#passed(await measureDiskUsage(this.#options.areas, this.#options.bounds));
    if (limit !== undefined) return limit;
    if (this.#error) throw this.#error;
    return undefined;
  }
}
