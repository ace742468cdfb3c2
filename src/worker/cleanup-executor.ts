import { rm } from "node:fs/promises";
import type { Assignment } from "../gen/berth/worker/v1/worker.js";
import type { ActionExecutor, ExecutedAction, ExecutionContext } from "./action-executor.js";
import type { Trash } from "./trash.js";

/**
 * Discards the action's directory once it is done, however it ended, into
 * the trash (which removes directories while no action runs). The
 * directory counts as in use from the start: the trash waits for it.
 */
export class CleanupExecutor implements ActionExecutor {
  constructor(
    private readonly inner: ActionExecutor,
    private readonly trash: Trash,
  ) {}

  async execute(assignment: Assignment, context: ExecutionContext): Promise<ExecutedAction> {
    const release = this.trash.hold();
    try {
      return await this.inner.execute(assignment, context);
    } finally {
      // Not awaited: the client waits for the completion, not for the directory to go (each action has its own).
      const { directory } = context;
      void this.trash
        .discard(directory, context.writtenBytes)
        .catch(() => rm(directory, { recursive: true, force: true }).catch(() => {}))
        .finally(release);
    }
  }
}
