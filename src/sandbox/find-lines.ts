import { spawn } from "node:child_process";

/**
 * Runs GNU find with `args` and hands each line it prints to `onLine`; `onLine` returning true, or `signal`
 * aborting, stops it. Resolves once find has ended, whatever its exit code: find exits non-zero when entries
 * or processes vanish under it, and what it saw still counts. Rejects (with `what` in the message) only when
 * find cannot be started.
 */
export function findLines(
  args: readonly string[],
  what: string,
  onLine: (line: string) => boolean | undefined,
  signal?: AbortSignal,
): Promise<void> {
  const child = spawn("find", args, { stdio: ["ignore", "pipe", "ignore"] });
  return new Promise((resolve, reject) => {
    let partial = "";
    const stop = () => child.kill("SIGKILL");
    signal?.addEventListener("abort", stop, { once: true });
    child.stdout.setEncoding("latin1");
    child.stdout.on("data", (chunk: string) => {
      const lines = (partial + chunk).split("\n");
      partial = lines.pop() ?? "";
      for (const line of lines) {
        if (onLine(line)) {
          stop();
          return;
        }
      }
    });
    child.on("error", (error) => {
      signal?.removeEventListener("abort", stop);
      reject(new Error(`cannot ${what} with find: ${error.message}`, { cause: error }));
    });
    child.on("close", () => {
      signal?.removeEventListener("abort", stop);
      resolve();
    });
  });
}
