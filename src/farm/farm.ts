import { rm } from "node:fs/promises";
import { join } from "node:path";
import type { ActionCache } from "../ac/action-cache.js";
import { CompletenessCheckingActionCache } from "../ac/completeness-checking-action-cache.js";
import { DiskActionCache } from "../ac/disk-action-cache.js";
import { MemoryCachedActionCache } from "../ac/memory-cached-action-cache.js";
import { WriteBehindActionCache } from "../ac/write-behind-action-cache.js";
import type { BlobStore } from "../cas/blob-store.js";
import { DiskBlobStore } from "../cas/disk-blob-store.js";
import { MemoryCachedBlobStore } from "../cas/memory-cached-blob-store.js";
import { UploadSessions } from "../cas/upload-sessions.js";
import type { Config } from "../config/config.js";
import { formatDigest } from "../digest/digest.js";
import { Executor } from "../execution/executor.js";
import { tagResolver } from "../execution/farm-registry.js";
import { ImagePolicy } from "../execution/image-policy.js";
import { ImageExpander } from "../expand/image-expander.js";
import type { Logger } from "../log/log.js";
import { registryFromConfig } from "../registry/configured-client.js";
import { ResolvedImages } from "../registry/resolved-images.js";
import { Scheduler } from "../scheduler/scheduler.js";
import { LruDirectory } from "../store/lru-directory.js";
import { openPrivateDir } from "../store/private-dir.js";

/** Blobs up to this size may be held in memory: the Directory, Action and Command messages of builds. */
const MEMORY_CACHED_BLOB_BYTES = 64 * 1024;

/** The storage and scheduling of one farm, as the services use them. */
export interface Farm {
  readonly cas: BlobStore;
  readonly ac: ActionCache;
  readonly uploads: UploadSessions;
  readonly scheduler: Scheduler;
  readonly executor: Executor;
  /** What images the farm accepts, for Execute and for pulls alike. */
  readonly images: ImagePolicy;
  /** Expand mode's server side (also behind `berth image expand`). */
  readonly expander: ImageExpander;
  close(): Promise<void>;
}

/** Opens (or creates) the farm's storage below `config.dataDir`. */
export async function openFarm(config: Config, log: Logger): Promise<Farm> {
  await openPrivateDir(config.dataDir);
  let casEvictions = 0;
  const onEvict = (key: string, size: number) => {
    casEvictions++;
    log.debug({ key, size }, "evicted blob");
  };
  const onDamaged = (key: string, reason: string) => log.warn({ key }, reason);
  const disk = await DiskBlobStore.open(join(config.dataDir, "cas"), {
    maxBytes: config.cas.maxSizeBytes,
    onEvict,
    onDamaged,
  });
  const acFiles = await LruDirectory.open(join(config.dataDir, "ac"), {
    maxBytes: config.actionCache.maxSizeBytes,
    onEvict: (key) => log.debug({ key }, "evicted action result"),
  });
  // Blob files an earlier run left are hashed in the background, so that requests rarely wait for a check.
  const verifying = disk.verifyAll().then(
    ({ checked, dropped }) => {
      if (checked > 0) log.info({ checked, dropped }, "checked the blob files found at start");
    },
    (err: unknown) => log.warn({ err }, "checking the blob files found at start failed"),
  );
  log.info(
    {
      casBlobs: disk.usage.count,
      casBytes: disk.usage.bytes,
      acEntries: acFiles.count,
    },
    `opened storage in ${config.dataDir}`,
  );
  const cas =
    config.cas.memoryCacheSizeBytes > 0
      ? new MemoryCachedBlobStore(disk, {
          maxBlobBytes: MEMORY_CACHED_BLOB_BYTES,
          maxTotalBytes: config.cas.memoryCacheSizeBytes,
        })
      : disk;
  const onDisk = new DiskActionCache(acFiles, onDamaged);
  const memoryBytes = config.actionCache.memoryCacheSizeBytes;
  const stored = memoryBytes > 0 ? new MemoryCachedActionCache(onDisk, memoryBytes) : onDisk;
  const written = new WriteBehindActionCache(stored, (digest, error) =>
    log.warn({ action: formatDigest(digest), err: error }, "an action result could not be stored"),
  );
  const ac = new CompletenessCheckingActionCache(written, cas, (digest, missing) =>
    log.debug({ action: formatDigest(digest), missing }, "action result has evicted blobs; answering a miss"),
  );
  const uploads = new UploadSessions(cas, config.cas.uploadIdleTimeoutSeconds * 1000);
  const { execution } = config;
  // The executor and the scheduler refer to each other: the scheduler hands outcomes back to it.
  let executor: Executor | undefined;
  const scheduler = new Scheduler({
    leaseTimeoutMs: execution.leaseTimeoutSeconds * 1000,
    maxAttempts: execution.maxAttempts,
    warmRunnerWaitMs: execution.warmRunnerWaitSeconds * 1000,
    retainCompletedMs: execution.retainCompletedSeconds * 1000,
    unwatchedTimeoutMs: execution.unwatchedOperationTimeoutSeconds * 1000,
    finish: (job, outcome) => (executor as Executor).finish(job, outcome),
  });
  const registry = await registryFromConfig(config.images);
  const images = new ImagePolicy(config.images, tagResolver(registry));
  // Layers being expanded are downloaded here; what an earlier run left is of no use.
  const expandTemp = join(config.dataDir, "expand", "tmp");
  await rm(expandTemp, { recursive: true, force: true });
  // The synthetic entries are checked by the expander itself, which skips checks while nothing is evicted.
  const expander = new ImageExpander(
    cas,
    written,
    registry,
    new ResolvedImages(registry, config.images.tagRefreshSeconds * 1000),
    {
      tempDir: expandTemp,
      limits: config.images,
      casBytes: { value: config.cas.maxSizeBytes, key: "cas.maxSizeBytes" },
      casEvictions: () => casEvictions,
    },
  );
  executor = new Executor(cas, ac, scheduler, images, {
    defaultTimeoutMs: execution.defaultTimeoutSeconds * 1000,
    maxTimeoutMs: execution.maxTimeoutSeconds * 1000,
    imageMode: config.images.mode,
    inputRootPath: config.images.inputRootPath,
    expander,
    inputLimits: execution.inputLimits,
    allowNetwork: execution.allowNetwork,
    inputRootAsRoot: execution.inputRootAsRoot,
    checkedDirectoryCacheBytes: execution.checkedDirectoryCacheBytes,
    maxActionBytes: execution.maxActionBytes,
    maxCommandBytes: execution.maxCommandBytes,
  });
  return {
    cas,
    ac,
    uploads,
    scheduler,
    executor,
    images,
    expander,
    close: async () => {
      scheduler.close();
      await uploads.close();
      await written.flush();
      disk.close();
      await verifying;
    },
  };
}
