import {
  ExecuteOperationMetadata,
  ExecuteResponse,
  type ExecutionStage_Value,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Operation as WireOperation } from "../gen/google/longrunning/operations.js";
import type { Operation } from "../scheduler/operation.js";

const TYPE_PREFIX = "type.googleapis.com/build.bazel.remote.execution.v2.";

/** An operation as google.longrunning.Operation, with REAPI's metadata and response packed in Any. */
export function toWireOperation(
  operation: Operation,
  stage: ExecutionStage_Value = operation.stage,
  response: ExecuteResponse | undefined = operation.response,
): WireOperation {
  const { actionDigest } = operation;
  const metadata = ExecuteOperationMetadata.encode({
    stage,
    actionDigest: { hash: actionDigest.hash, sizeBytes: actionDigest.sizeBytes },
    stdoutStreamName: "",
    stderrStreamName: "",
    partialExecutionMetadata: undefined,
    digestFunction: actionDigest.fn.wireValue,
  }).finish();
  return {
    name: operation.name,
    metadata: { typeUrl: `${TYPE_PREFIX}ExecuteOperationMetadata`, value: Buffer.from(metadata) },
    done: response !== undefined,
    response: response
      ? { typeUrl: `${TYPE_PREFIX}ExecuteResponse`, value: Buffer.from(ExecuteResponse.encode(response).finish()) }
      : undefined,
  };
}
