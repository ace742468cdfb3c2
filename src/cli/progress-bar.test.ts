import assert from "node:assert/strict";
import { Writable } from "node:stream";
import { test } from "node:test";
import { type PullFigures, renderPullProgress, StatusLine } from "./progress-bar.js";

const figures = (overrides: Partial<PullFigures> = {}): PullFigures => ({
  bytesDone: 0,
  bytesTotal: 0,
  layersDone: 0,
  layersTotal: 0,
  workersFinished: 0,
  workersTotal: 2,
  ...overrides,
});

test("the bar shows the fraction of bytes, MB done and total, layers and workers", () => {
  const line = renderPullProgress(
    figures({ bytesDone: 5_250_000, bytesTotal: 21_000_000, layersDone: 1, layersTotal: 4, workersFinished: 1 }),
    100,
  );
  assert.equal(line, `[${"#".repeat(10)}${"-".repeat(30)}]  25%  5.3/21.0 MB  layers 1/4  workers 1/2`);
});

test("a finished pull fills the bar; one with nothing to download is full once every worker has finished", () => {
  const full = renderPullProgress(figures({ bytesDone: 8e6, bytesTotal: 8e6, workersFinished: 2 }), 100);
  assert.match(full, /^\[#{40}\] 100% {2}8\.0\/8\.0 MB/);
  assert.match(renderPullProgress(figures({ workersFinished: 1 }), 100), /^\[-{40}\] {3}0%/);
  assert.match(renderPullProgress(figures({ workersFinished: 2 }), 100), /^\[#{40}\] 100%/);
});

test("the line never reaches the terminal's last column: the bar shrinks, then goes", () => {
  const busy = figures({ bytesDone: 1e6, bytesTotal: 2e6, layersDone: 1, layersTotal: 2 });
  for (const columns of [100, 60, 50, 45, 30, 10]) {
    const line = renderPullProgress(busy, columns);
    assert.ok(line.length <= columns - 1, `${columns}: ${line}`);
  }
  const narrow = renderPullProgress(busy, 60);
  assert.match(narrow, /^\[#+-+\] {2}50%/);
  assert.equal(narrow.length, 59);
  assert.doesNotMatch(renderPullProgress(busy, 45), /\[/);
});

test("the status line redraws in place and erases itself", () => {
  let written = "";
  const out = new Writable({
    write(chunk, _encoding, done) {
      written += String(chunk);
      done();
    },
  });
  const line = new StatusLine(out);
  line.clear();
  assert.equal(written, "");
  line.draw("first, longer");
  line.draw("second");
  line.clear();
  assert.equal(written, "\rfirst, longer\x1b[K\rsecond\x1b[K\r\x1b[K");
});

test("an expansion's bar (the server's work, no workers) shows bytes and layers only", () => {
  const expanding = { bytesDone: 3e6, bytesTotal: 12e6, layersDone: 1, layersTotal: 2 };
  assert.equal(renderPullProgress(expanding, 80), `[${"#".repeat(10)}${"-".repeat(30)}]  25%  3.0/12.0 MB  layers 1/2`);
  // Nothing to download (every layer expanded before): full once the layers are done.
  assert.match(
    renderPullProgress({ bytesDone: 0, bytesTotal: 0, layersDone: 2, layersTotal: 2 }, 80),
    /^\[#{40}\] 100%/,
  );
  assert.match(
    renderPullProgress({ bytesDone: 0, bytesTotal: 0, layersDone: 1, layersTotal: 2 }, 80),
    /^\[-{40}\] {3}0%/,
  );
});
