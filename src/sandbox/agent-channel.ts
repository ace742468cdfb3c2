import { constants as fsConstants, openSync, readFileSync, rmSync } from "node:fs";
import { Socket } from "node:net";
import { join } from "node:path";
import type { Launcher } from "../process/launcher.js";

/** One command for the agent; the paths are as the agent sees them. */
export interface AgentCommand {
  stdin: string;
  stdout: string;
  stderr: string;
  cwd: string;
  argv: string[];
  env: { name: string; value: string }[];
}

/** How a command ended, as the agent saw it. */
export interface CommandExit {
  /** 128 + the signal number for a command a signal ended. */
  code: number;
  /** Nothing but the agent was left in the sandbox: no process of this command or of any other ran on. */
  alone: boolean;
}

interface Pending {
  started: () => void;
  failed: (error: Error) => void;
  exited: (exit: CommandExit) => void;
}

/**
 * The worker's end of the two pipes to a resident sandbox's agent (agent.c says what goes over them). They
 * are FIFOs in a directory of root's, opened here at both ends' worth before the launcher opens the agent's
 * (O_RDWR and O_NONBLOCK never wait for the other side), and unlinked once the agent runs: no name is left to
 * open them by.
 */
export class AgentChannel {
  readonly requestPath: string;
  readonly replyPath: string;
  /** Settles when the agent says it is ready, or rejects when it is gone before. */
  readonly ready: Promise<void>;
  readonly #requests: Socket;
  readonly #replies: Socket;
  readonly #pending = new Map<string, Pending>();
  readonly #onGone: (reason: string) => void;
  #onReady: (error?: Error) => void = () => {};
  #gone: string | undefined;

  /**
   * The pipes to an agent about to start, made in `controlDir` (by `launcher`, see mkfifo); `onGone` hears
   * once why it can no longer be reached.
   */
  static async open(controlDir: string, launcher: Launcher, onGone: (reason: string) => void): Promise<AgentChannel> {
    await mkfifo(launcher, [join(controlDir, "requests"), join(controlDir, "replies")], controlDir);
    return new AgentChannel(controlDir, onGone);
  }

  private constructor(controlDir: string, onGone: (reason: string) => void) {
    this.#onGone = onGone;
    this.requestPath = join(controlDir, "requests");
    this.replyPath = join(controlDir, "replies");
    this.ready = new Promise<void>((done, fail) => {
      this.#onReady = (error) => (error ? fail(error) : done());
    });
    // Nobody may wait for it (a start that failed before).
    this.ready.catch(() => {});
    const replyFd = openSync(this.replyPath, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
    this.#replies = new Socket({ fd: replyFd, readable: true, writable: false });
    const requestFd = openSync(this.requestPath, fsConstants.O_RDWR | fsConstants.O_NONBLOCK);
    this.#requests = new Socket({ fd: requestFd, readable: false, writable: true });
    this.#requests.on("error", (error) => this.lose(`its agent's pipe failed (${error.message})`));
    this.#listen();
  }

  /** Removes the FIFOs' names (once the agent has its ends open). */
  unlink(): void {
    rmSync(this.requestPath, { force: true });
    rmSync(this.replyPath, { force: true });
  }

  /**
   * Asks the agent to run a command and resolves with how it ended. `started`, if given, makes it a spawn:
   * called once the agent has forked it with its files open.
   */
  run(id: string, command: AgentCommand, started?: () => void): Promise<CommandExit> {
    if (this.#gone !== undefined) return Promise.reject(ended(this.#gone));
    const exited = new Promise<CommandExit>((done, fail) => {
      this.#pending.set(id, {
        started: started ?? (() => {}),
        failed: fail,
        exited: done,
      });
    });
    const variables = command.env.map(({ name, value }) => `${name}=${value}`);
    this.#send([
      started ? "spawn" : "run",
      id,
      command.stdin,
      command.stdout,
      command.stderr,
      command.cwd,
      String(command.argv.length),
      ...command.argv,
      String(variables.length),
      ...variables,
    ]);
    return exited;
  }

  /** Kills the process group of command `id`. */
  kill(id: string): void {
    if (this.#gone === undefined) this.#send(["kill", id]);
  }

  /** The agent cannot be reached any more: every command still waited for fails with `reason`. */
  lose(reason: string): void {
    if (this.#gone === undefined) {
      this.#gone = reason;
      this.#onGone(reason);
    }
    this.#onReady(ended(this.#gone));
    for (const pending of this.#pending.values()) pending.failed(ended(this.#gone));
    this.#pending.clear();
  }

  close(): void {
    this.#requests.destroy();
    this.#replies.destroy();
  }

  #send(fields: string[]): void {
    this.#requests.write(`${fields.length}\0${fields.join("\0")}\0`);
  }

  #listen(): void {
    let buffered = "";
    this.#replies.setEncoding("utf8");
    this.#replies.on("data", (chunk: string) => {
      buffered += chunk;
      for (let end = buffered.indexOf("\n"); end >= 0; end = buffered.indexOf("\n")) {
        this.#receive(buffered.slice(0, end));
        buffered = buffered.slice(end + 1);
      }
    });
    this.#replies.on("error", (error) => this.lose(`its agent's pipe failed (${error.message})`));
    this.#replies.on("end", () => this.lose("its agent is gone"));
  }

  #receive(line: string): void {
    const [kind = "", id = "", ...rest] = line.split(" ");
    if (kind === "ready") {
      this.#onReady();
      return;
    }
    const pending = this.#pending.get(id);
    if (!pending) return;
    if (kind === "started") {
      pending.started();
      return;
    }
    this.#pending.delete(id);
    if (kind === "exited") pending.exited({ code: Number(rest[0]), alone: rest[1] === "alone" });
    else pending.failed(new Error(`the sandbox could not start the command: ${rest.join(" ")}`));
  }
}

function ended(reason: string): Error {
  return new Error(`the resident sandbox ended: ${reason}`);
}

/**
 * Makes FIFOs (0600, root's) by running mkfifo(1) through `launcher`: Node has no mkfifo, and forking the
 * worker itself to run the program (execFile) blocked its event loop for about 3 ms here, the copy of its
 * large address space, while sandboxes are made beside other slots' actions. The launcher forks its small
 * self instead. mkfifo's complaint, if any, is written in `scratchDir` and given in the error.
 */
export async function mkfifo(launcher: Launcher, paths: readonly string[], scratchDir: string): Promise<void> {
  const stderrPath = join(scratchDir, `mkfifo-${process.pid}-${nextMkfifo++}.err`);
  try {
    const launched = await launcher.launch({
      argv: ["mkfifo", "-m", "0600", "--", ...paths],
      env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
      stdoutPath: "/dev/null",
      stderrPath,
      fd3Path: "/dev/null",
      steps: [],
    });
    const { code, signal } = await launched.exited;
    if (code !== 0) {
      const said = readFileSync(stderrPath, "utf8").trim();
      throw new Error(`mkfifo failed (${code === null ? `signal ${signal}` : `exit ${code}`}): ${said}`);
    }
  } finally {
    rmSync(stderrPath, { force: true });
  }
}

let nextMkfifo = 0;
