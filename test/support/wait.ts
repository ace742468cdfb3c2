import { setTimeout as sleep } from "node:timers/promises";

/** Polls `probe` every 50 ms until it gives a value, for at most 10 s. */
export async function waitFor<T>(what: string, probe: () => Promise<T | undefined>): Promise<T> {
  for (let i = 0; i < 200; i++) {
    const value = await probe();
    if (value !== undefined) return value;
    await sleep(50);
  }
  throw new Error(`timed out waiting for ${what}`);
}
