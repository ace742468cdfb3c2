import type { Metadata } from "@grpc/grpc-js";
import { Code, StatusError } from "../status/status.js";
import { bearerToken, unauthenticated } from "./bearer.js";
import type { SecretTable } from "./secrets.js";

/** What a presented secret allows: who it is (for logs) and which instance names it may use. */
export interface Grant {
  readonly name: string;
  readonly instances: "*" | readonly string[];
}

/** Everyone, when the farm checks no client tokens. */
const ANYONE: Grant = { name: "anonymous", instances: "*" };

/**
 * Who may do what on the gRPC port. Workers present a worker secret (the
 * farm's own, or one the operator added); it also makes them clients of
 * every instance, since workers read and write the CAS. Clients present a
 * token of the tokens file when there is one, and are not asked otherwise.
 */
export class AccessPolicy {
  constructor(
    private readonly workers: SecretTable<Grant>,
    private readonly clients: SecretTable<Grant> | undefined,
  ) {}

  /** Whether client calls need a token at all. */
  get checksClients(): boolean {
    return this.clients !== undefined;
  }

  /** A worker's call (WorkerHub): a worker secret, or UNAUTHENTICATED. */
  worker(metadata: Metadata): Grant {
    const token = bearerToken(metadata);
    if (token === undefined)
      throw unauthenticated("workers must present the farm's worker token (authorization: Bearer …)");
    const grant = this.workers.find(token);
    if (!grant) throw unauthenticated("the worker token is not one this farm accepts");
    return grant;
  }

  /** A client's call: its grant, or UNAUTHENTICATED when tokens are checked and it has no good one. */
  client(metadata: Metadata): Grant {
    if (!this.clients) return ANYONE;
    const token = bearerToken(metadata);
    if (token === undefined) {
      throw unauthenticated("this farm needs a token: send the header authorization: Bearer TOKEN");
    }
    const grant = this.clients.find(token) ?? this.workers.find(token);
    if (!grant) throw unauthenticated("the token is not one this farm accepts");
    return grant;
  }
}

export function mayUse(grant: Grant, instanceName: string): boolean {
  return grant.instances === "*" || grant.instances.includes(instanceName);
}

/** PERMISSION_DENIED naming the instance, when the grant does not cover it. */
export function permit(grant: Grant, instanceName: string): void {
  if (mayUse(grant, instanceName)) return;
  throw new StatusError(
    Code.PERMISSION_DENIED,
    `the token "${grant.name}" may not use the instance name "${instanceName}"`,
  );
}
