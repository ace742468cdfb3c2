import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { SingleFlight } from "./single-flight.js";

describe("SingleFlight", () => {
  it("runs concurrent calls for one key once, and forgets the result afterwards", async () => {
    const flight = new SingleFlight<string, number>();
    let runs = 0;
    const work = async () => {
      runs++;
      await new Promise((resolve) => setTimeout(resolve, 5));
      return runs;
    };
    const results = await Promise.all([flight.run("a", work), flight.run("a", work), flight.run("b", work)]);
    assert.deepEqual(results, [2, 2, 2]);
    assert.equal(runs, 2);
    assert.equal(flight.size, 0);
    assert.equal(await flight.run("a", work), 3);
  });

  it("shares a failure with every waiter, then tries again", async () => {
    const flight = new SingleFlight<string, number>();
    const failing = async (): Promise<number> => {
      throw new Error("boom");
    };
    await Promise.all([
      assert.rejects(flight.run("k", failing), /boom/),
      assert.rejects(flight.run("k", failing), /boom/),
    ]);
    assert.equal(await flight.run("k", async () => 1), 1);
  });
});
