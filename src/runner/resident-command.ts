import type { ResidentRunRequest } from "../sandbox/resident-sandbox.js";
import type { RunRequest } from "./runner.js";

/** The command of a run request, for a resident sandbox started earlier with its root, ids and network. */
export function residentCommand(request: RunRequest): ResidentRunRequest {
  const { workingDirectory, argv, env, timeoutMs, stdoutPath, stderrPath, signal } = request;
  return { workingDirectory, argv, env, timeoutMs, stdoutPath, stderrPath, signal };
}
