/**
 * Errors that carry a gRPC status. Domain code throws these; the API layer
 * turns them into wire statuses (with google.rpc details) without guessing.
 * The numeric codes are google.rpc.Code's.
 */
export const Code = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  ABORTED: 10,
  OUT_OF_RANGE: 11,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  DATA_LOSS: 15,
  UNAUTHENTICATED: 16,
} as const;
export type Code = (typeof Code)[keyof typeof Code];

/** One entry of google.rpc.PreconditionFailure. */
export interface PreconditionViolation {
  type: string;
  subject: string;
  description: string;
}

/** One entry of google.rpc.BadRequest. */
export interface FieldViolation {
  field: string;
  description: string;
}

export interface StatusDetails {
  preconditionFailures?: PreconditionViolation[];
  fieldViolations?: FieldViolation[];
}

export class StatusError extends Error {
  constructor(
    readonly code: Code,
    message: string,
    readonly details: StatusDetails = {},
  ) {
    super(message);
    this.name = "StatusError";
  }
}

/** A request field is malformed: the message names the field. */
export function invalidArgument(field: string, description: string): StatusError {
  return new StatusError(Code.INVALID_ARGUMENT, `${field}: ${description}`, {
    fieldViolations: [{ field, description }],
  });
}

export function notFound(message: string): StatusError {
  return new StatusError(Code.NOT_FOUND, message);
}

/** Blobs the request depends on are absent: one MISSING violation per blob. */
export function missingBlobs(subjects: string[], what = "blob"): StatusError {
  const shown = subjects.slice(0, 3).join(", ");
  const more = subjects.length > 3 ? ` and ${subjects.length - 3} more` : "";
  return new StatusError(Code.FAILED_PRECONDITION, `missing ${what}s in the CAS: ${shown}${more}`, {
    preconditionFailures: subjects.map((subject) => ({
      type: "MISSING",
      subject,
      description: `${what} is not in the CAS`,
    })),
  });
}

/** Wraps anything thrown into a StatusError, keeping StatusErrors as they are. */
export function toStatusError(err: unknown): StatusError {
  if (err instanceof StatusError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new StatusError(Code.INTERNAL, message);
}
