import type { RegistryClient } from "../registry/client.js";
import { Credentials } from "../registry/credentials.js";
import type { TagResolver } from "./image-policy.js";

/** Pins tags through `registry` (the manifest for this machine's platform). */
export function tagResolver(registry: RegistryClient): TagResolver {
  return async (image, credentials) => {
    const resolved = await registry.resolve(image, undefined, {
      credentials: credentials && new Credentials(credentials.username, credentials.password),
    });
    return resolved.indexDigest ?? resolved.manifestDigest;
  };
}
