import type { Config } from "../config/config.js";
import { createRegistryClient, type RegistryClient } from "./client.js";
import {
  type CredentialSource,
  composeCredentials,
  dockerConfigCredentials,
  staticCredentials,
} from "./credentials.js";

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
