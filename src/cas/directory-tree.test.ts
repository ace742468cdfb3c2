import assert from "node:assert/strict";
import { test } from "node:test";
import { sha256 } from "../../test/support/blobs.js";
import { SHA256 } from "../digest/functions.js";
import { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { checkDirectory } from "./directory-tree.js";

const digest = { fn: SHA256, ...sha256("a directory") };
const withNames = (...names: string[]) =>
  Directory.fromPartial({ symlinks: names.map((name) => ({ name, target: "t" })) });

test("names are sorted by their UTF-8 bytes, also past the BMP, where UTF-16 order differs", () => {
  // U+FFFF is EF BF BF and U+10000 is F0 90 80 80 in UTF-8, but U+10000 is D800 DC00 in UTF-16.
  checkDirectory(withNames("a", "b", "é", "\uffff", "\u{10000}"), digest);
  assert.throws(() => checkDirectory(withNames("\u{10000}", "\uffff"), digest), /not sorted/);
  assert.throws(() => checkDirectory(withNames("ab", "a"), digest), /not sorted/);
  assert.throws(() => checkDirectory(withNames("a", "a"), digest), /not sorted/);
});
