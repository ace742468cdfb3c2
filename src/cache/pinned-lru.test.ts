import assert from "node:assert/strict";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { type Created, type DisposeReason, type Lease, PinnedLru, type PinnedLruOptions } from "./pinned-lru.js";

/** A cache of strings whose disposals are recorded as "key:reason". */
function recorded(options: PinnedLruOptions<string, string> = {}) {
  const disposed: string[] = [];
  const cache = new PinnedLru<string, string>({
    dispose: (key, _value, _size, reason: DisposeReason) => {
      disposed.push(`${key}:${reason}`);
    },
    ...options,
  });
  return { cache, disposed };
}

const made =
  (size: number, value?: string) =>
  async (key: string): Promise<Created<string>> => ({ value: value ?? `value of ${key}`, size });

/** A promise and the functions that settle it. */
function deferred<T>() {
  let resolve!: (value: T) => void;
  let reject!: (err: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

test("past the byte cap the least recently used entries go, a touched one stays", async () => {
  const { cache, disposed } = recorded({ maxBytes: 300 });
  for (const key of ["a", "b", "c"]) await (await cache.acquire(key, made(100))).release();
  assert.equal(cache.touch("a"), "value of a");
  await cache.insert("d", "d", 100);
  assert.deepEqual(disposed, ["b:evicted"]);
  assert.deepEqual(
    [...cache.entries()].map((e) => e.key),
    ["c", "a", "d"],
  );
  assert.equal(cache.bytes, 300);
  assert.equal(cache.count, 3);
});

test("the entry cap evicts as the byte cap does", async () => {
  const { cache, disposed } = recorded({ maxEntries: 2 });
  for (const key of ["a", "b", "c", "d"]) await cache.insert(key, key, 0);
  assert.deepEqual(disposed, ["a:evicted", "b:evicted"]);
  assert.deepEqual(
    [...cache.entries()].map((e) => e.key),
    ["c", "d"],
  );
});

test("a pinned entry is never evicted: the cap waits, and is met at the release, which counts as a use", async () => {
  const { cache, disposed } = recorded({ maxBytes: 150 });
  const a = await cache.acquire("a", made(100));
  const b = await cache.acquire("b", made(100));
  assert.equal(cache.bytes, 200, "both pinned: over the cap");
  assert.equal(cache.pinned, 2);
  assert.deepEqual(disposed, []);
  await b.release();
  // b is now the most recently used, but the only one unpinned: it goes.
  assert.deepEqual(disposed, ["b:evicted"]);
  assert.equal(cache.has("a"), true);
  await b.release(); // idempotent: a's pin is untouched
  assert.equal(cache.isPinned("a"), true);
  await a.release();
  assert.equal(cache.pinned, 0);
  assert.equal(cache.bytes, 100);
});

test("concurrent acquirers share one creation, each holding a pin from the moment it lands", async () => {
  const { cache, disposed } = recorded({ maxBytes: 100 });
  let creations = 0;
  const gate = deferred<void>();
  const create = async (key: string) => {
    creations++;
    await gate.promise;
    return { value: `made ${key}`, size: 100 };
  };
  const waiting = [1, 2, 3].map(() => cache.acquire("k", create));
  assert.equal(creations, 1, "create is called at once, and once");
  gate.resolve();
  const leases = await Promise.all(waiting);
  assert.deepEqual(
    leases.map((l) => l.value),
    ["made k", "made k", "made k"],
  );
  // Another entry past the cap cannot push k out while any of the three holds it.
  await cache.insert("other", "o", 50);
  assert.deepEqual(disposed, ["other:evicted"]);
  await leases[0]?.release();
  await leases[1]?.release();
  await cache.insert("other", "o", 50);
  assert.deepEqual(disposed, ["other:evicted", "other:evicted"], "one pin still holds k");
  await leases[2]?.release();
  await cache.insert("other", "o", 50);
  assert.deepEqual(disposed, ["other:evicted", "other:evicted", "k:evicted"], "unpinned at last, k goes");
  assert.equal(creations, 1);
});

test("a failed creation reaches every waiter and is not kept: the next acquire tries again", async () => {
  const { cache } = recorded();
  let attempts = 0;
  const flaky = async (key: string) => {
    attempts++;
    await sleep(5);
    if (attempts === 1) throw new Error("registry unavailable");
    return { value: key, size: 1 };
  };
  const results = await Promise.allSettled([cache.acquire("k", flaky), cache.acquire("k", flaky)]);
  assert.deepEqual(
    results.map((r) => r.status === "rejected" && String(r.reason)),
    ["Error: registry unavailable", "Error: registry unavailable"],
  );
  assert.equal(cache.has("k"), false);
  assert.equal(cache.pinned, 0);
  const lease = await cache.acquire("k", flaky);
  assert.equal(lease.value, "k");
  assert.equal(attempts, 2);
  // A creation that throws before its first await is a rejection too, not an exception of acquire.
  await assert.rejects(
    cache.acquire("sync", () => {
      throw new Error("refused at once");
    }),
    /refused at once/,
  );
  assert.equal(cache.has("sync"), false);
});

test("an evicted entry is never handed out; its key is created again only once the old value is disposed of", async () => {
  const slowDisposal = deferred<void>();
  const order: string[] = [];
  const cache = new PinnedLru<string, number>({
    maxBytes: 1,
    dispose: async (key, value) => {
      order.push(`dispose ${key}=${value} started`);
      await slowDisposal.promise;
      order.push(`dispose ${key}=${value} done`);
    },
  });
  let version = 0;
  const create = async () => {
    order.push(`create ${version + 1}`);
    return { value: ++version, size: 1 };
  };
  await (await cache.acquire("k", create)).release();
  const evicting = cache.insert("other", 0, 1);
  assert.equal(cache.has("k"), false, "out of the index as soon as it is chosen");
  assert.equal(cache.tryAcquire("k"), undefined);
  const again = cache.acquire("k", create);
  await sleep(10);
  assert.deepEqual(order, ["create 1", "dispose k=1 started"], "the new value waits for the old one's disposal");
  slowDisposal.resolve();
  const lease = await again;
  await evicting;
  assert.equal(lease.value, 2);
  assert.deepEqual(order.slice(0, 4), ["create 1", "dispose k=1 started", "dispose k=1 done", "create 2"]);
});

test("a failed disposal is reported, not thrown at whoever released, and does not block the key", async () => {
  const errors: unknown[] = [];
  const cache = new PinnedLru<string, string>({
    maxBytes: 1,
    dispose: async (key) => {
      if (key === "bad") throw new Error("rm: device busy");
    },
    onError: (err) => errors.push(err),
  });
  const bad = await cache.acquire("bad", made(1));
  await cache.insert("x", "x", 1);
  await bad.release(); // bad is now the only unpinned entry... x is older: x goes first
  assert.equal(cache.has("x"), false);
  await cache.insert("y", "y", 1);
  assert.equal(cache.has("bad"), false);
  assert.deepEqual(errors.map(String), ["Error: rm: device busy"]);
  // The key can be created again.
  const fresh = await cache.acquire("bad", made(1, "fresh"));
  assert.equal(fresh.value, "fresh");
  // delete, awaited, carries the failure to its caller.
  await fresh.release();
  await assert.rejects(cache.delete("bad"), /device busy/);
});

test("delete of a held entry: it leaves the index at once; its key's next value waits for the last release and the disposal", async () => {
  const { cache, disposed } = recorded();
  const old = await cache.acquire("k", made(10, "old"));
  await cache.delete("k");
  assert.equal(cache.has("k"), false);
  assert.equal(cache.bytes, 0);
  assert.equal(cache.pinned, 0, "the deleted entry no longer counts");
  assert.deepEqual(disposed, [], "held: not disposed of yet");
  let created = false;
  const next = cache.acquire("k", async () => {
    created = true;
    return { value: "new", size: 10 };
  });
  await sleep(10);
  assert.equal(created, false, "two values of one key never coexist");
  assert.equal(old.value, "old");
  await old.release();
  assert.deepEqual(disposed, ["k:deleted"]);
  const fresh = await next;
  assert.equal(fresh.value, "new");
  assert.equal(cache.peek("k"), "new");
  await fresh.release();
});

test("take leases an idle entry exclusively; release puts it back, discard disposes of it", async () => {
  const { cache, disposed } = recorded();
  await cache.insert("runner-1", "warm", 10);
  const taken = cache.take("runner-1");
  assert.equal(taken?.value, "warm");
  assert.equal(cache.take("runner-1"), undefined, "taken already");
  assert.equal(cache.tryAcquire("runner-1"), undefined);
  await assert.rejects(cache.acquire("runner-1", made(1)), /taken/);
  await taken?.release();
  const again = cache.take("runner-1");
  assert.ok(again, "put back");
  await again.discard();
  assert.deepEqual(disposed, ["runner-1:deleted"]);
  assert.equal(cache.has("runner-1"), false);
  // A shared lease blocks take as well.
  await cache.insert("shared", "s", 1);
  const shared = cache.tryAcquire("shared");
  assert.equal(cache.take("shared"), undefined);
  await shared?.release();
});

test("entries unused for idleMillis expire; a held one does not, and its release restarts its clock", async () => {
  const { cache, disposed } = recorded({ idleMillis: 60 });
  await cache.insert("idle", "i", 1);
  const held = await cache.acquire("held", made(1));
  await sleep(30);
  await cache.insert("later", "l", 1);
  await sleep(50);
  assert.deepEqual(disposed, ["idle:expired"]);
  assert.equal(cache.has("held"), true);
  await held.release();
  await sleep(40);
  assert.deepEqual(disposed, ["idle:expired", "later:expired"]);
  assert.equal(cache.has("held"), true, "released 40 ms ago, under the limit");
  await sleep(50);
  assert.deepEqual(disposed, ["idle:expired", "later:expired", "held:expired"]);
  assert.equal(cache.count, 0);
});

test("restore adds what was found at start in last-use order and applies the caps once", async () => {
  const { cache, disposed } = recorded({ maxBytes: 200 });
  await cache.restore([
    { key: "new", value: "n", size: 100, usedAt: 30 },
    { key: "oldest", value: "o", size: 100, usedAt: 10 },
    { key: "middle", value: "m", size: 100, usedAt: 20 },
  ]);
  assert.deepEqual(disposed, ["oldest:evicted"]);
  assert.deepEqual(
    [...cache.entries()].map((e) => e.key),
    ["middle", "new"],
  );
  assert.throws(() => cache.insert("new", "again", 1), /already present/);
});

test("free evicts unpinned entries, least recently used first and never the one spared, whatever the caps", async () => {
  const { cache, disposed } = recorded();
  for (const key of ["a", "b", "c", "d"]) await cache.insert(key, key, 100);
  const held = cache.tryAcquire("b");
  assert.equal(await cache.free(150, "a"), 200);
  assert.deepEqual(disposed, ["c:evicted", "d:evicted"]);
  await held?.release();
  assert.equal(await cache.free(1000), 200);
  assert.equal(cache.count, 0);
});

test("an owner's own measure (overCap) and resize evict like the byte cap", async () => {
  let memory = 0;
  const memoryOf = new Map([
    ["x", 60],
    ["y", 60],
  ]);
  const cache = new PinnedLru<string, string>({
    maxBytes: 100,
    overCap: () => memory > 100,
    dispose: (key) => {
      memory -= memoryOf.get(key) ?? 0;
    },
  });
  memory += 60;
  await cache.insert("x", "x", 0);
  memory += 60;
  await cache.insert("y", "y", 0);
  assert.deepEqual(
    [...cache.entries()].map((e) => e.key),
    ["y"],
  );
  const y = cache.take("y");
  await cache.insert("z", "z", 50);
  await y?.resize(80);
  assert.equal(cache.has("z"), false, "y grew past the byte cap; z, unpinned, made room");
  assert.equal(cache.bytes, 80);
  await y?.release();
});

test("close disposes of every idle entry now and of held ones at their release", async () => {
  const { cache, disposed } = recorded({ idleMillis: 10_000 });
  await cache.insert("idle", "i", 1);
  const held = await cache.acquire("held", made(1));
  await cache.close();
  assert.deepEqual(disposed, ["idle:deleted"]);
  assert.equal(cache.count, 0);
  await held.release();
  assert.deepEqual(disposed, ["idle:deleted", "held:deleted"]);
});

test("under random concurrent use no held value is disposed of, none twice, and a key's values never overlap", async () => {
  let seed = 7;
  const random = (n: number) => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    // The high bits: an LCG's low ones repeat with a short period.
    return Math.floor((seed / 2 ** 31) * n);
  };
  let serial = 0;
  /** Values alive (from the start of their creation to the end of their disposal), by key; 0 while created. */
  const alive = new Map<string, number>();
  const disposedValues = new Set<number>();
  /** What the callbacks saw go wrong: an assert there would only reject a creation or a disposal. */
  const violations: string[] = [];
  const check = (ok: boolean, what: string) => {
    if (!ok) violations.push(what);
  };
  const cache = new PinnedLru<string, number>({
    maxBytes: 40,
    maxEntries: 4,
    dispose: async (key, value) => {
      check(!disposedValues.has(value), `value ${value} disposed of twice`);
      disposedValues.add(value);
      await sleep(random(4));
      check(alive.get(key) === value, `${key}=${value} disposed of, but ${key}=${alive.get(key)} is alive`);
      alive.delete(key);
    },
  });
  const create = async (key: string) => {
    // An on-disk store starts writing at the key's path at once.
    check(!alive.has(key), `a new value of ${key} while ${key}=${alive.get(key)} is not yet disposed of`);
    alive.set(key, 0);
    await sleep(random(3));
    if (random(5) === 0) {
      alive.delete(key);
      throw new Error("creation failed");
    }
    const value = ++serial;
    alive.set(key, value);
    return { value, size: 1 + random(15) };
  };
  const held: Lease<number>[] = [];
  /** Values this test deleted or discarded: the only held ones that may be out of the index. */
  const deleted = new Set<number>();
  const keyOf = new Map<number, string>();
  const work: Promise<unknown>[] = [];
  for (let step = 0; step < 1500; step++) {
    const key = `k${random(8)}`;
    const action = random(10);
    if (action < 5) {
      work.push(
        cache.acquire(key, create).then(
          (lease) => {
            keyOf.set(lease.value, key);
            held.push(lease);
          },
          () => {},
        ),
      );
    } else if (action < 8 && held.length > 0) {
      const lease = held.splice(random(held.length), 1)[0] as Lease<number>;
      check(!disposedValues.has(lease.value), `held value ${lease.value} disposed of`);
      const discard = random(4) === 0;
      if (discard) deleted.add(lease.value);
      work.push(discard ? lease.discard() : lease.release());
    } else if (action === 8) {
      const value = cache.peek(key);
      if (value !== undefined) deleted.add(value);
      work.push(cache.delete(key).catch(() => {}));
    } else {
      await sleep(random(2));
    }
    for (const { value } of held) {
      check(!disposedValues.has(value), `held value ${value} disposed of`);
      const indexed = cache.peek(keyOf.get(value) ?? "") === value;
      check(indexed || deleted.has(value), `held value ${value} left the index`);
    }
  }
  // The holders let go while the last acquires finish: some wait for a deleted value's holders.
  let finished = false;
  const all = Promise.all(work).then(() => {
    finished = true;
  });
  while (!finished) {
    for (const lease of held.splice(0)) await lease.release();
    await sleep(1);
  }
  await all;
  await Promise.all(held.splice(0).map((lease) => lease.release()));
  assert.deepEqual(violations.slice(0, 3), []);
  assert.equal(cache.pinned, 0);
  assert.ok(cache.bytes <= 40 && cache.count <= 4, `${cache.bytes} bytes in ${cache.count} entries`);
  assert.equal(
    cache.bytes,
    [...cache.entries()].reduce((sum, e) => sum + e.size, 0),
  );
  assert.deepEqual(
    [...alive.keys()].sort(),
    [...cache.entries()].map((e) => e.key).sort(),
    "what is alive is what is indexed",
  );
});
