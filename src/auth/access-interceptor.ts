import { type Metadata, ServerInterceptingCall, type ServerInterceptor } from "@grpc/grpc-js";
import { markAccessRefusal } from "../api/call-log.js";
import { toServiceError } from "../api/grpc-status.js";
import { parseReadResourceName, parseWriteResourceName } from "../digest/resource-name.js";
import type { Logger } from "../log/log.js";
import { redactCredentials } from "../log/redact.js";
import { Code, StatusError, toStatusError } from "../status/status.js";
import { type AccessPolicy, type Grant, instanceRefusal, mayUse } from "./access.js";

/** Finds the instance name of an operation the server knows (undefined: unknown, the handler says NOT_FOUND). */
export type OperationInstances = (operationName: string) => string | undefined;

/** How a method's first request names what it touches. */
type Rule =
  | { kind: "worker" }
  | { kind: "instance"; of: (request: unknown) => string }
  | { kind: "operation"; of: (request: unknown) => string };

const instanceField = (request: unknown) => String((request as { instanceName?: unknown }).instanceName ?? "");
const nameField = (request: unknown) => String((request as { name?: unknown }).name ?? "");
const readResource = (request: unknown) =>
  parseReadResourceName(String((request as { resourceName?: unknown }).resourceName ?? "")).instanceName;
const writeResource = (request: unknown) =>
  parseWriteResourceName(String((request as { resourceName?: unknown }).resourceName ?? "")).instanceName;

/** Every method the server offers, by service (any method) or by full path; a method without a rule is refused. */
const SERVICE_RULES: Record<string, Rule> = {
  "build.bazel.remote.execution.v2.Capabilities": { kind: "instance", of: instanceField },
  "build.bazel.remote.execution.v2.ContentAddressableStorage": { kind: "instance", of: instanceField },
  "build.bazel.remote.execution.v2.ActionCache": { kind: "instance", of: instanceField },
  "berth.image.v1.Images": { kind: "instance", of: instanceField },
  "build.bazel.remote.asset.v1.Fetch": { kind: "instance", of: instanceField },
  "build.bazel.remote.asset.v1.Push": { kind: "instance", of: instanceField },
  "google.longrunning.Operations": { kind: "operation", of: nameField },
  "berth.worker.v1.WorkerHub": { kind: "worker" },
};
const METHOD_RULES: Record<string, Rule> = {
  "/build.bazel.remote.execution.v2.Execution/Execute": { kind: "instance", of: instanceField },
  "/build.bazel.remote.execution.v2.Execution/WaitExecution": { kind: "operation", of: nameField },
  "/google.bytestream.ByteStream/Read": { kind: "instance", of: readResource },
  "/google.bytestream.ByteStream/Write": { kind: "instance", of: writeResource },
  "/google.bytestream.ByteStream/QueryWriteStatus": { kind: "instance", of: writeResource },
};

function ruleFor(path: string): Rule | undefined {
  return METHOD_RULES[path] ?? SERVICE_RULES[path.split("/")[1] ?? ""];
}

/** The instance name a request of `path` names (for the log), or undefined; never throws. */
export function requestInstanceName(
  path: string,
  request: unknown,
  operations: OperationInstances,
): string | undefined {
  const rule = ruleFor(path);
  if (!rule || rule.kind === "worker" || typeof request !== "object" || request === null) return undefined;
  try {
    return rule.kind === "instance" ? rule.of(request) : operations(rule.of(request));
  } catch {
    return undefined;
  }
}

/**
 * The metadata key under which handlers find the name of the caller's
 * grant (its token's name, "anonymous" on a farm that checks no tokens):
 * set by the access check, never taken from the caller.
 */
export const CALLER_HEADER = "x-berth-caller";

/** The caller's grant name as the access check set it ("anonymous" when absent, as in tests without one). */
export function callerOf(metadata: Metadata): string {
  const [value] = metadata.get(CALLER_HEADER);
  return typeof value === "string" && value !== "" ? value : "anonymous";
}

/**
 * The one access check of the gRPC port, run before any handler: the
 * caller's secret is checked on the call's metadata (a refused call reaches
 * no handler and gets nothing but its status), and the instance name its
 * first request names against what the secret allows. An operation of an
 * instance the caller may not use is NOT_FOUND, as if it did not exist.
 */
export function accessInterceptor(
  policy: AccessPolicy,
  operations: OperationInstances,
  log: Logger,
): ServerInterceptor {
  return (method, call) => {
    const rule = ruleFor(method.path);
    let grant: Grant | undefined;
    let refused = false;
    let checkedFirst = false;
    /** Answers the call with `err`; the call log records it (as an access failure when `access` says which). */
    const refuse = (err: unknown, access?: "authentication" | "authorization") => {
      refused = true;
      const error = toStatusError(err);
      const { code, details, metadata } = toServiceError(error);
      const status = { code: code ?? Code.INTERNAL, details: details ?? "", metadata: metadata ?? null };
      if (!access && error.code !== Code.UNIMPLEMENTED) {
        log.debug(
          { method: method.path, code: error.code },
          `refused ${method.path}: ${redactCredentials(error.message)}`,
        );
      }
      call.sendStatus(access ? markAccessRefusal(status, access) : status);
    };
    return new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata: Metadata, pass: (metadata: Metadata) => void) => {
            if (!rule)
              return refuse(new StatusError(Code.UNIMPLEMENTED, `${method.path} is not a method of this farm`));
            try {
              // Set only for a certificate grpc-js verified (mTLS); absent on plain connections and the socket.
              const peer = call.getAuthContext().sslPeerCertificate;
              grant = rule.kind === "worker" ? policy.worker(metadata, peer) : policy.client(metadata, peer);
            } catch (err) {
              return refuse(err, "authentication");
            }
            // Whatever a caller sent under this name is replaced: handlers read who the check found.
            metadata.remove(CALLER_HEADER);
            metadata.set(CALLER_HEADER, grant.name);
            pass(metadata);
          },
          onReceiveMessage: (message: unknown, pass: (message: unknown) => void) => {
            if (refused) return;
            if (!checkedFirst && rule && grant) {
              checkedFirst = true;
              try {
                checkFirstRequest(rule, grant, message, operations);
              } catch (err) {
                return refuse(err, err instanceof AccessRefusal ? "authorization" : undefined);
              }
            }
            pass(message);
          },
          onReceiveHalfClose: (pass: () => void) => {
            if (!refused) pass();
          },
        }),
    });
  };
}

function checkFirstRequest(rule: Rule, grant: Grant, request: unknown, operations: OperationInstances): void {
  switch (rule.kind) {
    case "worker":
      return;
    case "instance": {
      const instance = rule.of(request);
      if (!mayUse(grant, instance)) throw new AccessRefusal(instanceRefusal(grant, instance));
      return;
    }
    case "operation": {
      const name = rule.of(request);
      const instance = operations(name);
      if (instance !== undefined && !mayUse(grant, instance)) {
        throw new AccessRefusal(new StatusError(Code.NOT_FOUND, `no operation named "${name}"`));
      }
    }
  }
}

/** A refusal for what the caller's grant does not cover (told apart from a malformed resource name). */
class AccessRefusal extends StatusError {
  constructor(error: StatusError) {
    super(error.code, error.message, error.details);
  }
}
