import type { PeerCertificate } from "node:tls";
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
    /** Common names of (verified) client certificates that make their holder a worker, without a token. */
    private readonly workerCertificateNames: ReadonlySet<string> = new Set(),
  ) {}

  /** Whether client calls need a token at all. */
  get checksClients(): boolean {
    return this.clients !== undefined;
  }

  /** A worker's call (WorkerHub): a worker secret or a worker's certificate, or UNAUTHENTICATED. */
  worker(metadata: Metadata, peer: PeerCertificate | undefined): Grant {
    const token = bearerToken(metadata);
    if (token === undefined) {
      const byCertificate = this.certifiedWorker(peer);
      if (byCertificate) return byCertificate;
    }
    if (token === undefined)
      throw unauthenticated("workers must present the farm's worker token (authorization: Bearer …)");
    const grant = this.workers.find(token);
    if (!grant) throw unauthenticated("the worker token is not one this farm accepts");
    return grant;
  }

  /** A client's call: its grant, or UNAUTHENTICATED when tokens are checked and it has no good one. */
  client(metadata: Metadata, peer: PeerCertificate | undefined): Grant {
    if (!this.clients) return ANYONE;
    const token = bearerToken(metadata);
    if (token === undefined) {
      const byCertificate = this.certifiedWorker(peer);
      if (byCertificate) return byCertificate;
      throw unauthenticated("this farm needs a token: send the header authorization: Bearer TOKEN");
    }
    const grant = this.clients.find(token) ?? this.workers.find(token);
    if (!grant) throw unauthenticated("the token is not one this farm accepts");
    return grant;
  }

  private certifiedWorker(peer: PeerCertificate | undefined): Grant | undefined {
    const name = certifiedWorkerName(this.workerCertificateNames, peer);
    return name === undefined ? undefined : { name: `worker certificate ${name}`, instances: "*" };
  }
}

/**
 * grpc-js hands over the peer's certificate only when it verified it against
 * tls.clientCaFile (requireClientCert), so its subject can be believed.
 */
function certifiedWorkerName(names: ReadonlySet<string>, peer: PeerCertificate | undefined): string | undefined {
  const name = peer?.subject?.CN;
  return typeof name === "string" && names.has(name) ? name : undefined;
}

export function mayUse(grant: Grant, instanceName: string): boolean {
  return grant.instances === "*" || grant.instances.includes(instanceName);
}

/** PERMISSION_DENIED naming the instance, for a grant that does not cover it. */
export function instanceRefusal(grant: Grant, instanceName: string): StatusError {
  return new StatusError(
    Code.PERMISSION_DENIED,
    `the token "${grant.name}" may not use the instance name "${instanceName}"`,
  );
}
