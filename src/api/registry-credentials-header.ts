import type { Metadata } from "@grpc/grpc-js";
import { Credentials, normalizeRegistryKey } from "../registry/credentials.js";
import { invalidArgument } from "../status/status.js";

/**
 * The request header that carries registry credentials, one value per
 * registry: `REGISTRY=USERNAME:PASSWORD` (e.g. `ghcr.io=ci:s3cret`). Sent
 * this way, unlike the container-registry-username/password platform
 * properties, they never become part of an Action or Command blob.
 */
export const REGISTRY_CREDENTIALS_HEADER = "x-berth-registry-credentials";

/** Credentials per registry (normalized host), as a call's headers give them. */
export type RegistryCredentialsByHost = ReadonlyMap<string, Credentials>;

/** Parses the header's values; a malformed one is INVALID_ARGUMENT that never quotes it (it holds a password). */
export function registryCredentialsFrom(metadata: Metadata): RegistryCredentialsByHost {
  const byHost = new Map<string, Credentials>();
  metadata.get(REGISTRY_CREDENTIALS_HEADER).forEach((raw, i) => {
    const value = String(raw);
    const equals = value.indexOf("=");
    const colon = value.indexOf(":", equals + 1);
    const host = equals > 0 ? normalizeRegistryKey(value.slice(0, equals).trim()) : "";
    const username = value.slice(equals + 1, colon);
    if (equals <= 0 || colon < 0 || host === "" || username === "") {
      throw invalidArgument(
        `header ${REGISTRY_CREDENTIALS_HEADER} (value ${i + 1})`,
        "must be REGISTRY=USERNAME:PASSWORD, e.g. ghcr.io=ci:PASSWORD",
      );
    }
    if (byHost.has(host)) {
      throw invalidArgument(`header ${REGISTRY_CREDENTIALS_HEADER}`, `gives credentials for registry ${host} twice`);
    }
    byHost.set(host, new Credentials(username, value.slice(colon + 1)));
  });
  return byHost;
}
