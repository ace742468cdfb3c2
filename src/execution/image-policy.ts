import { CONTAINER_IMAGE, type RegistryCredentials } from "../action/action-platform.js";
import type { Config } from "../config/config.js";
import { type ImageReference, makeReference, parseImageReference } from "../image/reference.js";
import { registryStatus } from "../registry/registry-status.js";
import { Code, invalidArgument, StatusError } from "../status/status.js";

/** Finds the digest a tag names now (the registry's answer for this machine's platform). */
export type TagResolver = (image: ImageReference, credentials: RegistryCredentials | undefined) => Promise<string>;

type Rule = { kind: "registry"; registry: string } | { kind: "repository" | "below"; name: string };

/**
 * The farm's rules for images, applied when an action is queued: which
 * registries and repositories may be named, and what a tag means (used as
 * is, pinned to its digest now, or refused).
 */
export class ImagePolicy {
  private readonly rules: Rule[];

  constructor(
    private readonly config: Config["images"],
    private readonly resolveTag: TagResolver | undefined,
  ) {
    this.rules = config.allowed.map(parseRule);
  }

  /** The image to run, pinned when the policy says so; refusals are precise statuses. */
  async admit(image: ImageReference, credentials: RegistryCredentials | undefined): Promise<ImageReference> {
    if (this.rules.length > 0 && !this.rules.some((rule) => matches(rule, image))) {
      throw new StatusError(
        Code.PERMISSION_DENIED,
        `image ${image} is not allowed on this farm (images.allowed: ${this.config.allowed.join(", ")})`,
      );
    }
    if (image.digest !== undefined) return image;
    switch (this.config.tagPolicy) {
      case "allow":
        return image;
      case "reject":
        throw invalidArgument(
          `platform property ${CONTAINER_IMAGE}`,
          `image ${image} names a tag, and this farm runs only images named by digest (images.tagPolicy: reject); ` +
            `write ${image.registry}/${image.repository}@sha256:…`,
        );
      case "resolve": {
        if (!this.resolveTag)
          throw new StatusError(Code.INTERNAL, "images.tagPolicy is resolve but no registry client");
        const digest = await this.resolveTag(image, credentials).catch((err: unknown) => {
          throw registryStatus(err, image);
        });
        return makeReference(image.registry, image.repository, image.tag, digest);
      }
    }
  }
}

function parseRule(entry: string): Rule {
  const prefix = entry.endsWith("/*") ? entry.slice(0, -2) : undefined;
  if (!(prefix ?? entry).includes("/")) return { kind: "registry", registry: (prefix ?? entry).toLowerCase() };
  if (prefix !== undefined) {
    // A path prefix, not a repository: `docker.io/team/*` must not become `docker.io/library/team/`.
    const slash = prefix.indexOf("/");
    const registry = parseImageReference(`${prefix.slice(0, slash)}/x`).registry;
    return { kind: "below", name: `${registry}/${prefix.slice(slash + 1)}/` };
  }
  return { kind: "repository", name: repositoryName(entry) };
}

/** `docker.io/debian` means `docker.io/library/debian`, as it does to Docker. */
function repositoryName(text: string): string {
  const ref = parseImageReference(text);
  return `${ref.registry}/${ref.repository}`;
}

function matches(rule: Rule, image: ImageReference): boolean {
  const name = `${image.registry}/${image.repository}`;
  switch (rule.kind) {
    case "registry":
      return image.registry.toLowerCase() === rule.registry;
    case "repository":
      return name === rule.name;
    case "below":
      return name.startsWith(rule.name);
  }
}
