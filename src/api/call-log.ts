import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { type FullResponder, type Metadata, ServerInterceptingCall, type ServerInterceptor } from "@grpc/grpc-js";
import { AUTHORIZATION } from "../auth/bearer.js";
import { Status } from "../gen/google/rpc/status.js";
import type { Logger } from "../log/log.js";
import { redactCredentials } from "../log/redact.js";
import { Code } from "../status/status.js";
import { REGISTRY_CREDENTIALS_HEADER } from "./registry-credentials-header.js";
import { clientSummary, readRequestMetadata } from "./request-metadata.js";

/*
 * What an operator sees of calls the farm turns down: one record per call,
 * written where every call's answer passes (the innermost server
 * interceptor), whoever gave the answer (a handler, an interceptor, an
 * ExecuteResponse). Calls that succeed write nothing here.
 */

/** Why a call is in the log. */
export type RefusalKind = "execution" | "unimplemented" | "authentication" | "authorization";

const EXECUTION_METHODS: ReadonlySet<string> = new Set([
  "/build.bazel.remote.execution.v2.Execution/Execute",
  "/build.bazel.remote.execution.v2.Execution/WaitExecution",
]);

/**
 * Codes of refused executions that say the action or the request is at fault
 * (info); the others say the farm could not do it (warn).
 */
const CLIENT_SIDE: ReadonlySet<number> = new Set([
  Code.CANCELLED,
  Code.INVALID_ARGUMENT,
  Code.DEADLINE_EXCEEDED,
  Code.NOT_FOUND,
  Code.ALREADY_EXISTS,
  Code.PERMISSION_DENIED,
  Code.RESOURCE_EXHAUSTED,
  Code.FAILED_PRECONDITION,
  Code.OUT_OF_RANGE,
]);

const CODE_NAMES: ReadonlyMap<number, string> = new Map(Object.entries(Code).map(([name, code]) => [code, name]));

/** A status as an interceptor sends it (grpc-js does not export its name for it). */
type OutgoingStatus = Parameters<FullResponder["sendStatus"]>[0];

const REFUSAL_KIND = Symbol("berth refusal kind");

/** A status another interceptor sends, marked as an authentication or authorization failure for this log. */
export function markAccessRefusal<S extends OutgoingStatus>(status: S, kind: "authentication" | "authorization"): S {
  return Object.assign(status, { [REFUSAL_KIND]: kind });
}

function kindOf(status: OutgoingStatus, path: string): RefusalKind | undefined {
  const marked = (status as { [REFUSAL_KIND]?: RefusalKind })[REFUSAL_KIND];
  if (marked) return marked;
  if (status.code === Code.UNIMPLEMENTED) return "unimplemented";
  return EXECUTION_METHODS.has(path) ? "execution" : undefined;
}

/** The instance name a method's request names, or undefined (not a request Berth reads, or no such field). */
export type RequestInstanceName = (path: string, request: unknown) => string | undefined;

/**
 * The innermost server interceptor: it sees the metadata and first request
 * of every call before anyone else, and every status and message on the way
 * out after everyone else.
 */
export function callLogInterceptor(log: Logger, instanceOf: RequestInstanceName): ServerInterceptor {
  return (method, call) => {
    const path = method.path;
    let metadata: Metadata | undefined;
    let instanceName: string | undefined;
    let sawRequest = false;
    let logged = false;
    const refused = (kind: RefusalKind, code: number, message: string) => {
      if (logged) return;
      logged = true;
      writeRecord(log, { kind, method: path, instanceName, peer: call.getPeer(), metadata, code, message });
    };
    return new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (received: Metadata, pass: (metadata: Metadata) => void) => {
            metadata = received;
            pass(received);
          },
          onReceiveMessage: (message: unknown, pass: (message: unknown) => void) => {
            if (!sawRequest) {
              sawRequest = true;
              instanceName = instanceOf(path, message);
            }
            pass(message);
          },
        }),
      // Execute and WaitExecution refuse an action inside their last message, with an OK call.
      sendMessage: EXECUTION_METHODS.has(path)
        ? (message: unknown, next: (message: unknown) => void) => {
            const status = executeResponseStatus(message);
            if (status && status.code !== Code.OK) refused("execution", status.code, status.message);
            next(message);
          }
        : undefined,
      sendStatus: (status: OutgoingStatus, next: (status: OutgoingStatus) => void) => {
        const kind = status.code === Code.OK ? undefined : kindOf(status, path);
        if (kind) refused(kind, status.code, status.details ?? "");
        next(status);
      },
    });
  };
}

/** The status of the ExecuteResponse a final Operation carries; only that field is read. */
function executeResponseStatus(message: unknown): Status | undefined {
  const operation = message as { done?: unknown; response?: { typeUrl?: unknown; value?: unknown } };
  const value = operation.response?.value;
  if (operation.done !== true || !(value instanceof Uint8Array)) return undefined;
  try {
    const reader = new BinaryReader(value);
    let status: Status | undefined;
    while (reader.pos < reader.len) {
      const [field, wireType] = reader.tag();
      if (field === 3 && wireType === WireType.LengthDelimited) status = Status.decode(reader.bytes());
      else reader.skip(wireType, field);
    }
    return status;
  } catch {
    return undefined;
  }
}

interface Refusal {
  kind: RefusalKind;
  method: string;
  instanceName: string | undefined;
  peer: string;
  metadata: Metadata | undefined;
  code: number;
  message: string;
}

const HEADLINES: Record<RefusalKind, string> = {
  execution: "refused",
  unimplemented: "unimplemented method",
  authentication: "authentication failed for",
  authorization: "authorization failed for",
};

/** Longest text kept of what a client chose (a method path, an instance name): a record stays one line. */
const MAX_CLIENT_TEXT = 256;

function bounded(text: string): string {
  return text.length > MAX_CLIENT_TEXT ? `${text.slice(0, MAX_CLIENT_TEXT)}…` : text;
}

function writeRecord(log: Logger, refusal: Refusal): void {
  const { kind, peer, code } = refusal;
  const secrets = callSecrets(refusal.metadata);
  const clean = (text: string) => redactCredentials(text, secrets);
  const method = bounded(refusal.method);
  const instanceName = refusal.instanceName === undefined ? undefined : bounded(refusal.instanceName);
  const reason = clean(refusal.message);
  const status = CODE_NAMES.get(code) ?? String(code);
  const client = readRequestMetadata(refusal.metadata);
  const description =
    client.kind === "read"
      ? Object.fromEntries(Object.entries(client.client).map(([name, value]) => [name, clean(value)]))
      : undefined;
  const who = [
    instanceName === undefined ? undefined : `instance "${clean(instanceName)}"`,
    description ? clientSummary(description) : undefined,
    client.kind === "unreadable" ? "unreadable RequestMetadata" : undefined,
    kind === "authentication" || kind === "authorization" ? `from ${peer}` : undefined,
  ].filter((part) => part !== undefined && part !== "");
  const fields = {
    event: "call refused",
    kind,
    method,
    instanceName: instanceName === undefined ? undefined : clean(instanceName),
    peer,
    client: description,
    requestMetadataError: client.kind === "unreadable" ? client.reason : undefined,
    code,
    status,
    reason,
  };
  const message = `${HEADLINES[kind]} ${method}${who.length > 0 ? ` (${who.join(", ")})` : ""}: ${status}: ${reason}`;
  if (levelOf(kind, code) === "warn") log.warn(fields, message);
  else log.info(fields, message);
}

/**
 * Authentication and authorization failures are warnings: rare in normal
 * use, and either a client misconfigured or someone trying. An unimplemented
 * method is information (a client expects an API this farm lacks), as is an
 * action refused for what it asks; an execution the farm itself failed is a
 * warning.
 */
function levelOf(kind: RefusalKind, code: number): "info" | "warn" {
  if (kind === "authentication" || kind === "authorization") return "warn";
  if (kind === "execution" && !CLIENT_SIDE.has(code)) return "warn";
  return "info";
}

/** Secrets the call itself carries, taken out of anything logged about it (whole values and their secret parts). */
function callSecrets(metadata: Metadata | undefined): string[] {
  if (!metadata) return [];
  const secrets: string[] = [];
  for (const raw of metadata.get(AUTHORIZATION)) {
    const value = String(raw);
    secrets.push(value, value.replace(/^\s*\S+\s+/, "").trim());
  }
  for (const raw of metadata.get(REGISTRY_CREDENTIALS_HEADER)) {
    const value = String(raw);
    const colon = value.indexOf(":", value.indexOf("=") + 1);
    secrets.push(value, colon < 0 ? "" : value.slice(colon + 1));
  }
  // Longest first, so that a whole value is hidden before a part of it.
  return secrets.filter((s) => s.length > 0).sort((a, b) => b.length - a.length);
}
