/**
 * Joins concurrent calls for the same key to one run: the first caller starts
 * it, later callers get the same promise until it settles. Nothing is cached
 * after that, so a failure is not remembered.
 */
export class SingleFlight<K, V> {
  readonly #running = new Map<K, Promise<V>>();

  run(key: K, fn: () => Promise<V>): Promise<V> {
    const running = this.#running.get(key);
    if (running) return running;
    const started = (async () => {
      try {
        return await fn();
      } finally {
        this.#running.delete(key);
      }
    })();
    this.#running.set(key, started);
    return started;
  }

  get size(): number {
    return this.#running.size;
  }
}
