import type { ActionCache } from "../ac/action-cache.js";
import { inlineOutputs } from "../ac/inline.js";
import { prepareResultForStorage } from "../ac/validate-result.js";
import type { BlobStore } from "../cas/blob-store.js";
import { formatDigest, parseDigest, resolveDigestFunction } from "../digest/digest.js";
import type { ActionCacheServer } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Logger } from "../log/log.js";
import { invalidArgument, notFound } from "../status/status.js";
import { unary } from "./handlers.js";
import type { InstanceNames } from "./instance-names.js";

export interface ActionCacheServiceOptions {
  maxInlineBytes: number;
}

export function actionCacheService(
  ac: ActionCache,
  cas: BlobStore,
  instances: InstanceNames,
  options: ActionCacheServiceOptions,
  log: Logger,
): ActionCacheServer {
  return {
    getActionResult: unary(log, "GetActionResult", async (request) => {
      instances.check(request.instanceName);
      const fn = resolveDigestFunction(request.digestFunction, request.actionDigest?.hash);
      const actionDigest = parseDigest(fn, request.actionDigest, "action_digest");
      const result = await ac.get(request.instanceName, actionDigest);
      if (!result) throw notFound(`no result for action ${formatDigest(actionDigest)}`);
      return inlineOutputs(fn, result, request, cas, options.maxInlineBytes);
    }),

    updateActionResult: unary(log, "UpdateActionResult", async (request) => {
      instances.check(request.instanceName);
      const fn = resolveDigestFunction(request.digestFunction, request.actionDigest?.hash);
      const actionDigest = parseDigest(fn, request.actionDigest, "action_digest");
      if (!request.actionResult) throw invalidArgument("action_result", "is missing");
      const stored = await prepareResultForStorage(fn, request.actionResult, cas);
      await ac.put(request.instanceName, actionDigest, stored);
      return stored;
    }),
  };
}
