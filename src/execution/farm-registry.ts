import type { Config } from "../config/config.js";
import { createRegistryClient, type RegistryClient } from "../registry/client.js";
import {
  type CredentialSource,
  Credentials,
  composeCredentials,
  dockerConfigCredentials,
  staticCredentials,
} from "../registry/credentials.js";
import type { TagResolver } from "./image-policy.js";

/** The registry client a farm's configuration describes: its credentials, insecure registries and pull timeout. */
export async function registryFromConfig(images: Config["images"]): Promise<RegistryClient> {
  const sources: CredentialSource[] = [staticCredentials(images.credentials)];
  if (images.dockerConfig !== undefined) sources.push(await dockerConfigCredentials(images.dockerConfig));
  return createRegistryClient({
    credentials: composeCredentials(...sources),
    insecureRegistries: images.insecureRegistries,
    timeoutMs: images.pullTimeoutSeconds * 1000,
  });
}

/** Pins tags through `registry` (the manifest for this machine's platform). */
export function tagResolver(registry: RegistryClient): TagResolver {
  return async (image, credentials) => {
    const resolved = await registry.resolve(image, undefined, {
      credentials: credentials && new Credentials(credentials.username, credentials.password),
    });
    return resolved.indexDigest ?? resolved.manifestDigest;
  };
}
