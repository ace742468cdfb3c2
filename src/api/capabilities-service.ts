import { DIGEST_FUNCTIONS, SHA256 } from "../digest/functions.js";
import {
  type CapabilitiesServer,
  Compressor_Value,
  type ServerCapabilities,
  SymlinkAbsolutePathStrategy_Value,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Logger } from "../log/log.js";
import { unary } from "./handlers.js";
import type { InstanceNames } from "./instance-names.js";

export interface CapabilitiesOptions {
  maxBatchTotalSizeBytes: number;
  maxCasBlobSizeBytes: number;
  allowAbsoluteSymlinks: boolean;
  executionEnabled: boolean;
}

/**
 * The highest REAPI version whose required behaviour Berth implements. The
 * CAS, ByteStream and action cache follow the protocol through the 2.3
 * changes (compressed blobs, early-return committed_size -1) and take the
 * per-request digest_function of later versions; the version rises as
 * execution lands and its later requirements are met.
 */
const HIGH_API_VERSION = { major: 2, minor: 3, patch: 0, prerelease: "" };
const LOW_API_VERSION = { major: 2, minor: 0, patch: 0, prerelease: "" };

export function capabilities(options: CapabilitiesOptions): ServerCapabilities {
  const digestFunctions = DIGEST_FUNCTIONS.map((fn) => fn.wireValue);
  return {
    cacheCapabilities: {
      digestFunctions,
      actionCacheUpdateCapabilities: { updateEnabled: true },
      cachePriorityCapabilities: { priorities: [{ minPriority: 0, maxPriority: 0 }] },
      maxBatchTotalSizeBytes: options.maxBatchTotalSizeBytes,
      symlinkAbsolutePathStrategy: options.allowAbsoluteSymlinks
        ? SymlinkAbsolutePathStrategy_Value.ALLOWED
        : SymlinkAbsolutePathStrategy_Value.DISALLOWED,
      supportedCompressors: [Compressor_Value.ZSTD],
      supportedBatchUpdateCompressors: [Compressor_Value.ZSTD],
      maxCasBlobSizeBytes: options.maxCasBlobSizeBytes,
      splitBlobSupport: false,
      spliceBlobSupport: false,
      fastCdc2020Params: undefined,
      repMaxCdcParams: undefined,
    },
    executionCapabilities: {
      // Clients of API 2.0 (Bazel 4) read only this single legacy field.
      digestFunction: SHA256.wireValue,
      execEnabled: options.executionEnabled,
      executionPriorityCapabilities: { priorities: [{ minPriority: -1000, maxPriority: 1000 }] },
      supportedNodeProperties: [],
      digestFunctions,
    },
    deprecatedApiVersion: LOW_API_VERSION,
    lowApiVersion: LOW_API_VERSION,
    highApiVersion: HIGH_API_VERSION,
  };
}

export function capabilitiesService(
  options: CapabilitiesOptions,
  instances: InstanceNames,
  log: Logger,
): CapabilitiesServer {
  const answer = capabilities(options);
  return {
    getCapabilities: unary(log, "GetCapabilities", async (request) => {
      instances.check(request.instanceName);
      return answer;
    }),
  };
}
