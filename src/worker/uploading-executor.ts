import type { Assignment } from "../gen/berth/worker/v1/worker.js";
import type { ActionExecutor, ExecutedAction, ExecutionContext } from "./action-executor.js";
import type { RemoteCas } from "./remote-cas.js";
import { nowTimestamp } from "./timestamp.js";

/**
 * Uploads the blobs the result names that have not gone yet (inline), to
 * the CAS of the action's instance, before the completion is sent: a
 * client must find every blob its result names.
 */
export class UploadingExecutor implements ActionExecutor {
  constructor(
    private readonly inner: ActionExecutor,
    private readonly cas: RemoteCas,
  ) {}

  async execute(assignment: Assignment, context: ExecutionContext): Promise<ExecutedAction> {
    const { completion, pending } = await this.inner.execute(assignment, context);
    await this.cas.withInstance(assignment.instanceName).upload(pending);
    context.metadata.outputUploadCompletedTimestamp = nowTimestamp();
    return { completion, pending: [] };
  }
}
