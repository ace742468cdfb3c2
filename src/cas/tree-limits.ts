import { type Digest, digestKey, parseDigest } from "../digest/digest.js";
import type { DigestFunction } from "../digest/functions.js";
import type { Directory } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code, invalidArgument, StatusError } from "../status/status.js";

/**
 * Bounds on what one action's input tree may expand to, checked before
 * anything is laid out. Directory messages are content-addressed, so a few
 * of them can name each other many times over (a DAG of 23 messages
 * expands to millions of entries): the totals count every occurrence, as
 * laying the tree out would.
 */
export interface InputTreeLimits {
  /** Files, directories and symlinks of the expanded tree, the root not counted. */
  maxEntries: number;
  /** Directory levels below the input root. */
  maxDepth: number;
  /** Sizes of the files of the expanded tree summed (a file named twice counts twice). */
  maxTotalBytes: number;
  /** Distinct Directory messages, each read and checked once. */
  maxDirectoryBlobs: number;
  /** Bytes of one Directory message: a larger one is refused before it is read. */
  maxDirectoryBytes: number;
  /** Bytes of the distinct Directory messages summed: what checking or laying out the tree holds in memory. */
  maxTotalDirectoryBytes: number;
}

/**
 * Generous for real builds: the largest Bazel actions (linking a browser,
 * type-checking a node_modules tree) name a few hundred thousand inputs in a
 * few tens of thousands of directories, rarely more than 30 levels deep;
 * 1,000,000 entries still lay out in well under a minute and plan in about
 * 200 MB of a worker's memory. 256 levels is far past real trees and far
 * below what Linux's PATH_MAX allows. 64 GiB is more input than any worker
 * disk this farm targets would hold for one action. A Directory of 100,000
 * files is about 10 MiB; 1,000,000 entries with long names are about 250 MB
 * of Directory messages.
 */
export const DEFAULT_INPUT_TREE_LIMITS: InputTreeLimits = {
  maxEntries: 1_000_000,
  maxDepth: 256,
  maxTotalBytes: 64 * 1024 ** 3,
  maxDirectoryBlobs: 250_000,
  // Below cas.maxBatchTotalSizeBytes' default (4032 KiB): workers fetch Directory messages through GetTree and
  // BatchReadBlobs, whose responses that caps, so a larger one could pass Execute and never reach a worker.
  maxDirectoryBytes: 4000 * 1024,
  maxTotalDirectoryBytes: 256 * 1024 * 1024,
};

/** The configuration key of each limit, named in refusals so an operator knows what to raise. */
export const INPUT_TREE_LIMIT_KEYS: Record<keyof InputTreeLimits, string> = {
  maxEntries: "execution.inputLimits.maxEntries",
  maxDepth: "execution.inputLimits.maxDepth",
  maxTotalBytes: "execution.inputLimits.maxTotalBytes",
  maxDirectoryBlobs: "execution.inputLimits.maxDirectoryBlobs",
  maxDirectoryBytes: "execution.inputLimits.maxDirectoryBytes",
  maxTotalDirectoryBytes: "execution.inputLimits.maxTotalDirectoryBytes",
};

/**
 * Paths of the input tree longer than this (in bytes, relative to the input
 * root) are refused: the worker lays the tree out below its own directory
 * (some hundred bytes) and Linux refuses paths of 4096 bytes or more with
 * ENAMETOOLONG.
 */
export const MAX_INPUT_PATH_BYTES = 3072;

/** What an input tree expands to. */
export interface TreeTotals {
  entries: number;
  depth: number;
  bytes: number;
  /** Bytes of the longest path below the root (names joined by "/"). */
  pathBytes: number;
}

/** The refusal of a tree over `limit`: FAILED_PRECONDITION naming the limit and its key. */
export function inputLimitExceeded(limit: keyof InputTreeLimits, limits: InputTreeLimits, what: string): StatusError {
  const key = INPUT_TREE_LIMIT_KEYS[limit];
  const message = `the input root ${what}, more than this farm's limit of ${limits[limit]} (${key})`;
  return new StatusError(Code.FAILED_PRECONDITION, message, {
    preconditionFailures: [{ type: "INPUT_TREE_LIMIT", subject: key, description: message }],
  });
}

/** What the subtree below one Directory expands to, and where its longest path goes. */
export interface SubtreeTotals {
  readonly entries: number;
  readonly depth: number;
  readonly bytes: number;
  readonly pathBytes: number;
  /** The child directory on the longest path (index into directories), -1 when the longest is a file or link. */
  readonly longestChild: number;
  readonly longestName: string;
}

/**
 * A Directory measured before (Directory messages are content-addressed, so
 * its totals hold for good): its totals and its child directories' digests,
 * in the order of its `directories`.
 */
export interface MeasuredSubtree {
  readonly totals: SubtreeTotals;
  readonly children: readonly { readonly digest: Digest }[];
}

/** Subtrees measured before, and who wants to hear of the ones measured now. */
export interface TreeMeasureMemo {
  /** A subtree measured before: it is neither looked up nor walked into. */
  known?: (key: string) => MeasuredSubtree | undefined;
  /** Called with each Directory measured now (all of them valid and acyclic), before any limit is compared. */
  onMeasured?: (key: string, totals: SubtreeTotals) => void;
}

type Measure = { -readonly [K in keyof SubtreeTotals]: SubtreeTotals[K] };

/**
 * Measures the tree at `root` whose Directory messages `lookup` returns (all
 * of them must be there), without recursion: an explicit stack visits each
 * distinct Directory once and the totals of a directory are computed from
 * its children's, so a DAG that expands to 2^1000 entries is measured in as
 * many steps as it has messages. Numbers past 2^53 lose precision and turn
 * into Infinity, which still compares as over every limit. Throws the
 * refusal of the first limit passed; a path too long is INVALID_ARGUMENT
 * naming it.
 */
export function checkTreeLimits(
  fn: DigestFunction,
  root: Digest,
  lookup: (key: string) => Directory | undefined,
  limits: InputTreeLimits,
  memo: TreeMeasureMemo = {},
): TreeTotals {
  const measured = new Map<string, SubtreeTotals>();
  const onStack = new Set<string>();
  const stack: { digest: Digest; key: string; expanded: boolean }[] = [
    { digest: root, key: digestKey(root), expanded: false },
  ];
  while (stack.length > 0) {
    const top = stack[stack.length - 1] as (typeof stack)[number];
    if (measured.has(top.key)) {
      stack.pop();
      continue;
    }
    const prior = memo.known?.(top.key);
    if (prior) {
      measured.set(top.key, prior.totals);
      stack.pop();
      continue;
    }
    const directory = lookup(top.key);
    if (!directory) throw new StatusError(Code.INTERNAL, `directory ${top.key} was not read before it was measured`);
    if (!top.expanded) {
      top.expanded = true;
      onStack.add(top.key);
      if (onStack.size > limits.maxDepth + 1) {
        throw inputLimitExceeded("maxDepth", limits, `is more than ${limits.maxDepth} directories deep`);
      }
      for (const [i, child] of directory.directories.entries()) {
        const digest = parseDigest(fn, child.digest, `directory ${top.key} directories[${i}].digest`);
        const key = digestKey(digest);
        if (onStack.has(key)) throw invalidArgument(`directory ${top.key}`, "contains itself");
        if (!measured.has(key)) stack.push({ digest, key, expanded: false });
      }
      continue;
    }
    stack.pop();
    onStack.delete(top.key);
    const totals = measure(fn, directory, measured);
    measured.set(top.key, totals);
    memo.onMeasured?.(top.key, totals);
  }
  const totals = measured.get(digestKey(root)) as SubtreeTotals;
  if (totals.depth > limits.maxDepth) {
    throw inputLimitExceeded("maxDepth", limits, `is ${totals.depth} directories deep`);
  }
  if (totals.entries > limits.maxEntries) {
    throw inputLimitExceeded("maxEntries", limits, `expands to ${describeCount(totals.entries)} entries`);
  }
  if (totals.bytes > limits.maxTotalBytes) {
    throw inputLimitExceeded("maxTotalBytes", limits, `expands to ${describeCount(totals.bytes)} bytes of files`);
  }
  if (totals.pathBytes > MAX_INPUT_PATH_BYTES) {
    const path = longestPath(fn, root, lookup, measured, memo);
    throw invalidArgument(
      `input path ${path.length > 200 ? `${path.slice(0, 100)}…${path.slice(-100)}` : path}`,
      `is ${totals.pathBytes} bytes long; this farm lays out paths of at most ${MAX_INPUT_PATH_BYTES} bytes`,
    );
  }
  return { entries: totals.entries, depth: totals.depth, bytes: totals.bytes, pathBytes: totals.pathBytes };
}

function measure(fn: DigestFunction, directory: Directory, measured: ReadonlyMap<string, SubtreeTotals>): Measure {
  const m: Measure = { entries: 0, depth: 0, bytes: 0, pathBytes: 0, longestChild: -1, longestName: "" };
  const leaf = (name: string) => {
    const bytes = Buffer.byteLength(name);
    if (bytes > m.pathBytes) {
      m.pathBytes = bytes;
      m.longestChild = -1;
      m.longestName = name;
    }
  };
  for (const file of directory.files) {
    m.entries++;
    // Validated later, where the file is used; an unreadable size counts as nothing here.
    m.bytes += file.digest?.sizeBytes ?? 0;
    leaf(file.name);
  }
  for (const link of directory.symlinks) {
    m.entries++;
    leaf(link.name);
  }
  for (const [i, child] of directory.directories.entries()) {
    const below = measured.get(digestKey(parseDigest(fn, child.digest, "directory"))) as SubtreeTotals;
    m.entries += 1 + below.entries;
    m.bytes += below.bytes;
    m.depth = Math.max(m.depth, 1 + below.depth);
    const pathBytes = Buffer.byteLength(child.name) + (below.pathBytes > 0 ? 1 + below.pathBytes : 0);
    if (pathBytes > m.pathBytes) {
      m.pathBytes = pathBytes;
      m.longestChild = i;
      m.longestName = child.name;
    }
  }
  return m;
}

/**
 * The longest path below `root`, followed down the children measure() chose
 * (and, below a subtree measured before, the children it chose then).
 */
function longestPath(
  fn: DigestFunction,
  root: Digest,
  lookup: (key: string) => Directory | undefined,
  measured: ReadonlyMap<string, SubtreeTotals>,
  memo: TreeMeasureMemo,
): string {
  const parts: string[] = [];
  let key = digestKey(root);
  for (;;) {
    const prior = memo.known?.(key);
    const m = measured.get(key) ?? prior?.totals;
    if (!m) {
      // Below a remembered subtree whose own children were forgotten since: the path is cut short.
      parts.push("…");
      break;
    }
    parts.push(m.longestName);
    if (m.longestChild < 0) break;
    const child = prior
      ? prior.children[m.longestChild]?.digest
      : parseDigest(fn, lookup(key)?.directories[m.longestChild]?.digest, "directory");
    if (!child) break;
    key = digestKey(child);
  }
  return parts.join("/");
}

function describeCount(n: number): string {
  return Number.isFinite(n) && n < 1e15 ? String(n) : "more than 10^15";
}
