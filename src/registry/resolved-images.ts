import type { ImageReference } from "../image/reference.js";
import type { RegistryClient, ResolvedImage } from "./client.js";
import type { Credentials } from "./credentials.js";
import { SingleFlight } from "./single-flight.js";

/**
 * What references resolved to, remembered: a digest names one image forever,
 * a tag is asked of the registry again after `tagRefreshMs`. Concurrent
 * resolutions of one reference share one request.
 */
export class ResolvedImages {
  private readonly resolved = new Map<string, { image: ResolvedImage; at: number }>();
  private readonly resolving = new SingleFlight<string, ResolvedImage>();

  constructor(
    private readonly registry: RegistryClient,
    private readonly tagRefreshMs: number,
  ) {}

  async resolve(ref: ImageReference, credentials: Credentials | undefined): Promise<ResolvedImage> {
    // Per identity: one user's credentials must not vouch for another user's access.
    const key = `${ref}\0${credentials?.fingerprint() ?? ""}`;
    const known = this.resolved.get(key);
    const fresh = known && (ref.digest !== undefined || Date.now() - known.at < this.tagRefreshMs);
    if (known && fresh) return known.image;
    return this.resolving.run(key, async () => {
      const image = await this.registry.resolve(ref, undefined, { credentials });
      this.resolved.set(key, { image, at: Date.now() });
      return image;
    });
  }
}
