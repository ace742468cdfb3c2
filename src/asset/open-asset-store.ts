import { join } from "node:path";
import type { Config } from "../config/config.js";
import type { Farm } from "../farm/farm.js";
import type { Logger } from "../log/log.js";
import { type AssetStore, FarmAssetStore } from "./asset-store.js";
import { AssetAssociations } from "./associations.js";
import { OriginFetcher } from "./origin-fetcher.js";
import { OriginPolicy } from "./origin-policy.js";

/** The farm's asset store, from `config.asset`; downloads go through DATA/asset/tmp. */
export async function openAssetStore(config: Config, farm: Farm, log: Logger): Promise<AssetStore> {
  const { fetch } = config.asset;
  const policy = new OriginPolicy(fetch);
  const fetcher = new OriginFetcher(
    farm.cas,
    policy,
    {
      tempDir: join(config.dataDir, "asset", "tmp"),
      maxBlobBytes: fetch.maxBlobBytes,
      maxConcurrentDownloads: fetch.maxConcurrentDownloads,
    },
    log,
  );
  await fetcher.open();
  if (policy.fetches) {
    log.info(
      { allowedHosts: fetch.allowedHosts, allowHttp: fetch.allowHttp },
      `Remote Asset API: FetchBlob downloads from ${fetch.allowedHosts.join(", ")}`,
    );
  }
  return new FarmAssetStore(
    farm.cas,
    new AssetAssociations(farm.ac, farm.cas),
    fetcher,
    {
      defaultTimeoutMs: fetch.defaultTimeoutSeconds * 1000,
      maxTimeoutMs: fetch.maxTimeoutSeconds * 1000,
      treeLimits: config.execution.inputLimits,
    },
    log,
  );
}
