import type { Assignment } from "../gen/berth/worker/v1/worker.js";
import type { ActionExecutor, ExecutedAction, ExecutionContext } from "./action-executor.js";
import { nowTimestamp } from "./timestamp.js";

/**
 * Stamps what ExecutedActionMetadata says of the whole execution: which
 * worker, when the action was queued, when the worker started and finished
 * it. The steps inside stamp their own phases.
 */
export class TimestampedExecutor implements ActionExecutor {
  constructor(
    private readonly inner: ActionExecutor,
    private readonly workerName: string,
  ) {}

  async execute(assignment: Assignment, context: ExecutionContext): Promise<ExecutedAction> {
    const { metadata } = context;
    metadata.worker = this.workerName;
    metadata.queuedTimestamp = assignment.queuedTimestamp;
    metadata.workerStartTimestamp = nowTimestamp();
    const executed = await this.inner.execute(assignment, context);
    metadata.workerCompletedTimestamp = nowTimestamp();
    return executed;
  }
}
