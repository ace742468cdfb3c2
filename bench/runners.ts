/**
 * How much of a /bin/true action is the sandbox's making: today's one-shot BubblewrapSandbox.run against a
 * resident sandbox (src/sandbox/resident-sandbox.ts) made ahead and used once, the same resident sandbox
 * reused for every command (a warm runner), and the floor, /bin/true forked by a process already running
 * inside a sandbox. Everything runs in the benchmark's own process, side by side, round by round.
 */
import { execFileSync } from "node:child_process";
import { chown, mkdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { BubblewrapSandbox } from "../src/sandbox/bubblewrap.js";
import { type ResidentSandbox, startResidentSandbox } from "../src/sandbox/resident-sandbox.js";
import type { BenchContext } from "./context.js";
import { ratio, type Section, verdictAtMost } from "./report.js";
import { NOBODY, PATH } from "./sandbox-helper.js";
import { elapsedMs, fmt, fmtList, median, percentile } from "./stats.js";

const RUNS = 200;
const WARMUP = 20;
/** Issue #14's targets: a sandbox made ahead ≤ 0.6× a fresh one; a warm one within 3 ms of the floor at p50. */
const AHEAD_TARGET = 0.6;
const WARM_TARGET_MS = 3;
/**
 * A pause between two timed runs: the kernel tears a sandbox's namespaces down after its last process is gone
 * (a network namespace's cleanup runs later, in a kernel worker), and that work must not land in the next
 * run's time, whichever kind it is.
 */
const SETTLE_MS = 15;
const SPAWN_FLOOR_SOURCE = fileURLToPath(new URL("../../bench/spawn-floor.c", import.meta.url));

/**
 * The perl agent's way, for comparison with the floor: fork, exec /bin/true, wait, `count` times, each timed
 * by the same process with Time::HiRes after the same pause; prints the milliseconds, one a line.
 */
const PERL_FORK_SCRIPT =
  "use Time::HiRes qw(time sleep); my @ms; for (1 .. $ARGV[0]) { sleep($ARGV[1] / 1000); my $t = time; my $p = fork; " +
  'if ($p == 0) { exec { "/bin/true" } "/bin/true"; POSIX::_exit(127) } waitpid($p, 0); ' +
  'die "true failed\\n" if $?; push @ms, (time - $t) * 1000 } print "$_\\n" for @ms;';

export async function benchRunners(ctx: BenchContext): Promise<Section> {
  const dir = join(ctx.scratchDir, "runners");
  await mkdir(dir, { recursive: true });
  const inputRoot = async (name: string) => {
    const root = join(dir, name);
    await mkdir(root);
    await chown(root, NOBODY, NOBODY);
    return root;
  };
  const freshRoot = await inputRoot("fresh");
  const warmRoot = await inputRoot("warm");
  const fresh = new BubblewrapSandbox();
  const output = { stdoutPath: join(dir, "out"), stderrPath: join(dir, "err") };
  const command = { workingDirectory: "", argv: ["/bin/true"], env: [PATH], timeoutMs: 60_000, ...output };
  const check = (exitCode: number, what: string) => {
    if (exitCode !== 0) throw new Error(`/bin/true in ${what} exited with ${exitCode}`);
  };

  const freshRun = async () => {
    const start = process.hrtime.bigint();
    const result = await fresh.run({ ...command, inputRoot: freshRoot });
    const took = elapsedMs(start);
    check(result.exitCode, "a fresh sandbox");
    return took;
  };
  // Made ahead: started before the clock, used for one command, closed after it.
  let made = 0;
  const makeAhead = async (): Promise<ResidentSandbox> => {
    const n = made++;
    return startResidentSandbox({ inputRoot: await inputRoot(`ahead-${n}`), stateDir: join(dir, `ahead-${n}.state`) });
  };
  let next = makeAhead();
  const aheadRun = async () => {
    const sandbox = await next;
    const start = process.hrtime.bigint();
    const result = await sandbox.run(command);
    const took = elapsedMs(start);
    check(result.exitCode, "a sandbox made ahead");
    // The next one is made now, off the clock and before the next command of any kind, which it would slow.
    await sandbox.close();
    next = makeAhead();
    await next;
    return took;
  };
  const warm = await startResidentSandbox({ inputRoot: warmRoot, stateDir: join(dir, "warm.state") });
  ctx.defer(() => warm.close());
  const warmRun = async () => {
    const start = process.hrtime.bigint();
    const result = await warm.run(command);
    const took = elapsedMs(start);
    check(result.exitCode, "the warm sandbox");
    return took;
  };
  // The floor's program, compiled into the input root of the sandbox it runs in.
  execFileSync("cc", ["-O2", "-o", join(freshRoot, "spawn-floor"), SPAWN_FLOOR_SOURCE]);
  const floorRuns = async (count: number, how: "spawn" | "perl-fork" = "spawn"): Promise<number[]> => {
    const argv =
      how === "spawn"
        ? ["./spawn-floor", String(count), String(SETTLE_MS)]
        : ["/usr/bin/perl", "-MPOSIX", "-e", PERL_FORK_SCRIPT, String(count), String(SETTLE_MS)];
    const result = await fresh.run({ ...command, inputRoot: freshRoot, argv });
    check(result.exitCode, "the floor's sandbox");
    const lines = (await readFile(output.stdoutPath, "utf8")).trim().split("\n");
    return lines.map(Number);
  };

  for (let i = 0; i < WARMUP; i++) {
    await freshRun();
    await aheadRun();
    await warmRun();
  }
  await floorRuns(WARMUP);
  await floorRuns(WARMUP, "perl-fork");
  const times = { fresh: [] as number[], ahead: [] as number[], warm: [] as number[], floor: [] as number[] };
  const perlForks: number[] = [];
  const roundP50s = { fresh: [] as number[], ahead: [] as number[], warm: [] as number[], floor: [] as number[] };
  const perRound = Math.ceil(RUNS / ctx.rounds);
  for (let round = 0; round < ctx.rounds; round++) {
    const from = { fresh: times.fresh.length, ahead: times.ahead.length, warm: times.warm.length };
    // The floor first in even rounds, last in odd ones; the three others interleaved run by run.
    if (round % 2 === 0) {
      times.floor.push(...(await floorRuns(perRound)));
      perlForks.push(...(await floorRuns(perRound, "perl-fork")));
    }
    for (let i = 0; i < perRound; i++) {
      times.fresh.push(await freshRun());
      await sleep(SETTLE_MS);
      times.ahead.push(await aheadRun());
      await sleep(SETTLE_MS);
      times.warm.push(await warmRun());
      await sleep(SETTLE_MS);
    }
    if (round % 2 === 1) {
      perlForks.push(...(await floorRuns(perRound, "perl-fork")));
      times.floor.push(...(await floorRuns(perRound)));
    }
    roundP50s.fresh.push(median(times.fresh.slice(from.fresh)));
    roundP50s.ahead.push(median(times.ahead.slice(from.ahead)));
    roundP50s.warm.push(median(times.warm.slice(from.warm)));
    roundP50s.floor.push(median(times.floor.slice(round * perRound)));
  }
  await (await next).close();

  const p50 = {
    fresh: median(times.fresh),
    ahead: median(times.ahead),
    warm: median(times.warm),
    floor: median(times.floor),
  };
  const p90 = (values: number[]) => fmt(percentile(values, 90));
  ctx.log(
    `  /bin/true p50: fresh ${fmt(p50.fresh)} ms, made ahead ${fmt(p50.ahead)} ms, warm ${fmt(p50.warm)} ms, ` +
      `floor ${fmt(p50.floor)} ms`,
  );
  return {
    title: "Runners: /bin/true in a fresh sandbox, a sandbox made ahead, a warm sandbox, and the floor",
    setup: [
      "Everything in the benchmark's own process, with the sandbox library directly (no server): the cost of " +
        "the sandbox alone, which is what issue #14's runners remove from an action's critical path.",
      "(a) Fresh: `BubblewrapSandbox.run` of `/bin/true` (PATH=/usr/bin:/bin, host root, empty input root), as " +
        "every action runs today: the launcher forks, bwrap makes the namespaces and mounts, runs the command, " +
        "and the sandbox's end is awaited.",
      "(b) Made ahead: a resident sandbox (src/sandbox/resident-sandbox.ts: bwrap with its C agent, " +
        "src/sandbox/agent.c, as its pid 1) is started before the clock, with its input root bound while still empty; the clock covers " +
        "`run(/bin/true)` only: the request to the agent over a pipe, its memory-sharing clone and exec, the exit " +
        "report and the move of the output files. Each sandbox runs one command and is closed after the clock stops, as a " +
        "worker's sandboxes made ahead would be used.",
      "(c) Warm: one resident sandbox, started once, runs every command (a warm runner).",
      "(d) Floor: `/bin/true` started with posix_spawn (glibc's vfork-like clone, the cheapest start there " +
        "is) and waited for by a small C program already running inside a one-shot sandbox " +
        "(bench/spawn-floor.c, compiled by the benchmark), which times each run itself and prints the times; it " +
        "pauses as long between two runs as the others do, so that each of the four starts from the same idle " +
        "machine. For comparison, the same loop as a perl process's fork and exec (the way of the perl agent " +
        "that the C agent replaced) runs beside the floor in every round.",
      `${RUNS} runs of each after ${WARMUP} of warm-up, in ${ctx.rounds} rounds; (a), (b) and (c) interleaved ` +
        `run by run with ${SETTLE_MS} ms between two runs (the kernel tears namespaces down after a sandbox ` +
        "ends, partly in a kernel worker, which would otherwise weigh on the next run), the floor's block of " +
        "each round first in even rounds and last in odd ones.",
    ],
    rows: [
      {
        metric: "Made ahead (b) vs fresh (a), p50",
        berth: `${fmt(p50.ahead)} ms`,
        reference: `${fmt(p50.fresh)} ms (fresh)`,
        ratio: ratio(p50.ahead, p50.fresh),
        target: `≤ ${AHEAD_TARGET}× fresh`,
        verdict: verdictAtMost(p50.ahead / p50.fresh, AHEAD_TARGET),
      },
      {
        metric: "Warm (c) vs floor (d), p50",
        berth: `${fmt(p50.warm)} ms`,
        reference: `${fmt(p50.floor)} ms (floor)`,
        ratio: `+${fmt(p50.warm - p50.floor)} ms`,
        target: `≤ floor + ${WARM_TARGET_MS} ms`,
        verdict: verdictAtMost(p50.warm - p50.floor, WARM_TARGET_MS),
      },
    ],
    notes: [
      `p90: fresh ${p90(times.fresh)} ms, made ahead ${p90(times.ahead)} ms, warm ${p90(times.warm)} ms, ` +
        `floor ${p90(times.floor)} ms.`,
      `perl's fork and exec, p50: ${fmt(median(perlForks))} ms (the floor: ${fmt(p50.floor)} ms).`,
      `Per round p50, ms: fresh ${fmtList(roundP50s.fresh)}; made ahead ${fmtList(roundP50s.ahead)}; ` +
        `warm ${fmtList(roundP50s.warm)}; floor ${fmtList(roundP50s.floor)}.`,
    ],
  };
}
