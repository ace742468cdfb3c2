/** Why an entry left the cache: the caps, its idle time, or its owner's `delete` (or `discard`, `close`). */
export type DisposeReason = "evicted" | "expired" | "deleted";

/** A value made for a missing key, with what it costs against `maxBytes`. */
export interface Created<V> {
  value: V;
  size: number;
}

export interface PinnedLruOptions<K, V> {
  /** Least recently used unpinned entries go while the entries' sizes add up to more (default: no cap). */
  maxBytes?: number;
  /** … or while there are more entries than this (default: no cap). */
  maxEntries?: number;
  /**
   * A cap the owner measures itself (a runner pool's memory), checked with the
   * two above: true while the cache holds too much. The owner's measure must
   * drop as `dispose` is called.
   */
  overCap?: () => boolean;
  /** Unpinned entries unused this long are disposed of (reason "expired"); default: never. */
  idleMillis?: number;
  /**
   * Frees what an entry holds (files, processes). Called once per entry, as
   * soon as it has left the index and no lease holds it; it may run on
   * (return a promise). Meanwhile a new value for the same key is created
   * only once it has finished, so the two never share a path.
   */
  dispose?: (key: K, value: V, size: number, reason: DisposeReason) => void | Promise<void>;
  /** Failures of disposals nobody awaits (after a release, an insertion, an expiry). */
  onError?: (err: unknown) => void;
}

/** One holder's claim on an entry: the entry is never evicted while any lease on it is held. */
export interface Lease<V> {
  readonly value: V;
  /**
   * Unpins (idempotent). The entry counts as just used; resolves once the
   * cache is back under its caps, as far as unpinned entries allow. Never rejects.
   */
  release(): Promise<void>;
  /** Releases and deletes the entry (disposed of once no other lease holds it): a runner not to be reused. */
  discard(): Promise<void>;
  /** Changes what the entry costs against `maxBytes` (a runner's disk grew), evicting others if need be. */
  resize(size: number): Promise<void>;
}

interface Slot<V> {
  value: V;
  size: number;
  pins: number;
  /** Taken by `take`: nobody else gets a lease until it is released. */
  exclusive: boolean;
  /** Left the index while pinned (deleted): disposed of at its last release. */
  doomed: boolean;
  /** For a doomed entry: lets the key's next value be created, once this one's disposal has started. */
  openGate?: () => void;
  /** performance.now() of the last use, for the idle limit. */
  usedAt: number;
}

interface Creation<V> {
  /** Acquirers waiting: each holds a pin on the entry from the moment it is inserted. */
  waiters: number;
  done: Promise<Slot<V>>;
}

/**
 * Entries by key in least-recently-used order, each with a size counted
 * against caps on bytes and entries; an entry is pinned while a lease on it
 * is held and never evicted then. The caps may be passed while pinned
 * entries hold more than they allow; they are met again as leases are released.
 *
 * `acquire` creates a missing entry once however many ask at the same time
 * (a failed creation is not kept: the next acquire tries again). An entry
 * chosen for eviction leaves the index at once, so it is never handed out
 * again; its disposal may take a while, and a new value for its key is
 * created only after it (on-disk stores reuse the path).
 *
 * For a pool of things used by one holder at a time (warm runners), `take`
 * leases an idle entry exclusively and `release` puts it back; `idleMillis`
 * disposes of what stays unused.
 */
export class PinnedLru<K, V> {
  /** Least recently used first. */
  private readonly slots = new Map<K, Slot<V>>();
  private readonly creating = new Map<K, Creation<V>>();
  private readonly disposing = new Map<K, Promise<void>>();
  private totalBytes = 0;
  private pinnedCount = 0;
  private idleTimer: NodeJS.Timeout | undefined;

  constructor(private readonly options: PinnedLruOptions<K, V> = {}) {}

  /** Bytes of the entries in the index (pinned ones included). */
  get bytes(): number {
    return this.totalBytes;
  }

  /** Entries in the index. */
  get count(): number {
    return this.slots.size;
  }

  /** Entries in the index some lease holds. */
  get pinned(): number {
    return this.pinnedCount;
  }

  has(key: K): boolean {
    return this.slots.has(key);
  }

  /** The value, without counting a use. */
  peek(key: K): V | undefined {
    return this.slots.get(key)?.value;
  }

  sizeOf(key: K): number | undefined {
    return this.slots.get(key)?.size;
  }

  isPinned(key: K): boolean {
    return (this.slots.get(key)?.pins ?? 0) > 0;
  }

  /** Entries least recently used first. */
  *entries(): Generator<{ key: K; value: V; size: number; pinned: boolean }> {
    for (const [key, slot] of this.slots) yield { key, value: slot.value, size: slot.size, pinned: slot.pins > 0 };
  }

  /** Counts a use of the entry without pinning it; its value, or undefined when absent. */
  touch(key: K): V | undefined {
    const slot = this.slots.get(key);
    if (!slot) return undefined;
    this.markUsed(key, slot);
    return slot.value;
  }

  /** A lease on the entry if it is present and not taken exclusively, counting a use; never waits. */
  tryAcquire(key: K): Lease<V> | undefined {
    const slot = this.slots.get(key);
    if (!slot || slot.exclusive) return undefined;
    this.markUsed(key, slot);
    this.pin(slot);
    return this.leaseOn(key, slot);
  }

  /**
   * A lease on the entry, created by `create` if it is missing: once, however
   * many acquire it meanwhile, all of them sharing the result or the error.
   * `create` is called before this returns unless an earlier value of the key
   * is still being disposed of. The new entry is pinned by every waiter from
   * the moment it is inserted; this resolves once the evictions its
   * insertion caused are done. An entry taken exclusively is not shared:
   * this rejects then.
   */
  async acquire(key: K, create: (key: K) => Promise<Created<V>>): Promise<Lease<V>> {
    const present = this.slots.get(key);
    if (present?.exclusive) throw new Error(`the cache entry ${String(key)} is taken`);
    const lease = this.tryAcquire(key);
    if (lease) return lease;
    let creation = this.creating.get(key);
    if (!creation) creation = this.create(key, create);
    creation.waiters++;
    const slot = await creation.done;
    return this.leaseOn(key, slot);
  }

  /**
   * An exclusive lease on an idle entry (present and pinned by nobody): a
   * warm runner for one action. `release` puts it back, `discard` disposes of it.
   */
  take(key: K): Lease<V> | undefined {
    const slot = this.slots.get(key);
    if (!slot || slot.pins > 0) return undefined;
    slot.exclusive = true;
    this.markUsed(key, slot);
    this.pin(slot);
    return this.leaseOn(key, slot);
  }

  /**
   * Adds an entry made elsewhere (found on disk at start, a file committed,
   * a runner kept after its action), unpinned and most recently used;
   * resolves once the evictions it caused are done. The key must be absent
   * and not being created.
   */
  insert(key: K, value: V, size: number): Promise<void> {
    this.put(key, value, size, 0);
    this.scheduleIdleCheck();
    return this.enforceCaps();
  }

  /** Adds entries found at start in the order of their last use (oldest first), then applies the caps once. */
  restore(found: Iterable<{ key: K; value: V; size: number; usedAt: number }>): Promise<void> {
    for (const entry of [...found].sort((a, b) => a.usedAt - b.usedAt)) this.put(entry.key, entry.value, entry.size, 0);
    this.scheduleIdleCheck();
    return this.enforceCaps();
  }

  /**
   * Removes the entry from the index: unpinned, it is disposed of now (the
   * promise follows the disposal and rejects with its error); pinned, at its
   * last release (the promise resolves at once). Either way a new value for
   * the key is created only after that disposal: a holder must not wait for
   * a new value of a key it deleted while still holding the old one.
   */
  delete(key: K): Promise<void> {
    const slot = this.slots.get(key);
    if (!slot) return this.disposing.get(key) ?? Promise.resolve();
    return this.remove(key, slot, "deleted") ?? Promise.resolve();
  }

  /** Resolves once no earlier value of `key` is being disposed of (before reusing its path). */
  async settled(key: K): Promise<void> {
    for (let pending = this.disposing.get(key); pending; pending = this.disposing.get(key)) {
      await pending.catch(() => {});
    }
  }

  /**
   * Evicts least recently used unpinned entries (never `spare`) until at
   * least `bytes` are freed, whatever the caps: room for a write the disk
   * refused. Resolves with the bytes freed once their disposals are done.
   */
  async free(bytes: number, spare?: K): Promise<number> {
    let freed = 0;
    const disposals: Promise<void>[] = [];
    for (const [key, slot] of this.slots) {
      if (freed >= bytes) break;
      if (slot.pins > 0 || key === spare) continue;
      freed += slot.size;
      const disposal = this.remove(key, slot, "evicted");
      if (disposal) disposals.push(disposal);
    }
    await this.reportFailures(disposals);
    return freed;
  }

  /** Evicts least recently used unpinned entries until the caps are met (or only pinned ones are left). */
  enforceCaps(): Promise<void> {
    if (!this.overCaps()) return Promise.resolve();
    const disposals: Promise<void>[] = [];
    for (const [key, slot] of this.slots) {
      if (!this.overCaps()) break;
      if (slot.pins > 0) continue;
      const disposal = this.remove(key, slot, "evicted");
      if (disposal) disposals.push(disposal);
    }
    return this.reportFailures(disposals);
  }

  /** Deletes every entry (pinned ones at their release) and stops the idle timer; resolves once the disposals now due are done. */
  async close(): Promise<void> {
    clearTimeout(this.idleTimer);
    this.idleTimer = undefined;
    const disposals: Promise<void>[] = [];
    for (const [key, slot] of this.slots) {
      const disposal = this.remove(key, slot, "deleted");
      if (disposal) disposals.push(disposal);
    }
    await this.reportFailures(disposals);
  }

  private create(key: K, create: (key: K) => Promise<Created<V>>): Creation<V> {
    const start = (): Promise<Created<V>> => {
      try {
        return create(key);
      } catch (err) {
        return Promise.reject(err);
      }
    };
    const earlier = this.disposing.get(key);
    const made = earlier ? this.settled(key).then(start) : start();
    const creation: Creation<V> = {
      waiters: 0,
      done: made.then(
        async ({ value, size }) => {
          this.creating.delete(key);
          const slot = this.put(key, value, size, creation.waiters);
          await this.enforceCaps();
          return slot;
        },
        (err: unknown) => {
          this.creating.delete(key);
          throw err;
        },
      ),
    };
    this.creating.set(key, creation);
    return creation;
  }

  private put(key: K, value: V, size: number, pins: number): Slot<V> {
    if (this.slots.has(key) || this.creating.has(key)) {
      throw new Error(`the cache entry ${String(key)} is already present or being created`);
    }
    const slot: Slot<V> = { value, size, pins, exclusive: false, doomed: false, usedAt: performance.now() };
    this.slots.set(key, slot);
    this.totalBytes += size;
    if (pins > 0) this.pinnedCount++;
    return slot;
  }

  private pin(slot: Slot<V>): void {
    if (slot.pins++ === 0 && !slot.doomed) this.pinnedCount++;
  }

  private leaseOn(key: K, slot: Slot<V>): Lease<V> {
    let held = true;
    const release = (): Promise<void> => {
      if (!held) return Promise.resolve();
      held = false;
      return this.unpin(key, slot);
    };
    return {
      value: slot.value,
      release,
      discard: async () => {
        // Held, so the removal only dooms it: the release below disposes of it if this was the last lease.
        if (held && this.slots.get(key) === slot) this.remove(key, slot, "deleted");
        await release();
      },
      resize: (size: number) => {
        if (this.slots.get(key) !== slot) return Promise.resolve();
        this.totalBytes += size - slot.size;
        slot.size = size;
        return this.enforceCaps();
      },
    };
  }

  private unpin(key: K, slot: Slot<V>): Promise<void> {
    slot.pins--;
    slot.exclusive = false;
    if (slot.doomed) {
      if (slot.pins > 0) return Promise.resolve();
      const disposal = this.disposeOf(key, slot, "deleted");
      slot.openGate?.();
      return this.reportFailures([disposal]);
    }
    if (slot.pins === 0) this.pinnedCount--;
    this.markUsed(key, slot);
    this.scheduleIdleCheck();
    return this.enforceCaps();
  }

  private markUsed(key: K, slot: Slot<V>): void {
    this.slots.delete(key);
    this.slots.set(key, slot);
    slot.usedAt = performance.now();
  }

  /** Takes the entry out of the index; returns its disposal if it is due now (unpinned). */
  private remove(key: K, slot: Slot<V>, reason: DisposeReason): Promise<void> | undefined {
    this.slots.delete(key);
    this.totalBytes -= slot.size;
    if (slot.pins > 0) {
      slot.doomed = true;
      this.pinnedCount--;
      // The key's next value waits for this one's holders and then its disposal, as after any eviction.
      this.track(
        key,
        new Promise<void>((resolve) => {
          slot.openGate = resolve;
        }),
      );
      return undefined;
    }
    return this.disposeOf(key, slot, reason);
  }

  private disposeOf(key: K, slot: Slot<V>, reason: DisposeReason): Promise<void> {
    let disposal: Promise<void>;
    try {
      disposal = Promise.resolve(this.options.dispose?.(key, slot.value, slot.size, reason));
    } catch (err) {
      disposal = Promise.reject(err);
    }
    return this.track(key, disposal);
  }

  /** Records that a value of `key` is on its way out: its next value is created only after. */
  private track(key: K, pending: Promise<void>): Promise<void> {
    const tracked = pending.finally(() => {
      if (this.disposing.get(key) === tracked) this.disposing.delete(key);
    });
    // Nobody may be listening: the failure is reported where it is awaited.
    tracked.catch(() => {});
    this.disposing.set(key, tracked);
    return tracked;
  }

  private async reportFailures(disposals: Promise<void>[]): Promise<void> {
    if (disposals.length === 0) return;
    for (const result of await Promise.allSettled(disposals)) {
      if (result.status === "rejected") this.options.onError?.(result.reason);
    }
  }

  private overCaps(): boolean {
    return (
      this.totalBytes > (this.options.maxBytes ?? Number.POSITIVE_INFINITY) ||
      this.slots.size > (this.options.maxEntries ?? Number.POSITIVE_INFINITY) ||
      this.options.overCap?.() === true
    );
  }

  /**
   * Unpinned entries are in the order of their last use (a release counts
   * as one), so the first unpinned one is the next to expire: one timer, set
   * for it, is enough.
   */
  private scheduleIdleCheck(): void {
    const idle = this.options.idleMillis;
    if (idle === undefined || this.idleTimer !== undefined) return;
    for (const slot of this.slots.values()) {
      if (slot.pins > 0) continue;
      const wait = Math.max(0, slot.usedAt + idle - performance.now());
      this.idleTimer = setTimeout(() => this.expireIdle(), wait);
      this.idleTimer.unref();
      return;
    }
  }

  private expireIdle(): void {
    this.idleTimer = undefined;
    const idle = this.options.idleMillis ?? Number.POSITIVE_INFINITY;
    const now = performance.now();
    const disposals: Promise<void>[] = [];
    for (const [key, slot] of this.slots) {
      if (slot.pins > 0) continue;
      if (now - slot.usedAt < idle) break;
      const disposal = this.remove(key, slot, "expired");
      if (disposal) disposals.push(disposal);
    }
    void this.reportFailures(disposals);
    this.scheduleIdleCheck();
  }
}
