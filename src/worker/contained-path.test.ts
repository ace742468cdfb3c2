import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { SHA256 } from "../digest/functions.js";
import { fileBlob, hashFile, readLocalTree } from "../merkle/local-tree.js";
import { type ContainedPath, ContainedRoot } from "./contained-path.js";

let dir: string;
let root: string;
let outside: string;

before(() => {
  dir = mkdtempSync(join(tmpdir(), "berth-contained-"));
  root = join(dir, "root");
  outside = join(dir, "outside");
  mkdirSync(join(root, "sub", "deeper"), { recursive: true });
  mkdirSync(outside);
  writeFileSync(join(root, "sub", "f"), "inside\n");
  writeFileSync(join(root, "file"), "a file\n");
  writeFileSync(join(outside, "secret"), "outside\n");
  symlinkSync("sub", join(root, "y"));
  symlinkSync("y", join(root, "chain"));
  symlinkSync("loop-b", join(root, "loop-a"));
  symlinkSync("loop-a", join(root, "loop-b"));
  symlinkSync(outside, join(root, "abs"));
  symlinkSync("../outside", join(root, "rel"));
  symlinkSync("../..", join(root, "sub", "up2"));
  symlinkSync("..", join(root, "sub", "up"));
  symlinkSync("new/made", join(root, "dangling"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

/** What ContainedRoot.resolve says, with host paths relative to the root for comparison. */
function where(path: string): string {
  const found: ContainedPath = new ContainedRoot(root).resolve(path);
  if (found.kind === "absent") return "absent";
  if (found.kind === "outside") return `outside: ${found.reason}`;
  const kind = found.stats.isSymbolicLink() ? "link" : found.stats.isDirectory() ? "dir" : "file";
  return `${kind} ${found.hostPath.slice(root.length) || "/"}`;
}

describe("ContainedRoot.resolve", () => {
  test("links inside the root are resolved within it, by hand, and the last component is never followed", () => {
    assert.equal(where("y/f"), "file /sub/f");
    assert.equal(where("chain/f"), "file /sub/f");
    assert.equal(where("sub/up/file"), "file /file");
    assert.equal(where("y"), "link /y");
    assert.equal(where("abs"), "link /abs");
    assert.equal(where("sub/deeper/../f"), "file /sub/f");
    assert.equal(where("y/.."), "dir /");
    assert.equal(where(""), "dir /");
    assert.equal(where("./sub//f"), "file /sub/f");
    // Asked to, the last link is followed too, still only inside.
    assert.equal(new ContainedRoot(root).resolve("chain", true).kind, "present");
    assert.equal((new ContainedRoot(root).resolve("chain", true) as { hostPath: string }).hostPath, join(root, "sub"));
    assert.equal(new ContainedRoot(root).resolve("abs", true).kind, "outside");
  });

  test("absent when nothing is there or a parent is a file", () => {
    assert.equal(where("sub/none"), "absent");
    assert.equal(where("none/f"), "absent");
    assert.equal(where("file/x"), "absent");
    assert.equal(where("dangling/x"), "absent");
  });

  test("refused, naming the link, when an absolute link, a climbing link or the path itself leaves the root", () => {
    assert.equal(
      where("abs/secret"),
      `outside: leads out of the input root through the symbolic link "abs" -> "${outside}", an absolute path`,
    );
    assert.equal(
      where("rel/secret"),
      `outside: climbs above the input root (after the symbolic link "rel" -> "../outside")`,
    );
    assert.equal(
      where("sub/up2/x"),
      `outside: climbs above the input root (after the symbolic link "sub/up2" -> "../..")`,
    );
    assert.equal(where("../x"), "outside: climbs above the input root");
    // Even when the kernel would come back inside: the walk never looks above the root.
    assert.equal(where(`rel/../root/file`).startsWith("outside: climbs above the input root"), true);
    // Nothing is said about what lies outside: a missing file there is refused the same way.
    assert.equal(where("abs/no-such-file").startsWith("outside: leads out of the input root"), true);
  });

  test("a loop of links is refused instead of walked forever", () => {
    assert.match(where("loop-a/x"), /^outside: passes more than 40 symbolic links \(after the symbolic link "loop-/);
  });
});

describe("ContainedRoot.makeDirectories", () => {
  test("makes missing directories, through links that stay inside, and gives them to the owner", () => {
    const owner = { uid: 65534, gid: 65534 };
    new ContainedRoot(root).makeDirectories("dangling/deep", owner);
    new ContainedRoot(root).makeDirectories("sub/up/fresh/er", owner);
    const made = statSync(join(root, "new", "made", "deep"));
    assert.ok(made.isDirectory());
    assert.equal(made.uid, 65534);
    assert.equal(statSync(join(root, "new")).gid, 65534);
    assert.ok(statSync(join(root, "fresh", "er")).isDirectory());
  });

  test("makes nothing through a link out of the root, nor below a file", () => {
    new ContainedRoot(root).makeDirectories("abs/made/x", undefined);
    new ContainedRoot(root).makeDirectories("rel/made/x", undefined);
    new ContainedRoot(root).makeDirectories("abs", undefined);
    new ContainedRoot(root).makeDirectories("file/x", undefined);
    assert.deepEqual(readdirSync(outside), ["secret"]);
    assert.ok(statSync(join(root, "file")).isFile());
  });
});

describe("reading files as root", () => {
  test("a link is never opened, a FIFO never blocks, and a directory's tree keeps links as links and skips FIFOs", async () => {
    await assert.rejects(hashFile(SHA256, join(root, "abs")), /ELOOP/);
    await assert.rejects(fileBlob(SHA256, join(root, "y"), 1024), /ELOOP/);
    const fifo = join(root, "sub", "deeper", "fifo");
    execFileSync("mkfifo", [fifo]);
    await assert.rejects(hashFile(SHA256, fifo), /not a regular file/);
    symlinkSync(join(outside, "secret"), join(root, "sub", "deeper", "s"));
    const tree = await readLocalTree(SHA256, join(root, "sub"));
    const deeper = tree.children.find((c) => c.symlinks.length > 0);
    assert.deepEqual(
      deeper?.symlinks.map((s) => [s.name, s.target]),
      [["s", join(outside, "secret")]],
    );
    assert.deepEqual(deeper?.files, []);
    assert.equal(tree.blobs.filter((b) => "path" in b && b.path.includes("outside")).length, 0);
  });

  test("a regular file is hashed from the descriptor opened: small ones in one read, large ones in chunks", async () => {
    const { digest, info } = await hashFile(SHA256, join(root, "sub", "f"));
    assert.equal(digest.sizeBytes, 7);
    assert.ok(info.isFile());
    const big = join(root, "big");
    writeFileSync(big, Buffer.alloc(3 * 1024 * 1024 + 5, 7));
    const hashed = await hashFile(SHA256, big);
    const kept = await fileBlob(SHA256, big, 4 * 1024 * 1024);
    assert.equal(hashed.digest.sizeBytes, 3 * 1024 * 1024 + 5);
    assert.equal(hashed.digest.hash, kept.blob.digest.hash);
    assert.ok("data" in kept.blob && kept.blob.data.length === 3 * 1024 * 1024 + 5);
  });
});

describe("absolute links into the root, as the action sees it", () => {
  /** Where these tests' action sees its input root. */
  const SEEN = "/run/berth/execroot";
  let seen: string;
  before(() => {
    seen = join(dir, "seen");
    mkdirSync(join(seen, "dir", "sub"), { recursive: true });
    writeFileSync(join(seen, "dir", "foo"), "foo\n");
    symlinkSync("foo", join(seen, "dir", "rel"));
    symlinkSync(`${SEEN}/dir/foo`, join(seen, "a"));
    symlinkSync(`${SEEN}/dir`, join(seen, "ad"));
    symlinkSync(`${SEEN}//./a`, join(seen, "chain"));
    symlinkSync(SEEN, join(seen, "top"));
    symlinkSync("/etc/shadow", join(seen, "shadow"));
    symlinkSync(`${SEEN}/../../etc`, join(seen, "climb"));
    symlinkSync(`${SEEN}/dir/../../../etc/shadow`, join(seen, "climb-later"));
    symlinkSync(`${SEEN}2/dir/foo`, join(seen, "prefix"));
    symlinkSync("/run/berth/../berth/execroot/dir/foo", join(seen, "dotted"));
    symlinkSync(`${SEEN}/shadow`, join(seen, "chain-out"));
    symlinkSync(`${SEEN}/climb`, join(seen, "chain-climb"));
    symlinkSync(outside, join(seen, "host-path"));
    symlinkSync(`${SEEN}/loop`, join(seen, "loop"));
  });

  const target = (path: string, as = SEEN): string => {
    const found = new ContainedRoot(seen, { seenAs: as }).resolveTarget(path);
    if (found.kind !== "present") return found.kind === "outside" ? `outside: ${found.reason}` : "absent";
    return `${found.stats.isDirectory() ? "dir" : "file"} ${found.hostPath.slice(seen.length) || "/"}`;
  };

  test("are walked from the root, by hand, through any links that stay inside", () => {
    assert.equal(target(`${SEEN}/a`), "file /dir/foo");
    assert.equal(target(`${SEEN}/ad`), "dir /dir");
    assert.equal(target(`${SEEN}/chain`), "file /dir/foo");
    assert.equal(target(`${SEEN}/top/ad/rel`), "file /dir/foo");
    assert.equal(target(SEEN), "dir /");
    assert.equal(target(`${SEEN}/dir/none`), "absent");
    // On the way to an output too, before and after the command.
    const root = new ContainedRoot(seen, { seenAs: SEEN });
    assert.equal((root.resolve("ad/foo") as { hostPath: string }).hostPath, join(seen, "dir", "foo"));
    root.makeDirectories("ad/made", undefined);
    assert.ok(statSync(join(seen, "dir", "made")).isDirectory());
  });

  test("never lead to a host file: outside the mount point, climbing above it, or a chain that ends outside", () => {
    assert.match(target("/etc/shadow"), /^outside: "\/etc\/shadow" is an absolute path outside the input root$/);
    assert.match(target(`${SEEN}/shadow`), /^outside: leads out of the input root through the symbolic link "shadow"/);
    assert.match(target(`${SEEN}/climb`), /^outside: climbs above the input root/);
    assert.match(target(`${SEEN}/climb-later`), /^outside: climbs above the input root/);
    assert.match(target(`${SEEN}/../../etc/shadow`), /^outside: climbs above the input root/);
    assert.match(target(`${SEEN}2/dir/foo`), /^outside: .* outside the input root$/);
    assert.match(target("/run/berth/../berth/execroot/dir/foo"), /^outside: .* outside the input root$/);
    assert.match(target(`${SEEN}/chain-out`), /^outside: leads out of the input root/);
    assert.match(target(`${SEEN}/chain-climb`), /^outside: climbs above the input root/);
    assert.match(target(`${SEEN}/host-path/secret`), /^outside: leads out of the input root/);
    assert.match(target(`${SEEN}/loop`), /^outside: passes more than 40 symbolic links/);
    // Without a mount point, as before, every absolute target leads out.
    assert.match(new ContainedRoot(seen).resolve("a/x").kind, /^outside$/);
    assert.equal(new ContainedRoot(seen).resolveTarget(`${SEEN}/a`).kind, "outside");
    // A root that is the action's whole file system: /etc/shadow is the root's own (absent here), never the host's.
    assert.equal(target("/etc/shadow", "/"), "absent");
    assert.equal(target("/dir/foo", "/"), "file /dir/foo");
    assert.match(target("/../etc/shadow", "/"), /^outside: climbs above the input root/);
  });

  test("a tree read with them follows those into the root, keeps the others, and stops at a link to an ancestor", async () => {
    const out = join(seen, "out");
    mkdirSync(out);
    writeFileSync(join(out, "own"), "own\n");
    symlinkSync(`${SEEN}/dir/foo`, join(out, "abs-file"));
    symlinkSync(`${SEEN}/dir`, join(out, "abs-dir"));
    symlinkSync(`${SEEN}/dir`, join(out, "abs-dir-again"));
    symlinkSync(`${SEEN}/out`, join(out, "self"));
    symlinkSync("/etc/shadow", join(out, "host"));
    symlinkSync(`${SEEN}/shadow`, join(out, "via"));
    symlinkSync("../dir/foo", join(out, "relative"));
    const root = new ContainedRoot(seen, { seenAs: SEEN });
    const tree = await readLocalTree(SHA256, out, (t) => {
      const found = root.resolveTarget(t);
      return found.kind === "present" ? found : undefined;
    });
    assert.deepEqual(
      tree.root.files.map((f) => f.name),
      ["abs-file", "own"],
    );
    assert.deepEqual(
      tree.root.directories.map((d) => d.name),
      ["abs-dir", "abs-dir-again"],
    );
    assert.deepEqual(
      tree.root.symlinks.map((s) => [s.name, s.target]),
      [
        ["host", "/etc/shadow"],
        ["relative", "../dir/foo"],
        ["self", `${SEEN}/out`],
        ["via", `${SEEN}/shadow`],
      ],
    );
    // The directory both links lead to is read once: one child, its own relative link kept.
    assert.equal(tree.root.directories[0]?.digest?.hash, tree.root.directories[1]?.digest?.hash);
    const child = tree.children.find((c) => c.files.some((f) => f.name === "foo"));
    assert.deepEqual(
      child?.symlinks.map((s) => [s.name, s.target]),
      [["rel", "foo"]],
    );
    assert.equal(tree.blobs.filter((b) => "path" in b && b.path === join(seen, "dir", "foo")).length, 1);
  });
});
