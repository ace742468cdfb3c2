import type { Any } from "../gen/google/protobuf/any.js";
import { BadRequest, PreconditionFailure } from "../gen/google/rpc/error_details.js";
import type { Status } from "../gen/google/rpc/status.js";
import type { StatusError } from "./status.js";

const TYPE_PREFIX = "type.googleapis.com/";

/** A domain error as a google.rpc.Status message, details packed in Any. */
export function toRpcStatus(error: StatusError): Status {
  const details: Any[] = [];
  const { preconditionFailures, fieldViolations } = error.details;
  if (preconditionFailures && preconditionFailures.length > 0) {
    details.push({
      typeUrl: `${TYPE_PREFIX}google.rpc.PreconditionFailure`,
      value: Buffer.from(PreconditionFailure.encode({ violations: preconditionFailures }).finish()),
    });
  }
  if (fieldViolations && fieldViolations.length > 0) {
    details.push({
      typeUrl: `${TYPE_PREFIX}google.rpc.BadRequest`,
      value: Buffer.from(
        BadRequest.encode({
          fieldViolations: fieldViolations.map((v) => ({ ...v, reason: "", localizedMessage: undefined })),
        }).finish(),
      ),
    });
  }
  return { code: error.code, message: error.message, details };
}

export const OK_STATUS: Status = { code: 0, message: "", details: [] };
