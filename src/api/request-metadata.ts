import type { Metadata } from "@grpc/grpc-js";
import { RequestMetadata } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";

/** The header REAPI clients (Bazel, BuildStream, recc, …) describe themselves and the action in. */
export const REQUEST_METADATA_HEADER = "build.bazel.remote.execution.v2.requestmetadata-bin";

/** Longest value kept per field: the header is the client's to fill, and a record stays one readable line. */
const MAX_FIELD_CHARS = 256;

/** What a client said about itself, as log fields (only those it set). */
export interface ClientDescription {
  toolName?: string;
  toolVersion?: string;
  actionId?: string;
  toolInvocationId?: string;
  correlatedInvocationsId?: string;
  actionMnemonic?: string;
  targetId?: string;
  configurationId?: string;
}

/** The call's RequestMetadata: absent, read, or unreadable (with why; the call goes on either way). */
export type ClientMetadata =
  | { readonly kind: "absent" }
  | { readonly kind: "read"; readonly client: ClientDescription }
  | { readonly kind: "unreadable"; readonly reason: string };

/** Decodes the call's requestmetadata-bin header; never throws. */
export function readRequestMetadata(metadata: Metadata | undefined): ClientMetadata {
  const values = metadata?.get(REQUEST_METADATA_HEADER) ?? [];
  const raw = values[0];
  if (raw === undefined) return { kind: "absent" };
  if (!Buffer.isBuffer(raw)) return { kind: "unreadable", reason: "the header is not binary" };
  let decoded: RequestMetadata;
  try {
    decoded = RequestMetadata.decode(raw);
  } catch (err) {
    return { kind: "unreadable", reason: `not a RequestMetadata message (${(err as Error).message})` };
  }
  const fields: [keyof ClientDescription, string | undefined][] = [
    ["toolName", decoded.toolDetails?.toolName],
    ["toolVersion", decoded.toolDetails?.toolVersion],
    ["actionId", decoded.actionId],
    ["toolInvocationId", decoded.toolInvocationId],
    ["correlatedInvocationsId", decoded.correlatedInvocationsId],
    ["actionMnemonic", decoded.actionMnemonic],
    ["targetId", decoded.targetId],
    ["configurationId", decoded.configurationId],
  ];
  const client: ClientDescription = {};
  for (const [name, value] of fields) {
    if (value) client[name] = value.length > MAX_FIELD_CHARS ? `${value.slice(0, MAX_FIELD_CHARS)}…` : value;
  }
  return { kind: "read", client };
}

/** "bazel 4.2.3, Genrule //pkg:target": who is calling, in a few words for a log message. */
export function clientSummary(client: ClientDescription): string {
  const tool = [client.toolName, client.toolVersion].filter(Boolean).join(" ");
  const action = [client.actionMnemonic, client.targetId].filter(Boolean).join(" ");
  return [tool, action].filter((part) => part !== "").join(", ");
}
