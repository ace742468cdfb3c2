import assert from "node:assert/strict";
import { afterEach, test } from "node:test";
import { IMAGE_CAPABILITY } from "../action/action-platform.js";
import { parseConfig } from "../config/config.js";
import { ImagePullState } from "../gen/berth/image/v1/image.js";
import type { Assignment, ImagePull, ImagePullProgress } from "../gen/berth/worker/v1/worker.js";
import { failure, Scheduler, type WorkerConnection } from "../scheduler/scheduler.js";
import { Code, type StatusError } from "../status/status.js";
import { ImagePolicy } from "./image-policy.js";
import { ImagePulls, type WorkerPullState } from "./image-pulls.js";

/** A connected worker as the scheduler knows it, keeping what it was sent. */
class RecordingWorker implements WorkerConnection {
  readonly pulls: ImagePull[] = [];
  readonly slots = 1;
  constructor(
    readonly name: string,
    readonly properties = [IMAGE_CAPABILITY],
  ) {}
  assign(_assignment: Assignment): void {}
  cancel(_leaseId: string): void {}
  pullImage(pull: ImagePull): void {
    this.pulls.push(pull);
  }
}

const schedulers: Scheduler[] = [];
afterEach(() => {
  for (const scheduler of schedulers.splice(0)) scheduler.close();
});

function farm(images: Record<string, unknown> = {}, workers: WorkerConnection[] = []) {
  const scheduler = new Scheduler({
    leaseTimeoutMs: 60_000,
    maxAttempts: 1,
    retainCompletedMs: 1000,
    finish: async () => failure(Code.INTERNAL, "no actions here"),
  });
  schedulers.push(scheduler);
  for (const worker of workers) scheduler.connect(worker);
  const config = parseConfig({ dataDir: "/nonexistent", images });
  const resolveTag = async () => `sha256:${"c".repeat(64)}`;
  return new ImagePulls(new ImagePolicy(config.images, resolveTag), scheduler);
}

function progress(pullId: string, fields: Partial<ImagePullState> = {}): ImagePullProgress {
  return { pullId, state: ImagePullState.fromPartial(fields) };
}

const ok = { code: Code.OK, message: "", details: [] };

test("a pull goes to every worker that runs images, relays their progress, and ends when all have finished", async () => {
  const [a, b, plain] = [new RecordingWorker("a"), new RecordingWorker("b"), new RecordingWorker("plain", [])];
  const pulls = farm({}, [a, b, plain]);
  const updates: WorkerPullState[] = [];
  const pull = await pulls.start("docker://127.0.0.1:5000/team/tool:1", (state) => updates.push(state));
  assert.equal(pull.reference, "127.0.0.1:5000/team/tool:1");
  assert.deepEqual(pull.workerNames, ["a", "b"]);
  assert.deepEqual(
    updates.map((u) => [u.workerName, u.state.finished]),
    [
      ["a", false],
      ["b", false],
    ],
  );
  assert.equal(plain.pulls.length, 0);
  const pullId = a.pulls[0]?.pullId ?? "";
  assert.deepEqual(b.pulls, [{ pullId, reference: "127.0.0.1:5000/team/tool:1" }]);

  let ended = false;
  void pull.finished.then(() => {
    ended = true;
  });
  pulls.report("a", progress(pullId, { bytesDone: 10, bytesTotal: 40, layersTotal: 2 }));
  pulls.report("plain", progress(pullId, { finished: true, status: ok }));
  pulls.report("a", progress("another pull", { finished: true, status: ok }));
  assert.deepEqual(
    updates.slice(2).map((u) => [u.workerName, u.state.bytesDone, u.state.bytesTotal]),
    [["a", 10, 40]],
  );
  const pinned = `127.0.0.1:5000/team/tool:1@sha256:${"d".repeat(64)}`;
  const done = { bytesDone: 40, bytesTotal: 40, layersDone: 2, layersTotal: 2, finished: true, status: ok };
  pulls.report("a", progress(pullId, { ...done, manifestDigest: `sha256:${"d".repeat(64)}`, reference: pinned }));
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(ended, false, "b has not finished yet");
  pulls.report(
    "b",
    progress(pullId, { finished: true, status: { code: Code.FAILED_PRECONDITION, message: "gone", details: [] } }),
  );
  await pull.finished;
  const last = updates.slice(-2);
  assert.equal(last[0]?.state.reference, pinned);
  assert.equal(last[1]?.state.status?.code, Code.FAILED_PRECONDITION);
  // Reports after the end are nobody's business.
  const count = updates.length;
  pulls.report("b", progress(pullId, { bytesDone: 1 }));
  assert.equal(updates.length, count);
});

test("a worker leaving mid-pull has finished with UNAVAILABLE; one that had finished keeps its status", async () => {
  const [a, b] = [new RecordingWorker("a"), new RecordingWorker("b")];
  const pulls = farm({}, [a, b]);
  const updates: WorkerPullState[] = [];
  const pull = await pulls.start(`127.0.0.1:5000/tool@sha256:${"e".repeat(64)}`, (state) => updates.push(state));
  const pullId = a.pulls[0]?.pullId ?? "";
  pulls.report("a", progress(pullId, { finished: true, status: ok }));
  pulls.workerLeft("a", "stream closed");
  pulls.workerLeft("b", "stream closed");
  await pull.finished;
  const final = new Map(updates.map((u) => [u.workerName, u]));
  assert.equal(final.get("a")?.state.status?.code, Code.OK);
  assert.equal(final.get("b")?.state.status?.code, Code.UNAVAILABLE);
  assert.match(final.get("b")?.state.status?.message ?? "", /worker b left the farm before it finished the pull/);
});

test("stop ends the relaying at once without telling the workers anything more", async () => {
  const a = new RecordingWorker("a");
  const pulls = farm({}, [a]);
  const updates: WorkerPullState[] = [];
  const pull = await pulls.start("127.0.0.1:5000/tool:1", (state) => updates.push(state));
  pull.stop();
  await pull.finished;
  pulls.report("a", progress(a.pulls[0]?.pullId ?? "", { bytesDone: 5 }));
  assert.equal(updates.length, 1);
  assert.equal(a.pulls.length, 1);
});

test("refusals: malformed, not allowed, a tag where only digests run, no worker that runs images", async () => {
  const refusal = async (pulls: ImagePulls, reference: string) =>
    (await pulls
      .start(reference, () => {})
      .then(
        () => assert.fail(`${reference} was not refused`),
        (err: StatusError) => err,
      )) as StatusError;

  const open = farm({}, [new RecordingWorker("a")]);
  const malformed = await refusal(open, "127.0.0.1:5000/Upper:1");
  assert.equal(malformed.code, Code.INVALID_ARGUMENT);
  assert.match(malformed.message, /^reference: invalid image reference .*lowercase/);

  const guarded = farm({ allowed: ["ghcr.io/org/*"] }, [new RecordingWorker("a")]);
  const denied = await refusal(guarded, "127.0.0.1:5000/tool:1");
  assert.equal(denied.code, Code.PERMISSION_DENIED);
  assert.match(denied.message, /image 127\.0\.0\.1:5000\/tool:1 is not allowed on this farm/);

  const strict = farm({ tagPolicy: "reject" }, [new RecordingWorker("a")]);
  const tagged = await refusal(strict, "127.0.0.1:5000/tool:1");
  assert.equal(tagged.code, Code.INVALID_ARGUMENT);
  assert.match(tagged.message, /^reference: image 127\.0\.0\.1:5000\/tool:1 names a tag/);

  const plainOnly = farm({}, [new RecordingWorker("plain", [])]);
  const none = await refusal(plainOnly, "127.0.0.1:5000/tool:1");
  assert.equal(none.code, Code.FAILED_PRECONDITION);
  assert.match(none.message, /none of the 1 workers connected to this farm runs container images/);
  const empty = await refusal(farm(), "127.0.0.1:5000/tool:1");
  assert.match(empty.message, /no worker is connected to this farm/);
});

test("with tagPolicy resolve the workers pull the digest the tag names now", async () => {
  const a = new RecordingWorker("a");
  const pulls = farm({ tagPolicy: "resolve" }, [a]);
  const pull = await pulls.start("127.0.0.1:5000/tool:1", () => {});
  const pinned = `127.0.0.1:5000/tool:1@sha256:${"c".repeat(64)}`;
  assert.equal(pull.reference, pinned);
  assert.equal(a.pulls[0]?.reference, pinned);
  pull.stop();
});
