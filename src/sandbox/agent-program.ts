import { statSync } from "node:fs";
import { fileURLToPath } from "node:url";

/** Where a resident sandbox shows the agent's directory, read-only (under /run, which hides the host's). */
export const AGENT_MOUNT = "/run/berth/agent";
/** The agent's program as the sandbox sees it. */
export const AGENT_PROGRAM = `${AGENT_MOUNT}/berth-agent`;

let found: string | undefined;

/**
 * The host directory holding the agent's program (agent.c, compiled by `npm run build`), and nothing else:
 * it is what a resident sandbox binds at AGENT_MOUNT, where a command on the host's root can see it too.
 */
export function agentProgramDir(): string {
  if (found === undefined) {
    const dir = fileURLToPath(new URL("../../agent", import.meta.url));
    const program = `${dir}/berth-agent`;
    try {
      statSync(program);
    } catch {
      throw new Error(`the sandbox agent ${program} is missing: build Berth (npm run build) with a C compiler`);
    }
    found = dir;
  }
  return found;
}
