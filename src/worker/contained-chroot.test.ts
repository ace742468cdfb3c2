import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { ContainedRoot } from "./contained-path.js";

/**
 * ContainedRoot for an action whose input root is its "/": every path the
 * action's links name is a path in the input root, and nothing leads out.
 */

let dir: string;
let root: string;
let outside: string;

before(() => {
  dir = mkdtempSync(join(tmpdir(), "berth-contained-chroot-"));
  root = join(dir, "root");
  outside = join(dir, "outside");
  mkdirSync(join(root, "etc"), { recursive: true });
  mkdirSync(join(root, "proc"));
  mkdirSync(join(root, "work", "deep"), { recursive: true });
  mkdirSync(join(outside, "etc"), { recursive: true });
  writeFileSync(join(root, "etc", "shadow"), "the root's own\n");
  writeFileSync(join(outside, "etc", "shadow"), "outside\n");
  symlinkSync("/etc", join(root, "work", "etc"));
  symlinkSync("/etc/shadow", join(root, "work", "shadow"));
  symlinkSync("../../../../../../../../..", join(root, "work", "up"));
  symlinkSync("/proc/self/root", join(root, "work", "self"));
  symlinkSync(outside, join(root, "work", "host"));
  symlinkSync(`..${outside}`, join(root, "work", "climb"));
  symlinkSync("/work/deep", join(root, "work", "deep-abs"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

function where(path: string, followLast = false): string {
  const found = new ContainedRoot(root, { chroot: true }).resolve(path, followLast);
  if (found.kind === "absent") return "absent";
  if (found.kind === "outside") return `outside: ${found.reason}`;
  const kind = found.stats.isSymbolicLink() ? "link" : found.stats.isDirectory() ? "dir" : "file";
  return `${kind} ${found.hostPath.slice(root.length) || "/"}`;
}

describe("ContainedRoot with chroot", () => {
  test("an absolute link is a path in the root: /etc/shadow is the root's own", () => {
    assert.equal(where("work/etc/shadow"), "file /etc/shadow");
    assert.equal(where("work/shadow", true), "file /etc/shadow");
    assert.equal(where("work/shadow"), "link /work/shadow");
    assert.equal(where("work/deep-abs/../etc/shadow"), "file /etc/shadow");
    // The host path of the outside directory, named absolutely, is looked for in the root: nothing there.
    assert.equal(where("work/host/etc/shadow"), "absent");
  });

  test(".. beyond / stays at /, as the kernel resolves it in a chroot", () => {
    assert.equal(where("work/up/etc/shadow"), "file /etc/shadow");
    assert.equal(where("../../../etc/shadow"), "file /etc/shadow");
    assert.equal(where("work/climb/etc/shadow"), "absent");
    assert.equal(where("work/up"), "link /work/up");
    assert.equal(where("work/up", true), "dir /");
  });

  test("/proc/self/root is the root's own (empty) /proc: nothing", () => {
    assert.equal(where("work/self/etc/shadow"), "absent");
    assert.equal(where("work/self", true), "absent");
  });

  test("directories are made through absolute links inside the root, never outside it", () => {
    const contained = new ContainedRoot(root, { chroot: true });
    contained.makeDirectories("work/host/made", undefined);
    contained.makeDirectories("work/etc/made-in-etc", undefined);
    contained.makeDirectories("work/up/tmp/made", undefined);
    assert.equal(existsSync(join(outside, "made")), false);
    assert.equal(existsSync(join(root, dir.slice(1), "outside", "made")), true);
    assert.equal(existsSync(join(root, "etc", "made-in-etc")), true);
    assert.equal(existsSync(join(root, "tmp", "made")), true);
  });

  test("without chroot the same links lead out and are refused", () => {
    const plain = new ContainedRoot(root);
    assert.equal(plain.resolve("work/etc/shadow").kind, "outside");
    assert.equal(plain.resolve("work/up/etc/shadow").kind, "outside");
  });
});
